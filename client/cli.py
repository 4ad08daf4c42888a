"""``ptask``: submit tasks and follow them from the shell."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Annotated, Any, NoReturn

import typer

from poolfleet.client.cli_later import AfterOpt, AtOpt, DelayOpt, after_option, later_options, with_refs
from poolfleet.client.cli_reach import QUERY_TIMEOUT_S, reach_master
from poolfleet.client.client import (
    AmbiguousId,
    Client,
    TaskFuture,
    TaskOptions,
    UnknownId,
    UnservedQueueWarning,
    id_prefix,
    outcome,
    unserved_text,
)
from poolfleet.client.cliopts import ArgsArg, KindOpt, KwargsOpt, PriorityOpt, QueueOpt, RetriesOpt, TaskArg
from poolfleet.client.keys import keys_app
from poolfleet.client.output import dumps, offers_lines, result_doc, table
from poolfleet.common.errors import EncodeError, MasterUnreachable, PoolfleetError, RemoteError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import CMD_TASK_NAME, OPEN_STATES

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="Submit tasks to a poolfleet master and follow them.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(keys_app, name="keys")

MasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master", "-m", envvar="POOLFLEET_MASTER", help="Master's client endpoint [tcp://127.0.0.1:5555]."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", help="Seconds to wait for the master (and with --wait, the result).")
]
QueryTimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the master's answer.")]


class State:
    master: str | None = None
    curve_server_key: str | None = None
    curve_secret_key: str | None = None


@app.callback()
def main_options(
    master: MasterOpt = None,
    curve_server_key: Annotated[
        str | None,
        typer.Option(envvar="POOLFLEET_CURVE_SERVER_KEY", help="The master's CurveZMQ public key file."),
    ] = None,
    curve_secret_key: Annotated[
        str | None,
        typer.Option(envvar="POOLFLEET_CURVE_SECRET_KEY", help="This client's CurveZMQ secret key file."),
    ] = None,
) -> None:
    """Submit tasks to a poolfleet master and follow them.

    The master endpoint comes from --master, else POOLFLEET_MASTER, else tcp://127.0.0.1:5555.
    Exit status: 0 success, 1 the task failed, 2 bad usage, 3 master unreachable, 4 rejected.
    """
    State.master = master
    State.curve_server_key = curve_server_key
    State.curve_secret_key = curve_secret_key


def fail(message: str, code: int, hint: str = "") -> NoReturn:
    typer.echo(f"ptask: error: {message}" + (f" (hint: {hint})" if hint else ""), err=True)
    raise typer.Exit(code)


def parse_arg(text: str) -> Any:
    """A JSON value when the text parses as one, otherwise the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_client(master: str | None, timeout: float) -> Client:
    """A client that the master has welcomed; exits 3 (saying why) when none does in time."""
    try:
        client = Client(
            master or State.master,
            timeout_s=timeout,
            curve_server_key=State.curve_server_key,
            curve_secret_key=State.curve_secret_key,
        )
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE, "pass --master tcp://HOST:PORT or set POOLFLEET_MASTER")
    reach_master(client, timeout)
    return client


def _await_ack(client: Client, fut: TaskFuture, timeout: float) -> None:
    if fut.ack is None:
        return
    try:
        reply = fut.ack.result(timeout)
    except KeyboardInterrupt:
        typer.echo(
            f"\nptask: interrupted before the master acknowledged task {fut.task_id}; it may have been "
            f"submitted all the same: ptask result {fut.task_id}",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except FutureTimeout:
        fail(
            f"master at {client.master} did not answer within {timeout} s",
            EXIT_UNREACHABLE,
            "is pmaster running? check --master or POOLFLEET_MASTER",
        )
    except RemoteError as exc:
        fail(exc.message, EXIT_REJECTED)
    if reply.get("unserved"):
        typer.echo(f"ptask: warning: {unserved_text(reply['unserved'], reply.get('served') or [])}", err=True)
    for r in reply.get("rejected", []):
        if r.get("id") == fut.id_bytes:
            hint = "see 'ptask workers' for what the workers offer" if r.get("code") == "unknown_task" else ""
            fail(f"{r.get('code')}: {r.get('message')}", EXIT_REJECTED, hint)


def _later(delay: str | None, at: str | None) -> dict[str, Any]:
    try:
        return later_options(delay, at)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)


