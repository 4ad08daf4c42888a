"""``ptask tasks``, ``ptask show``, ``ptask retry`` and ``ptask queue pause/resume``: find,
inspect and steer work."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import typer

from poolfleet.client.cli_reach import QUERY_TIMEOUT_S
from poolfleet.client.client import UnknownId, id_prefix
from poolfleet.client.cliopts import (
    EXIT_REJECTED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UNREACHABLE_HINT,
    MasterOpt,
    asking,
    fail,
    make_client,
)
from poolfleet.client.output import dumps, jsonable, table
from poolfleet.common import codec
from poolfleet.common.errors import MasterUnreachable, PoolfleetError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import TaskState

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
QueryTimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the master's answer.")]
#: Arguments and results longer than this are cut in ``ptask show`` (``--full`` shows all).
SHORT_CHARS = 200
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

queue_app = typer.Typer(help="Pause and resume queues.", no_args_is_help=True, rich_markup_mode=None)


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``10m``, ``2h`` or ``1d``."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise PoolfleetError(f"--since takes a duration like 30s, 10m, 2h or 1d, not {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def when(t: float | None) -> str:
    """A wall-clock time as ptask prints it (UTC, to the second)."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def shorten(text: str, full: bool) -> str:
    if full or len(text) <= SHORT_CHARS:
        return text
    return f"{text[:SHORT_CHARS]}... ({len(text)} characters; --full shows all)"


def _progress_text(p: dict[str, Any] | None) -> str:
    """``40% resized 40 of 100`` for a progress report, "" for none."""
    if not p:
        return ""
    fraction = p.get("fraction")
    pct = f"{float(fraction) * 100:.0f}%" if isinstance(fraction, int | float) else "?"
    return f"{pct} {p.get('message') or ''}".rstrip()


def _decoded(blob: bytes | None) -> Any:
    if blob is None:
        return None
    try:
        return codec.unpack(blob)
    except PoolfleetError as exc:
        return f"<cannot decode: {exc}>"


def _resolve_fail(exc: PoolfleetError) -> None:
    if isinstance(exc, MasterUnreachable):
        fail(str(exc), EXIT_UNREACHABLE, UNREACHABLE_HINT)
    fail(str(exc), EXIT_REJECTED if isinstance(exc, UnknownId) else EXIT_USAGE)


