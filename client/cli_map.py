"""``ptask map``: run one task over a JSON Lines file, streaming, results in input order.

Memory stays bounded however long the input is: a reader thread parses lines
into a small bounded queue, at most ``--window`` tasks are in flight, and
finished results wait in a reorder buffer of at most ``--reorder-buffer``
entries for an earlier, slower one before they are written in input order.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from poolfleet.client.client import Client, TaskFuture, TaskOptions, task_name
from poolfleet.client.cliopts import (
    EXIT_REJECTED,
    EXIT_TASK_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    UNREACHABLE_HINT,
    MasterOpt,
    fail,
    make_client,
)
from poolfleet.client.output import dumps, jsonable, table
from poolfleet.common.errors import EncodeError, MasterUnreachable, PoolfleetError, RemoteError, TaskError
from poolfleet.common.protocol import ErrorCode

SUBMIT_BATCH = 500


class MapAbort(Exception):
    """Stop the whole run: the message is the one error line ptask prints."""

    def __init__(self, message: str, code: int, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


@dataclass(slots=True)
class Item:
    """One input line: a call to submit, or a record that is already final."""

    index: int
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None
    kept: bool = False


_EOF = object()


def _invalid(index: int, message: str) -> dict[str, Any]:
    return {
        "index": index,
        "state": "INVALID",
        "error": {"type": "InputError", "message": f"input line {index + 1}: {message}"},
    }


def parse_line(index: int, text: str) -> Item:
    """A JSON array is the positional arguments, a JSON object the keyword arguments."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Item(index, record=_invalid(index, f"not JSON: {exc}"))
    if isinstance(value, list):
        return Item(index, args=value)
    if isinstance(value, dict):
        return Item(index, kwargs=value)
    return Item(
        index,
        record=_invalid(
            index,
            f"expected a JSON array (arguments) or object (keyword arguments), not {type(value).__name__}",
        ),
    )


def read_previous(path: Path) -> Iterator[dict[str, Any]]:
    """Records of an earlier run's --out file, checked to be in increasing index order."""
    last = -1
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
                raise MapAbort(
                    f"{path} line {n} is not a ptask map result",
                    EXIT_USAGE,
                    "--retry-failed needs the --out file written by an earlier 'ptask map'",
                )
            if rec["index"] <= last:
                raise MapAbort(f"{path} line {n}: indices are out of order", EXIT_USAGE)
            last = rec["index"]
            yield rec


def iter_items(lines: Iterable[str], previous: Iterator[dict[str, Any]] | None) -> Iterator[Item]:
    """Items of the input; with ``previous``, items that succeeded there are kept as they were."""
    prev = next(previous, None) if previous is not None else None
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if previous is not None:
            while prev is not None and prev["index"] < index:
                prev = next(previous, None)
            if prev is not None and prev["index"] == index and prev.get("state") == "SUCCEEDED":
                yield Item(index, record=prev, kept=True)
                continue
        yield parse_line(index, line)


class Reader(threading.Thread):
    """Feeds parsed items into a bounded queue, so input is read only as fast as it is used."""

    def __init__(self, items: Iterator[Item], maxsize: int, wake: threading.Event) -> None:
        super().__init__(name="ptask-map-reader", daemon=True)
        self.items = items
        self.queue: queue.Queue[object] = queue.Queue(maxsize)
        self.wake = wake

    def run(self) -> None:
        try:
            for item in self.items:
                self.queue.put(item)
                self.wake.set()
            self.queue.put(_EOF)
        except MapAbort as exc:
            self.queue.put(exc)
        except (OSError, UnicodeDecodeError) as exc:
            self.queue.put(MapAbort(f"cannot read the input: {exc}", EXIT_USAGE))
        self.wake.set()