def submitted_state(opts: TaskOptions, payload_refs: bool = False) -> str:
    """The state a task just submitted with these options starts in."""
    if opts.after or payload_refs:
        return "WAITING"
    return "DELAYED" if opts.delay_s or opts.eta else "PENDING"


def say_waiting(task_id: str, what: str) -> None:
    """Tell (on stderr) which task a --wait waits for, before the wait starts."""
    typer.echo(
        f"ptask: {what} {task_id}; waiting for its result (Ctrl-C stops waiting, not the task)", err=True
    )


def interrupted(task_id: str) -> NoReturn:
    """Ctrl-C during a --wait: the task goes on; say how to follow it, exit 130."""
    typer.echo(
        f"\nptask: interrupted; task {task_id} goes on on the cluster\n"
        f"  cancel it:        ptask cancel {task_id}\n"
        f"  fetch its result: ptask result {task_id} --wait",
        err=True,
    )
    raise typer.Exit(EXIT_INTERRUPTED)


def _finish(
    client: Client, fut: TaskFuture, wait: bool, as_json: bool, timeout: float, state: str = "PENDING"
) -> None:
    _await_ack(client, fut, timeout)
    if not wait:
        typer.echo(dumps({"id": fut.task_id, "state": state}) if as_json else fut.task_id)
        return
    say_waiting(fut.task_id, "submitted task")
    try:
        fut.exception(timeout)
    except KeyboardInterrupt:
        interrupted(fut.task_id)
    except FutureTimeout:
        fail(
            f"task {fut.task_id} did not finish within {timeout} s (it keeps running)",
            EXIT_UNREACHABLE,
            f"ptask result {fut.task_id} --wait",
        )
    _print_entry(fut.info | {"id": fut.id_bytes}, fut, as_json)


def _print_entry(entry: dict[str, Any], fut: TaskFuture | None, as_json: bool) -> None:
    if fut is not None:
        exc = fut.exception()
        value = None if exc is not None else fut.result()
    else:
        value, _ = outcome(entry)
    state = entry.get("state")
    if as_json:
        typer.echo(dumps(result_doc(entry, value)))
    elif state == "SUCCEEDED":
        typer.echo(value if isinstance(value, str) else dumps(value))
    elif state in OPEN_STATES:
        typer.echo(f"{format_id(entry['id'])} {state}")
    else:
        err = entry.get("error") or {}
        typer.echo(
            f"ptask: task {format_id(entry['id'])} {state}: {err.get('type')}: {err.get('message')}", err=True
        )
        if err.get("traceback"):
            typer.echo(err["traceback"].rstrip(), err=True)
    if state != "SUCCEEDED" and state not in OPEN_STATES:
        raise typer.Exit(EXIT_TASK_FAILED)