def tasks_command(
    state: Annotated[
        list[str] | None, typer.Option("--state", help="Only tasks in this state (repeatable).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only this task, as module:function.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Only tasks of this queue.")] = None,
    worker: Annotated[
        str | None, typer.Option("--worker", help="Only tasks run (or running) on this worker id.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only tasks submitted within this long: 30s, 10m, 2h, 1d.")
    ] = None,
    before: Annotated[
        str | None, typer.Option("--before", help="Only tasks older than this id (the next page).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Tasks to list at most.")] = 50,
    timeout: QueryTimeoutOpt = QUERY_TIMEOUT_S,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """List tasks, newest first: open ones and finished ones whose results are kept."""
    states = [s.upper() for s in state or []]
    bad = [s for s in states if s not in TaskState.__members__]
    if bad:
        fail(f"unknown state {bad[0]!r}: use {', '.join(TaskState.__members__)}", EXIT_USAGE)
    try:
        since_t = None if since is None else time.time() - parse_duration(since)
        if before is not None and len(id_prefix(before)) != 32:
            raise PoolfleetError(f"--before takes a whole task id, not {before!r}")
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    with asking(master, timeout) as client:
        found, more = client.tasks(
            states=states, name=name, queue=queue, worker=worker, since=since_t, before=before, limit=limit
        )
    if as_json:
        docs = [e | {"id": format_id(e["id"])} for e in found]
        typer.echo(dumps({"tasks": docs, "next": more}))
        return
    if not found:
        typer.echo("no tasks")
        return
    rows = [
        [
            format_id(e["id"]),
            e["state"],
            e["name"],
            e["queue"],
            e["attempt"],
            e.get("worker_id") or "",
            when(e.get("created_at")),
            _progress_text(e.get("progress")),
        ]
        for e in found
    ]
    headers = ["task", "state", "name", "queue", "attempt", "worker", "created (UTC)", "progress"]
    if not any(r[-1] for r in rows):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    typer.echo(table(headers, rows))
    if more is not None:
        typer.echo(f"(more: add --before {more})")


def show_command(
    task_id: Annotated[str, typer.Argument(help="The task id, or its first digits.")],
    full: Annotated[bool, typer.Option("--full", help="Show arguments and result in full.")] = False,
    timeout: QueryTimeoutOpt = QUERY_TIMEOUT_S,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Everything about one task: options, state, attempts, arguments, result or error."""
    try:
        id_prefix(task_id)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    client = make_client(master, timeout)
    try:
        doc = client.show(task_id)
    except PoolfleetError as exc:
        _resolve_fail(exc)
    finally:
        client.close()
    if doc is None:
        fail(f"unknown task id {task_id} (never submitted, or its result expired)", EXIT_REJECTED)
    for key in ("payload", "value"):
        if key in doc:
            doc[key] = _decoded(doc[key])
    if as_json:
        doc["id"] = format_id(doc["id"])
        typer.echo(dumps(doc))
        return
    typer.echo("\n".join(show_lines(doc, full)))


def show_lines(doc: dict[str, Any], full: bool) -> list[str]:
    """``ptask show``'s text for a TASK_SHOW document (payload and value decoded)."""
    opts = doc.get("options") or {}
    shown_opts = " ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "(the workers' declared defaults)"
    lines = [
        f"id:        {format_id(doc['id'])}",
        f"name:      {doc['name']}",
        f"queue:     {doc['queue']}",
        f"kind:      {doc['kind']}",
        f"options:   {shown_opts}",
        f"state:     {doc['state']}" + (" (cancel requested)" if doc.get("cancel_requested") else ""),
        f"attempt:   {doc['attempt']}",
    ]
    if doc.get("worker_id"):
        lines.append(f"worker:    {doc['worker_id']}")
    lines.append(f"created:   {when(doc.get('created_at'))} UTC")
    if doc.get("finished_at") is not None:
        lines.append(f"finished:  {when(doc['finished_at'])} UTC")
    if doc.get("duration_ms") is not None:
        lines.append(f"duration:  {doc['duration_ms']:.1f} ms")
    if doc.get("progress"):
        lines.append(
            f"progress:  {_progress_text(doc['progress'])} (at {when(doc['progress'].get('at'))} UTC)"
        )
    if doc.get("output_end"):
        lines.append(f"output:    {doc['output_end']} characters (ptask logs {format_id(doc['id'])})")
    payload = doc.get("payload")
    if isinstance(payload, list) and len(payload) == 2:
        lines.append(f"args:      {shorten(dumps(payload[0]), full)}")
        if payload[1]:
            lines.append(f"kwargs:    {shorten(dumps(payload[1]), full)}")
    elif "payload" in doc:
        lines.append(f"payload:   {shorten(dumps(payload), full)}")
    elif doc["state"] == TaskState.SUCCEEDED:
        lines.append("args:      (not kept once a task has succeeded)")
    if doc["state"] == TaskState.SUCCEEDED:
        lines.append(f"result:    {shorten(dumps(doc.get('value')), full)}")
    err = doc.get("error")
    if err:
        lines.append(f"error:     {err.get('type')}: {err.get('message')}")
        tb = (err.get("traceback") or "").rstrip()
        if tb:
            lines.append("traceback:")
            lines += ["  " + t for t in tb.splitlines()]
    attempts = doc.get("attempts") or []
    if attempts:
        lines.append("attempts:")
        rows = [
            [
                a["attempt"],
                a.get("worker_id") or "",
                when(a.get("started_at")),
                when(a.get("ended_at")),
                a["outcome"],
            ]
            for a in attempts
        ]
        lines += ["  " + t for t in table(["#", "worker", "started", "ended", "outcome"], rows).splitlines()]
    return lines


def retry_command(
    task_ids: Annotated[list[str], typer.Argument(help="Ids (or unique prefixes) of final tasks.")],
    timeout: QueryTimeoutOpt = 10.0,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """Run failed, timed out or cancelled tasks again, each as a new task with the same name,
    queue, kind, options and arguments; print the new ids."""
    try:
        for t in task_ids:
            id_prefix(t)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    client = make_client(master, timeout)
    try:
        out = client.retry(task_ids)
    except PoolfleetError as exc:
        _resolve_fail(exc)
    finally:
        client.close()
    docs = [
        jsonable(
            r | {"id": format_id(r["id"])} | ({"new_id": format_id(r["new_id"])} if r.get("new_id") else {})
        )
        for r in out
    ]
    if as_json:
        typer.echo(dumps(docs))
    else:
        for d in docs:
            if d["outcome"] == "retried":
                typer.echo(d["new_id"])
            else:
                typer.echo(f"ptask: error: task {d['id']} not retried: {d.get('message')}", err=True)
    if any(d["outcome"] != "retried" for d in docs):
        raise typer.Exit(EXIT_REJECTED)


def _queue_action(queue: str, pause: bool, timeout: float, master: str | None) -> None:
    with asking(master, timeout) as client:
        reply = client.pause_queue(queue) if pause else client.resume_queue(queue)
    state = "paused" if pause else "resumed"
    already = "" if reply["changed"] else " (already)"
    typer.echo(f"queue {queue} {state}{already}: {reply['pending']} pending")


@queue_app.command("pause")
def queue_pause(
    queue: Annotated[str, typer.Argument(help="The queue.")],
    timeout: QueryTimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Dispatch nothing more from a queue: pending tasks stay, running ones finish."""
    _queue_action(queue, True, timeout, master)


@queue_app.command("resume")
def queue_resume(
    queue: Annotated[str, typer.Argument(help="The queue.")],
    timeout: QueryTimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Dispatch from a paused queue again."""
    _queue_action(queue, False, timeout, master)