class Mapper:
    """Submits items through a bounded window and writes their results in input order."""

    def __init__(
        self,
        client: Client,
        name: str,
        options: TaskOptions,
        out: IO[str],
        window: int,
        reorder: int,
        ack_timeout: float,
        progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.options = options
        self.out = out
        self.window = window
        self.reorder = reorder
        self.ack_timeout = ack_timeout
        self.progress = progress
        self.bar = progress.add_task("", total=None) if progress is not None else None
        self.wake = threading.Event()
        self.order: deque[int] = deque()
        self.ready: dict[int, dict[str, Any]] = {}
        self.inflight: dict[int, TaskFuture] = {}
        self.done: queue.SimpleQueue[tuple[int, TaskFuture]] = queue.SimpleQueue()
        self.acks: deque[tuple[float, Future[dict[str, Any]]]] = deque()
        self.states: dict[str, int] = {}
        self.retried = 0
        self.submitted = 0
        self.kept = 0
        self.peak_pending = 0

    @property
    def written(self) -> int:
        return sum(self.states.values())

    @property
    def failed(self) -> int:
        return self.written - self.states.get("SUCCEEDED", 0)

    def run(self, reader: Reader) -> None:
        eof = False
        while True:
            self.wake.clear()
            self._collect()
            if not eof:
                eof = self._fill(reader.queue)
            self._write()
            if eof and not self.order:
                return
            self._check_acks()
            self.wake.wait(0.25)

    # -- submitting --------------------------------------------------------------
    def _fill(self, source: queue.Queue[object]) -> bool:
        """Take items while there is room; returns True once the input is exhausted."""
        free = self.window - len(self.inflight)
        if self.inflight and free < min(SUBMIT_BATCH, max(1, self.window // 4)):
            return False  # submit in batches, not one task per message
        batch: list[Item] = []
        try:
            while free > len(batch) and len(self.order) < self.window + self.reorder:
                try:
                    item = source.get_nowait()
                except queue.Empty:
                    return False
                if item is _EOF:
                    return True
                if isinstance(item, MapAbort):
                    raise item
                assert isinstance(item, Item)
                self.order.append(item.index)
                if item.record is not None:
                    self.ready[item.index] = item.record
                    self.kept += item.kept
                    continue
                batch.append(item)
                if len(batch) >= SUBMIT_BATCH:
                    self._submit(batch)
                    free -= len(batch)
                    batch = []
            return False
        finally:
            self._submit(batch)
            self.peak_pending = max(self.peak_pending, len(self.order))

    def _submit(self, batch: list[Item]) -> None:
        if not batch:
            return
        try:
            futures = self.client.submit_many(
                self.name, [(it.args, it.kwargs) for it in batch], options=self.options, wait=True
            )
        except EncodeError:
            for it in batch:  # find the lines msgpack cannot take; submit the others
                try:
                    fut = self.client.submit_many(self.name, [(it.args, it.kwargs)], options=self.options)
                except EncodeError as exc:
                    self.ready[it.index] = _invalid(it.index, str(exc))
                else:
                    self._track([it], fut)
            return
        self._track(batch, futures)

    def _track(self, batch: list[Item], futures: list[TaskFuture]) -> None:
        self.submitted += len(batch)
        for it, fut in zip(batch, futures, strict=True):
            self.inflight[it.index] = fut
            fut.add_done_callback(partial(self._on_done, it.index))
        ack = futures[0].ack
        if ack is not None:
            self.acks.append((time.monotonic(), ack))

    def _on_done(self, index: int, fut: Future[Any]) -> None:
        assert isinstance(fut, TaskFuture)
        self.done.put((index, fut))
        self.wake.set()

    def _check_acks(self) -> None:
        while self.acks and self.acks[0][1].done():
            self.acks.popleft()
        if self.acks and time.monotonic() - self.acks[0][0] > self.ack_timeout:
            raise MapAbort(
                f"master at {self.client.master} did not acknowledge the submitted tasks "
                f"within {self.ack_timeout} s",
                EXIT_UNREACHABLE,
                UNREACHABLE_HINT,
            )

    # -- results -----------------------------------------------------------------
    def _collect(self) -> None:
        while True:
            try:
                index, fut = self.done.get_nowait()
            except queue.Empty:
                return
            self.inflight.pop(index, None)
            self.ready[index] = self._record(index, fut)

    def _record(self, index: int, fut: TaskFuture) -> dict[str, Any]:
        exc = fut.exception()
        rec: dict[str, Any] = {"index": index}
        if exc is None:
            rec["state"] = "SUCCEEDED"
            rec["result"] = jsonable(fut.result())
        elif isinstance(exc, TaskError):
            rec["state"] = exc.state
            rec["error"] = {"type": exc.type, "message": exc.message, "traceback": exc.traceback}
        elif isinstance(exc, RemoteError):
            if exc.code == ErrorCode.UNKNOWN_TASK:
                raise MapAbort(exc.message, EXIT_REJECTED, "see 'ptask workers' and the workers' --tasks")
            rec["state"] = "REJECTED"
            rec["error"] = {"type": "Rejected", "code": exc.code, "message": exc.message}
        elif isinstance(exc, MasterUnreachable):
            raise MapAbort(str(exc), EXIT_UNREACHABLE, UNREACHABLE_HINT)
        else:
            rec["state"] = "FAILED"
            rec["error"] = {"type": type(exc).__name__, "message": str(exc)}
        attempt = fut.info.get("attempt")
        if isinstance(attempt, int):
            rec["attempt"] = attempt
            if attempt > 1:
                self.retried += 1
        rec["id"] = fut.task_id
        return rec

    def _write(self) -> None:
        wrote = 0
        while self.order and self.order[0] in self.ready:
            rec = self.ready.pop(self.order.popleft())
            self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            state = str(rec.get("state"))
            self.states[state] = self.states.get(state, 0) + 1
            wrote += 1
        if not wrote:
            return
        self.out.flush()
        if self.progress is not None and self.bar is not None:
            ok = self.states.get("SUCCEEDED", 0)
            self.progress.update(
                self.bar, advance=wrote, description=f"{self.name}  ok {ok}  failed {self.written - ok}"
            )

    def cancel_inflight(self) -> int:
        """Best effort: cancel the tasks still running on the cluster (after an interrupt).

        The progress bar stops first: its last frame is drawn, and the message that follows
        goes below it, never under a later frame."""
        if self.progress is not None:
            self.progress.stop()
        ids = [f.task_id for f in self.inflight.values()]
        for i in range(0, len(ids), 1000):
            try:
                self.client.cancel(ids[i : i + 1000], timeout_s=5)
            except PoolfleetError:
                break
        return len(ids)


class RateColumn(ProgressColumn):
    """Items per second."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "?/s", style="progress.data.speed")


def count_items(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _open_input(source: str, stack: ExitStack) -> tuple[Iterable[str], Path | None]:
    if source == "-":
        return sys.stdin, None
    path = Path(source)
    try:
        fh = stack.enter_context(path.open(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read --from {source}: {exc.strerror or exc}", EXIT_USAGE, "give a JSON Lines file or -")
    return fh, path


def map_command(
    task: Annotated[str, typer.Argument(help="The task, as module:function.")],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="JSON Lines input, - for standard input. Each line is an array of arguments "
            "or an object of keyword arguments.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the results to this file instead of standard output."),
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Rerun only the items that failed (or are missing) in the --out file of an earlier "
            "run, keep the rest, and rewrite that file merged.",
        ),
    ] = False,
    kind: Annotated[str | None, typer.Option(help="cpu or io (default: the task's own).")] = None,
    queue_name: Annotated[str | None, typer.Option("--queue", help="Queue to submit to [default].")] = None,
    task_timeout: Annotated[
        float | None, typer.Option("--task-timeout", help="Seconds each task may run.")
    ] = None,
    retries: Annotated[int | None, typer.Option(help="Retries of a failing task.")] = None,
    window: Annotated[int, typer.Option(min=1, help="Most tasks in flight at once.")] = 1000,
    reorder_buffer: Annotated[
        int, typer.Option(min=0, help="Most finished results held back, waiting for an earlier one.")
    ] = 10000,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="Progress bar on standard error [on when it is a terminal]."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the master to acknowledge a submit.")
    ] = 30.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help='End with a {"summary": ...} JSON line on standard output instead of a table.'
        ),
    ] = False,
    master: MasterOpt = None,
) -> None:
    """Run a task once per line of a JSON Lines file; write results in input order.

    Result lines look like {"index": 0, "state": "SUCCEEDED", "result": ...} or
    {"index": 3, "state": "FAILED", "error": {"type": ..., "message": ..., "traceback": ...}};
    index is the 0-based line number of the input (blank lines are skipped). A summary
    (succeeded, failed, retried, elapsed) goes to standard error, or with --json as a
    final {"summary": {...}} line on standard output. Exit status 1 if any item failed.

    Example: ptask map mymod:resize --from jobs.jsonl --out results.jsonl
    """
    try:
        name = task_name(task)
    except PoolfleetError as exc:
        fail(str(exc), EXIT_USAGE, "name the task as module:function")
    if kind is not None and kind not in ("cpu", "io"):
        fail(f"--kind must be cpu or io, not {kind!r}", EXIT_USAGE, "use 'ptask run' for programs")
    if retry_failed and (out is None or not out.is_file()):
        fail(
            "--retry-failed needs --out FILE, the results file of an earlier run",
            EXIT_USAGE,
            "run once with --out FILE, then again with --out FILE --retry-failed",
        )
    show = sys.stderr.isatty() if progress is None else progress
    options = TaskOptions(kind=kind, queue=queue_name, timeout_s=task_timeout, retries=retries)
    started = time.monotonic()
    with ExitStack() as stack:
        lines, in_path = _open_input(source, stack)
        previous = read_previous(out) if retry_failed and out is not None else None
        target: IO[str] = sys.stdout
        tmp: Path | None = None
        if out is not None:
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp") if retry_failed else None
            try:
                target = stack.enter_context((tmp or out).open("w", encoding="utf-8"))
            except OSError as exc:
                fail(f"cannot write --out {out}: {exc.strerror or exc}", EXIT_USAGE)
        bar: Progress | None = None
        if show:
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True, force_terminal=True if progress else None),
                transient=False,
            )
            stack.enter_context(bar)
        client = make_client(master, timeout)
        stack.callback(client.close)
        mapper = Mapper(client, name, options, target, window, reorder_buffer, timeout, bar)
        if bar is not None and mapper.bar is not None:
            bar.update(mapper.bar, description=name, total=count_items(in_path) if in_path else None)
        reader = Reader(iter_items(lines, previous), max(2 * SUBMIT_BATCH, 16), mapper.wake)
        reader.start()
        try:
            mapper.run(reader)
        except MapAbort as exc:
            mapper.cancel_inflight()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            fail(exc.message, exc.code, exc.hint)
        except BrokenPipeError:
            mapper.cancel_inflight()
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's final flush
            raise typer.Exit(EXIT_TASK_FAILED) from None
        except KeyboardInterrupt:
            n = mapper.cancel_inflight()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            fail(
                f"interrupted after {mapper.written} results; cancelled {n} running tasks",
                130,
                "run again with --out FILE --retry-failed to finish the rest"
                if out is not None and not retry_failed
                else "",
            )
        if tmp is not None and out is not None:
            target.close()
            os.replace(tmp, out)
    _summary(mapper, name, out, time.monotonic() - started, as_json, source)
    if mapper.failed:
        raise typer.Exit(EXIT_TASK_FAILED)


def _summary(mapper: Mapper, name: str, out: Path | None, elapsed: float, as_json: bool, source: str) -> None:
    doc: dict[str, Any] = {
        "task": name,
        "items": mapper.written,
        "succeeded": mapper.states.get("SUCCEEDED", 0),
        "failed": mapper.failed,
        "retried": mapper.retried,
        "submitted": mapper.submitted,
        "kept": mapper.kept,
        "elapsed_s": round(elapsed, 3),
        "states": dict(sorted(mapper.states.items())),
        "out": str(out) if out is not None else None,
    }
    if as_json:
        typer.echo(dumps({"summary": doc}))
        return
    typer.echo(
        table(
            ["task", "items", "succeeded", "failed", "retried", "elapsed"],
            [[name, doc["items"], doc["succeeded"], doc["failed"], doc["retried"], f"{elapsed:.1f} s"]],
        ),
        err=True,
    )
    if mapper.failed:
        if out is not None:
            hint = f"ptask map {name} --from {source} --out {out} --retry-failed"
            typer.echo(f"{mapper.failed} items failed; rerun only those with: {hint}", err=True)
        else:
            typer.echo(f"{mapper.failed} items failed; write results with --out FILE to rerun them", err=True)
