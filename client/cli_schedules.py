"""``ptask schedule add/list/pause/resume/remove`` and ``ptask limit set/list/remove``: periodic
tasks and fleet-wide rate limits, both kept by the master."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from poolfleet.client.cli_ops import JsonOpt, parse_duration, when
from poolfleet.client.cli_ops import QueryTimeoutOpt as TimeoutOpt
from poolfleet.client.cliopts import (
    EXIT_REJECTED,
    EXIT_USAGE,
    ArgsArg,
    KindOpt,
    KwargsOpt,
    MasterOpt,
    PriorityOpt,
    QueueOpt,
    RetriesOpt,
    TaskArg,
    asking,
    fail,
)
from poolfleet.client.output import dumps, jsonable, table
from poolfleet.common.errors import PoolfleetError
from poolfleet.common.ids import format_id

schedule_app = typer.Typer(
    help="Periodic tasks kept by the master: add, list, pause, resume, remove.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
limit_app = typer.Typer(
    help="Fleet-wide rate limits per task: at most N starts per second, minute or hour.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
T = TypeVar("T")


def _ask(master: str | None, timeout: float, call: Callable[[Any], T]) -> T:
    """``call(client)``, with ptask's exits: 3 unreachable, 2 a bad request, 4 refused."""
    with asking(master, timeout, EXIT_REJECTED) as client:
        return call(client)


def _args(args: list[str] | None, kwargs: str | None) -> tuple[list[Any], dict[str, Any]]:
    from poolfleet.client.cli import parse_arg

    call_kwargs: Any = {}
    if kwargs:
        try:
            call_kwargs = json.loads(kwargs)
        except ValueError as exc:
            fail(f"--kwargs is not valid JSON: {exc}", EXIT_USAGE)
        if not isinstance(call_kwargs, dict):
            fail("--kwargs must be a JSON object", EXIT_USAGE)
    return [parse_arg(a) for a in args or []], call_kwargs


def when_text(doc: dict[str, Any]) -> str:
    """``every 30s`` or ``cron */5 * * * * (Europe/Berlin)``."""
    if "every_s" in doc:
        return f"every {doc['every_s']:g}s"
    return f"cron {doc['cron']} ({doc.get('timezone') or 'UTC'})"


def schedule_rows(docs: list[dict[str, Any]]) -> list[list[Any]]:
    """``ptask schedule list``'s rows: name, task, when, state, last run, its outcome, next run."""
    rows = []
    for d in docs:
        last = format_id(d["last_task"]) if d.get("last_task") else ""
        rows.append(
            [
                d["name"],
                d["task"],
                when_text(d),
                "paused" if d["paused"] else "active",
                last,
                d.get("last_state", ""),
                "" if d.get("next_tick") is None else when(d["next_tick"]),
            ]
        )
    return rows


def _json_doc(d: dict[str, Any]) -> dict[str, Any]:
    from poolfleet.common import codec

    out = dict(d)
    if out.get("last_task"):
        out["last_task"] = format_id(out["last_task"])
    payload = out.pop("payload", None)
    if isinstance(payload, bytes):
        out["args"], out["kwargs"] = codec.unpack(payload)
    result: dict[str, Any] = jsonable(out)
    return result


