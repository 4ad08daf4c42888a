"""``ptask logs``, ``ptask queue purge`` and ``ptask worker drain/stop``: read what a task
wrote, empty a queue, and stop workers on other hosts."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from poolfleet.client.cli_ops import JsonOpt, QueryTimeoutOpt, _progress_text, _resolve_fail, queue_app
from poolfleet.client.cli_reach import QUERY_TIMEOUT_S
from poolfleet.client.client import id_prefix
from poolfleet.client.cliopts import (
    EXIT_REJECTED,
    EXIT_USAGE,
    MasterOpt,
    asking,
    fail,
    make_client,
)
from poolfleet.client.output import dumps
from poolfleet.common.errors import PoolfleetError
from poolfleet.common.protocol import OPEN_STATES

worker_app = typer.Typer(help="Drain or stop a worker.", no_args_is_help=True, rich_markup_mode=None)


def logs_command(
    task_id: Annotated[str, typer.Argument(help="The task id, or its first digits.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what a running task writes until it ends.")
    ] = False,
    timeout: QueryTimeoutOpt = QUERY_TIMEOUT_S,
    as_json: JsonOpt = False,
    master: MasterOpt = None,
) -> None:
    """What a task wrote to stdout and stderr and through logging (the last part its worker
    keeps); a cmd task's program output is in its result instead (ptask result)."""
    try:
        id_prefix(task_id)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE)
    client = make_client(master, timeout)
    try:
        if follow and not as_json:
            for piece in client.follow_logs(task_id):
                sys.stdout.write(piece)
                sys.stdout.flush()
            return
        reply = client.logs(task_id)
    except PoolfleetError as exc:
        _resolve_fail(exc)
    finally:
        client.close()
    if as_json:
        typer.echo(dumps({k: v for k, v in reply.items() if k != "req"}))
        return
    if reply["start"] > 0:
        typer.echo(f"(the first {reply['start']} characters were not kept)", err=True)
    sys.stdout.write(reply["output"])
    if reply["output"] and not reply["output"].endswith("\n"):
        sys.stdout.write("\n")
    if reply["state"] in OPEN_STATES and reply.get("progress"):
        typer.echo(f"(progress: {_progress_text(reply['progress'])})", err=True)


@queue_app.command("purge")
def queue_purge(
    queue: Annotated[str, typer.Argument(help="The queue.")],
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state", help="Tasks in this state (repeatable): PENDING (default), DISPATCHED, RUNNING."
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: QueryTimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Cancel the tasks of a queue (by default its pending ones), after saying how many and
    asking (unless --yes)."""
    states = [s.upper() for s in state or ["PENDING"]]
    bad = [s for s in states if s not in OPEN_STATES]
    if bad:
        fail(f"--state {bad[0]!r}: a purge takes PENDING, DISPATCHED or RUNNING", EXIT_USAGE)
    with asking(master, timeout) as client:
        count = client.purge_queue(queue, states, dry_run=True)
        if count == 0:
            typer.echo(f"queue {queue}: no {'/'.join(states)} tasks to purge")
            return
        if not yes and not typer.confirm(f"cancel {count} {'/'.join(states)} tasks of queue {queue}?"):
            raise typer.Exit(EXIT_REJECTED)
        done = client.purge_queue(queue, states)
    typer.echo(f"queue {queue}: {done} tasks cancelled")


def _worker_action(worker_id: str, action: str, timeout: float, master: str | None) -> None:
    with asking(master, timeout) as client:
        found = client.control_worker(worker_id, action)
    if not found:
        fail(f"no worker {worker_id!r} is connected (ptask workers lists them)", EXIT_REJECTED)
    typer.echo(f"worker {worker_id}: {'draining' if action == 'drain' else 'stopping'}")


@worker_app.command("drain")
def worker_drain(
    worker_id: Annotated[str, typer.Argument(help="The worker id, as ptask workers shows it.")],
    timeout: QueryTimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Stop a worker gracefully, as SIGTERM on its host: it takes no more tasks, hands back
    those it has not started, finishes the running ones and exits."""
    _worker_action(worker_id, "drain", timeout, master)


@worker_app.command("stop")
def worker_stop(
    worker_id: Annotated[str, typer.Argument(help="The worker id, as ptask workers shows it.")],
    timeout: QueryTimeoutOpt = 10.0,
    master: MasterOpt = None,
) -> None:
    """Stop a worker now, as a second SIGTERM on its host: what runs is abandoned and the
    master runs it again elsewhere."""
    _worker_action(worker_id, "stop", timeout, master)