@app.command()
def submit(
    task: TaskArg,
    args: ArgsArg = None,
    kwargs: KwargsOpt = None,
    kind: KindOpt = None,
    queue: QueueOpt = None,
    task_timeout: Annotated[
        float | None, typer.Option("--task-timeout", help="Seconds the task may run.")
    ] = None,
    retries: RetriesOpt = None,
    after: AfterOpt = None,
    delay: DelayOpt = None,
    at: AtOpt = None,
    priority: PriorityOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: TimeoutOpt = 30.0,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Submit one task; print its id, or with --wait its result.

    An argument {"$ref": "ID"} (at any depth of a JSON argument) stands for the result of task
    ID: the task starts once that one has succeeded, with its result in that place."""
    call_kwargs: dict[str, Any] = {}
    if kwargs:
        try:
            call_kwargs = json.loads(kwargs)
        except ValueError as exc:
            fail(f"--kwargs is not valid JSON: {exc}", EXIT_USAGE)
        if not isinstance(call_kwargs, dict):
            fail("--kwargs must be a JSON object", EXIT_USAGE)
    if kind is not None and kind not in ("cpu", "io"):
        fail(f"--kind must be cpu or io, not {kind!r}", EXIT_USAGE, "use 'ptask run' for programs")
    held = _later(delay, at)
    client = make_client(master, timeout)
    try:

        def resolve(texts: list[str]) -> list[str]:
            return _resolved(client, texts)

        held |= after_option(after, resolve)
        opts = TaskOptions(
            kind=kind, queue=queue, timeout_s=task_timeout, retries=retries, priority=priority, **held
        )
        call_args = with_refs([parse_arg(a) for a in args or []], lambda t: resolve([t])[0])
        call_kwargs = with_refs(call_kwargs, lambda t: resolve([t])[0])
        fut = client.submit_many(task, [(call_args, call_kwargs)], options=opts, wait=wait)[0]
        refs = "$ref" in json.dumps([args, kwargs])
        _finish(client, fut, wait, as_json, timeout, submitted_state(opts, refs))
    except (PoolfleetError, EncodeError) as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        client.close()


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    argv: Annotated[list[str], typer.Argument(help="PROGRAM [ARG ...] (put -- before it).")],
    stdin: Annotated[str | None, typer.Option(help="Text fed to the program's standard input.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for the program (repeatable).")
    ] = None,
    cwd: Annotated[str | None, typer.Option(help="Working directory on the worker.")] = None,
    queue: QueueOpt = None,
    task_timeout: Annotated[
        float | None, typer.Option("--task-timeout", help="Seconds the program may run.")
    ] = None,
    after: AfterOpt = None,
    delay: DelayOpt = None,
    at: AtOpt = None,
    priority: PriorityOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait and print exit code, stdout and stderr.")
    ] = False,
    timeout: TimeoutOpt = 30.0,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Run an external program on a worker that allows it: ptask run --wait -- echo hi"""
    env_map: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--env needs KEY=VALUE, got {item!r}", EXIT_USAGE)
        env_map[key] = value
    held = _later(delay, at)
    client = make_client(master, timeout)
    try:
        kwargs: dict[str, Any] = {"argv": list(argv)}
        if stdin is not None:
            kwargs["stdin"] = stdin
        if env_map:
            kwargs["env"] = env_map
        if cwd:
            kwargs["cwd"] = cwd
        held |= after_option(after, lambda texts: _resolved(client, texts))
        opts = TaskOptions(kind="cmd", queue=queue, timeout_s=task_timeout, priority=priority, **held)
        fut = client.submit_many(CMD_TASK_NAME, [((), kwargs)], options=opts, wait=wait)[0]
        if not wait or as_json:
            _finish(client, fut, wait, as_json, timeout, submitted_state(opts))
            if wait and fut.exception() is None and isinstance(fut.result(), dict):
                raise typer.Exit(0 if fut.result().get("exit_code") == 0 else EXIT_TASK_FAILED)
            return
        _await_ack(client, fut, timeout)
        try:  # stderr is the program's here: the id is told on Ctrl-C only
            exc = fut.exception(timeout)
        except KeyboardInterrupt:
            interrupted(fut.task_id)
        except FutureTimeout:
            fail(
                f"program did not finish within {timeout} s (it keeps running)",
                EXIT_UNREACHABLE,
                f"ptask result {fut.task_id} --wait",
            )
        if exc is not None:
            _print_entry(fut.info | {"id": fut.id_bytes}, fut, False)
        res = fut.result()
        sys.stdout.write(res.get("stdout", ""))
        sys.stderr.write(res.get("stderr", ""))
        code = res.get("exit_code")
        if code != 0:
            typer.echo(f"ptask: {exit_text(argv[0], code)}", err=True)
        raise typer.Exit(0 if code == 0 else EXIT_TASK_FAILED)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        client.close()


def exit_text(program: str, code: Any) -> str:
    """How a program ended, from its exit code (negative: the signal that killed it)."""
    if isinstance(code, int) and code < 0:
        return f"{program} was killed by signal {-code}"
    return f"{program} exited with code {code}"


@app.command()
def result(
    task_id: Annotated[
        str, typer.Argument(help="The task id that submit printed (36 characters, dashes optional).")
    ],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the task has finished.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help=f"Seconds to wait for the master [{QUERY_TIMEOUT_S:g}], with --wait for the result [30].",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Show a task's state, and its result once it has finished."""
    if timeout is None:
        timeout = 30.0 if wait else QUERY_TIMEOUT_S
    try:
        id_prefix(task_id)  # a bad id is bad usage, whether a master runs or not
    except PoolfleetError as bad:
        fail(str(bad), EXIT_USAGE)
    client = make_client(master, timeout)
    try:
        task_id = _resolved(client, [task_id])[0]
        if wait:
            fut = client.future(task_id)
            # the master's answer first (it knows the task, or says not), then the id line
            if fut.ack is not None and not wait_futures([fut.ack], timeout).done:
                fail(f"master at {client.master} did not answer within {timeout} s", EXIT_UNREACHABLE)
            if not fut.done():
                say_waiting(fut.task_id, "task")
            try:
                fut.exception(timeout)
            except KeyboardInterrupt:
                interrupted(fut.task_id)
            except FutureTimeout:
                fail(
                    f"task {task_id} did not finish within {timeout} s",
                    EXIT_UNREACHABLE,
                    "wait longer with --timeout, or check 'ptask status' and 'ptask workers'",
                )
            exc = fut.exception()
            if isinstance(exc, RemoteError):
                fail(exc.message, EXIT_REJECTED)
            _print_entry(fut.info | {"id": fut.id_bytes}, fut, as_json)
            return
        entry = client.results([task_id])[format_id(_parse(task_id))]
        if entry is None:
            fail(
                f"unknown task id {task_id} (never submitted, or its result expired)",
                EXIT_REJECTED,
                "check the id and --master; results are kept for the master's --result-ttl-s",
            )
        _print_entry(entry, None, as_json)
    except MasterUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, "is pmaster running? check --master or POOLFLEET_MASTER")
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        client.close()


def _resolved(client: Client, texts: list[str]) -> list[str]:
    """Whole ids for ids or unique id prefixes; exits 4 for one no task has, 2 if ambiguous."""
    try:
        return client.resolve(texts)
    except UnknownId as exc:
        fail(
            str(exc),
            EXIT_REJECTED,
            "check the id and --master; results are kept for the master's --result-ttl-s",
        )
    except MasterUnreachable:
        raise
    except AmbiguousId as exc:
        fail(str(exc), EXIT_USAGE)


def _parse(task_id: str) -> bytes:
    from poolfleet.common.ids import parse_id

    return parse_id(task_id)


@app.command()
def status(
    timeout: QueryTimeoutOpt = QUERY_TIMEOUT_S, as_json: JsonOpt = False, master: MasterOpt = None
) -> None:
    """Task counts by state and queue depth by queue and kind."""
    client = make_client(master, timeout)
    try:
        st = client.status()
    except MasterUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, "is pmaster running? check --master or POOLFLEET_MASTER")
    finally:
        client.close()
    if as_json:
        st.pop("req", None)
        typer.echo(dumps(st))
        return
    order = [
        "WAITING",
        "DELAYED",
        "PENDING",
        "DISPATCHED",
        "RUNNING",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "TIMED_OUT",
    ]
    counts = st["counts"]
    typer.echo(table(["state", "tasks"], [[s, counts.get(s, 0)] for s in order]))
    typer.echo("")
    rows = [[q["queue"], q["kind"], q["depth"]] for q in st["queues"]]
    typer.echo(table(["queue", "kind", "pending"], rows) if rows else "no pending tasks")
    typer.echo(f"\nworkers connected: {st['workers']}")
    if st.get("paused"):
        typer.echo(f"paused queues (nothing dispatched): {', '.join(st['paused'])}")
    code = st.get("code") or {}
    if code.get("received"):
        typer.echo(
            f"shipped code: {code['stored']} functions stored, {code['received']} received, "
            f"{code['sent']} sent to workers"
        )
    unserved = st.get("unserved") or []
    if unserved:
        typer.echo("\nwaiting for a worker that offers them:")
        typer.echo(
            table(
                ["task", "queue", "kind", "pending"],
                [[_unserved_name(u["name"]), u["queue"], u["kind"], u["pending"]] for u in unserved],
            )
        )