@schedule_app.command("add")
def schedule_add(
    name: Annotated[str, typer.Argument(help="The schedule's name (letters, digits, _ . -).")],
    task: TaskArg,
    args: ArgsArg = None,
    every: Annotated[
        str | None, typer.Option("--every", help="Run every 30s, 10m, 2h or 1d (from the Unix epoch).")
    ] = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help='Run at the times of a cron expression: "*/5 * * * *".')
    ] = None,
    timezone: Annotated[
        str | None, typer.Option("--timezone", help="The cron expression's time zone (IANA name) [UTC].")
    ] = None,
    catchup: Annotated[
        str,
        typer.Option("--catchup", help="A tick missed while the master was down: run-once or skip."),
    ] = "run-once",
    kwargs: KwargsOpt = None,
    kind: KindOpt = None,
    queue: QueueOpt = None,
    task_timeout: Annotated[
        float | None, typer.Option("--task-timeout", help="Seconds each run may take.")
    ] = None,
    retries: RetriesOpt = None,
    priority: PriorityOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Run a task on a schedule: ptask schedule add nightly mytasks:report --cron "0 2 * * *" """
    if (every is None) == (cron is None):
        fail("give either --every or --cron", EXIT_USAGE)
    if kind is not None and kind not in ("cpu", "io"):
        fail(f"--kind must be cpu or io, not {kind!r}", EXIT_USAGE)
    if catchup not in ("run-once", "skip"):
        fail(f"--catchup must be run-once or skip, not {catchup!r}", EXIT_USAGE)
    every_s = None
    if every is not None:
        try:
            every_s = parse_duration(every)
        except PoolfleetError:
            fail(f"--every takes a duration like 30s, 10m, 2h or 1d, not {every!r}", EXIT_USAGE)
    call_args, call_kwargs = _args(args, kwargs)
    doc = _ask(
        master,
        timeout,
        lambda c: c.schedule_add(
            name, task, call_args, call_kwargs, every_s=every_s, cron=cron, timezone=timezone,
            catchup=catchup, kind=kind, queue=queue, timeout_s=task_timeout, retries=retries,
            priority=priority,
        ),
    )  # fmt: skip
    if as_json:
        typer.echo(dumps(_json_doc(doc)))
    else:
        typer.echo(f"schedule {doc['name']}: {when_text(doc)}; next run {when(doc.get('next_tick'))} UTC")


@schedule_app.command("list")
def schedule_list(timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, master: MasterOpt = None) -> None:
    """Every schedule: when it runs, its last run (task id and outcome) and its next run (UTC)."""
    docs = _ask(master, timeout, lambda c: c.schedules())
    if as_json:
        typer.echo(dumps([_json_doc(d) for d in docs]))
        return
    if not docs:
        typer.echo("no schedules")
        return
    headers = ["schedule", "task", "when", "state", "last run", "outcome", "next run (UTC)"]
    typer.echo(table(headers, schedule_rows(docs)))


def _control(action: str, name: str, timeout: float, master: str | None) -> None:
    changed = _ask(master, timeout, lambda c: getattr(c, f"schedule_{action}")(name))
    done = {"pause": "paused", "resume": "resumed", "remove": "removed"}[action]
    typer.echo(f"schedule {name} {done}" + ("" if changed else " (already)"))


@schedule_app.command("pause")
def schedule_pause(
    name: Annotated[str, typer.Argument(help="The schedule.")],
    timeout: TimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Stop running a schedule (ticks that fall while it is paused never run)."""
    _control("pause", name, timeout, master)


@schedule_app.command("resume")
def schedule_resume(
    name: Annotated[str, typer.Argument(help="The schedule.")],
    timeout: TimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Run a paused schedule again, from its next tick on."""
    _control("resume", name, timeout, master)


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="The schedule.")],
    timeout: TimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Remove a schedule (the tasks it made stay)."""
    _control("remove", name, timeout, master)


@limit_app.command("set")
def limit_set(
    task: Annotated[str, typer.Argument(help="The task, as module:function.")],
    rate: Annotated[str, typer.Argument(help="Starts per period: 10/s, 100/m or 1000/h.")],
    timeout: TimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """At most RATE starts of TASK across all workers together (tasks over it stay pending)."""
    from poolfleet.master.ratelimit import parse_rate

    try:
        parse_rate(rate)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    changed = _ask(master, timeout, lambda c: c.limit_set(task, rate))
    typer.echo(f"limit {task} {rate.strip()}" + ("" if changed else " (already)"))


@limit_app.command("list")
def limit_list(timeout: TimeoutOpt = 10.0, as_json: JsonOpt = False, master: MasterOpt = None) -> None:
    """Every rate limit, with the starts in its current window."""
    docs = _ask(master, timeout, lambda c: c.limits())
    if as_json:
        typer.echo(dumps(docs))
    elif not docs:
        typer.echo("no rate limits")
    else:
        rows = [[d["name"], d["rate"], d["in_window"]] for d in docs]
        typer.echo(table(["task", "limit", "starts in window"], rows))


@limit_app.command("remove")
def limit_remove(
    task: Annotated[str, typer.Argument(help="The task, as module:function.")],
    timeout: TimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Remove a task's rate limit."""
    changed = _ask(master, timeout, lambda c: c.limit_remove(task))
    typer.echo(f"limit {task} removed" + ("" if changed else " (there was none)"))