def _unserved_name(name: str) -> str:
    from poolfleet.common.shipping import SHIPPED_ROUTE

    return "shipped functions (pworker --run-shipped-code)" if name == SHIPPED_ROUTE else name


@app.command()
def workers(
    functions: Annotated[
        bool,
        typer.Option(
            "--functions", help="List every task name offered, by how many workers, with its defaults."
        ),
    ] = False,
    timeout: QueryTimeoutOpt = QUERY_TIMEOUT_S,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Connected workers: id, host, pid, queues, slots busy/total by kind, last heartbeat,
    and the tasks they offer."""
    client = make_client(master, timeout)
    try:
        ws = client.workers() if not functions else []
        offered = client.functions() if functions else {}
    except MasterUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, "is pmaster running? check --master or POOLFLEET_MASTER")
    finally:
        client.close()
    if functions:
        _print_functions(offered, as_json)
        return
    if as_json:
        typer.echo(dumps(ws))
        return
    rows = []
    for w in ws:
        slots = " ".join(_slot_use(k, n, w) for k, n in sorted(w["slots"].items()))
        rows.append(
            [
                w["worker_id"],
                w["host"],
                w["pid"],
                ",".join(w["queues"]),
                slots,
                f"{w['last_heartbeat_s']:.1f}s ago" + (" draining" if w.get("draining") else ""),
            ]
        )
    typer.echo(
        table(["worker", "host", "pid", "queues", "running/slots", "heartbeat"], rows)
        if rows
        else "no workers connected"
    )
    lines = offers_lines(ws)
    if lines:
        typer.echo("")
        typer.echo("\n".join(lines))
    for w in ws:
        for name in w.get("conflicts") or []:
            typer.echo(f"{w['worker_id']}: {name}: other workers declare other defaults for it")


def _print_functions(offered: dict[str, dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(dumps(offered))
        return
    if not offered:
        typer.echo("no task names offered (no worker connected, or none says what it offers)")
        return
    rows = [
        [name, d.get("workers", 0), d.get("kind", ""), d.get("retries", ""), d.get("timeout_s", "")]
        for name, d in offered.items()
    ]
    typer.echo(table(["name", "workers", "kind", "retries", "timeout_s"], rows))


def _slot_use(kind: str, slots: int, w: dict[str, Any]) -> str:
    """``cpu:2/2`` (started of slots), ``+3 sent`` for tasks sent but not started yet."""
    busy = w["busy"].get(kind, 0)
    started = (w.get("started") or {}).get(kind, busy)
    waiting = busy - started
    return f"{kind}:{started}/{slots}" + (f" +{waiting} sent" if waiting > 0 else "")


@app.command()
def cancel(
    task_ids: Annotated[
        list[str], typer.Argument(help="Ids of the tasks to cancel, as submit printed them.")
    ],
    timeout: QueryTimeoutOpt = 10.0,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Cancel tasks: pending ones are removed, running ones are stopped."""
    try:
        for tid in task_ids:
            id_prefix(tid)  # a bad id is bad usage, whether a master runs or not
    except PoolfleetError as bad:
        fail(str(bad), EXIT_USAGE)
    client = make_client(master, timeout)
    try:
        out = client.cancel(_resolved(client, task_ids))
    except MasterUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, "is pmaster running? check --master or POOLFLEET_MASTER")
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        client.close()
    docs = [{"id": format_id(r["id"]), "outcome": r["outcome"], "state": r.get("state")} for r in out]
    if as_json:
        typer.echo(dumps(docs))
    else:
        typer.echo(table(["task", "outcome", "state"], [[d["id"], d["outcome"], d["state"]] for d in docs]))
    if any(d["outcome"] == "unknown" for d in docs):
        raise typer.Exit(EXIT_REJECTED)


def _add_commands() -> None:
    """Commands that live in their own modules (they import this module's helpers)."""
    from poolfleet.client import cli_map, cli_ops, cli_schedules, cli_steer, local, top

    app.command("tasks")(cli_ops.tasks_command)
    app.command("show")(cli_ops.show_command)
    app.command("retry")(cli_ops.retry_command)
    app.add_typer(cli_ops.queue_app, name="queue")
    app.add_typer(cli_schedules.schedule_app, name="schedule")
    app.add_typer(cli_schedules.limit_app, name="limit")
    app.command("logs")(cli_steer.logs_command)
    app.add_typer(cli_steer.worker_app, name="worker")
    app.command("map")(cli_map.map_command)
    app.command("top")(top.top_command)
    app.command("local")(local.local_command)


_add_commands()


def main() -> None:
    # ptask says what went wrong in its own words; the client library's warnings would repeat it
    logging.getLogger("poolfleet.client").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", UnservedQueueWarning)
    app(prog_name="ptask")


if __name__ == "__main__":
    main()
