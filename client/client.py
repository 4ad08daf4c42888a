"""The Python client: submit tasks, get concurrent.futures.Future objects back."""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import Any

from poolfleet.client import chunks, remote
from poolfleet.client.connection import Connection
from poolfleet.common import codec
from poolfleet.common.errors import (
    MasterUnreachable,
    PoolfleetError,
    RemoteError,
    TaskError,
)
from poolfleet.common.ids import ID_FORM, format_id, new_task_ids, parse_id
from poolfleet.common.protocol import CMD_TASK_NAME, Kind, MsgKind, TaskState

DEFAULT_MASTER = "tcp://127.0.0.1:5555"


def task_name(fn: Callable[..., Any] | str) -> str:
    """``module:function`` for a function object (or a name, checked for shape)."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise PoolfleetError(f"task name {fn!r} must look like module:function")
        return fn
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname:
        raise PoolfleetError(f"{fn!r} is not a function; pass a module-level function or 'module:function'")
    if module == "__main__":
        raise PoolfleetError(
            f"function {qualname!r} is defined in __main__, which workers cannot import. "
            f"Move it into a module (for example mytasks.py), start the workers with "
            f"--tasks mytasks, and import it from there."
        )
    if "<" in qualname or "." in qualname:
        raise PoolfleetError(
            f"function {qualname!r} in {module} is not a module-level function "
            "(lambdas, nested functions and methods cannot run on workers)"
        )
    if inspect.isbuiltin(fn):
        raise PoolfleetError(f"{module}.{qualname} is a built-in; wrap it in a function of a task module")
    return f"{module}:{qualname}"


#: ``submit_many`` sends a big batch in parts: this many tasks first, then twice as many each
#: time. The first part is on its way while the rest is being built.
FIRST_PART = 64
#: How long ``submit_many`` waits for a part to leave before building the next.
PART_WAIT_S = 0.01


@dataclass(frozen=True)
class TaskOptions:
    """Per-call options; None leaves the task's own default."""

    kind: str | None = None
    queue: str | None = None
    timeout_s: float | None = None
    retries: int | None = None

    def apply(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self.kind is not None:
            entry["kind"] = Kind(self.kind).value
        if self.queue is not None:
            entry["queue"] = self.queue
        if self.timeout_s is not None:
            entry["timeout_s"] = float(self.timeout_s)
        if self.retries is not None:
            entry["retries"] = int(self.retries)
        return entry


class TaskFuture(Future[Any]):
    """A Future for one task; ``task_id`` is its id, ``cancel()`` also cancels it on the cluster."""

    def __init__(self, task_id: bytes, name: str, client: Client) -> None:
        super().__init__()
        self.id_bytes = task_id
        self.name = name
        self._client = client
        self.info: dict[str, Any] = {}
        self.ack: Future[dict[str, Any]] | None = None
        #: the latest progress report pushed by the master: {fraction, message, at}, or None
        self.progress: dict[str, Any] | None = None
        self._progress_callbacks: list[Callable[[TaskFuture], Any]] = []

    @property
    def task_id(self) -> str:
        """The id in its text form (made when asked: most futures are never asked)."""
        return format_id(self.id_bytes)

    def cancel(self) -> bool:
        if self.done():
            return False
        try:
            self._client._cancel_async([self.id_bytes])
        except PoolfleetError:  # closed or broken: cancelled here all the same
            pass
        return super().cancel()

    def add_progress_callback(self, fn: Callable[[TaskFuture], Any]) -> None:
        """Call ``fn(future)`` at each progress report the task makes (``future.progress``
        holds it), on the client's connection thread: keep it short. Reports arrive throttled
        (at most five a second) and may be dropped under load; the last one is also in
        ``logs()`` and in the master's TASK_SHOW."""
        self._progress_callbacks.append(fn)

    def _progressed(self, report: dict[str, Any]) -> None:
        self.progress = report
        for fn in list(self._progress_callbacks):
            try:
                fn(self)
            except Exception:
                import logging

                logging.getLogger("poolfleet.client").exception("progress callback failed")

    def logs(self, timeout_s: float | None = None) -> str:
        """What the task has written so far (stdout, stderr, logging), the last part the worker
        keeps; complete once the task is final."""
        return str(self._client.logs(self.task_id, timeout_s=timeout_s)["output"])

    def __repr__(self) -> str:
        return f"<TaskFuture {self.task_id} {self.name} {self._state}>"


def outcome(entry: dict[str, Any]) -> tuple[Any, TaskError | None]:
    """Turn a result entry into (value, None) or (None, the task's exception).

    The exception keeps the remote type where the client can name it (see
    ``poolfleet.client.remote``), and is always a TaskError.
    """
    state = entry.get("state")
    if state == TaskState.SUCCEEDED:
        value = entry.get("value")
        return (codec.unpack(value) if value is not None else None), None
    return None, remote.from_entry(entry)


#: How long ``shutdown`` waits for the master to confirm cancels before closing the connection.
CANCEL_CONFIRM_S = 5.0
#: Task ids per CANCEL request.
CANCEL_BATCH = 500


@dataclass
class _Shared:
    """What a client and its ``with_options`` views share."""

    conn: Connection
    futures: dict[bytes, TaskFuture] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    shutdown: bool = False
    closed: bool = False


class Client(Executor):
    """Connection to a pmaster for submitting tasks and following their results.

    A ``concurrent.futures.Executor``: ``submit``, ``map`` (with ``timeout`` counted from the
    call and ``chunksize``), ``shutdown`` and the context manager, which waits for the
    futures still pending when it exits.

    ``master`` defaults to the ``POOLFLEET_MASTER`` entry of ``env`` (the process
    environment unless given), then ``tcp://127.0.0.1:5555``.
    """

    def __init__(
        self,
        master: str | None = None,
        *,
        timeout_s: float = 30.0,
        options: TaskOptions | None = None,
        env: Mapping[str, str] | None = None,
        curve_server_key: str | None = None,
        curve_secret_key: str | None = None,
        _shared: Client | None = None,
    ) -> None:
        self.options = options or TaskOptions()
        self.timeout_s = timeout_s
        self.master: str
        self._shared: _Shared
        if _shared is not None:
            self.master = _shared.master
            self._shared = _shared._shared
            self._owner = False
            return
        if master is None:
            import os

            master = (env if env is not None else os.environ).get("POOLFLEET_MASTER") or DEFAULT_MASTER
        self.master = master
        self._owner = True
        conn = Connection(
            master, self._on_result, curve_server_key=curve_server_key, curve_secret_key=curve_secret_key
        )
        conn.on_progress = self._on_progress
        self._shared = _Shared(conn)

    @property
    def _conn(self) -> Connection:
        return self._shared.conn

    @property
    def _futures(self) -> dict[bytes, TaskFuture]:
        return self._shared.futures

    @property
    def _lock(self) -> threading.Lock:
        return self._shared.lock

    # -- lifetime --------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def close(self) -> None:
        """The same as ``shutdown(wait=False)``: no more submits; the connection closes in the
        background once the pending futures have their results (``with`` waits for them)."""
        self.shutdown(wait=False)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits (they raise RuntimeError); disconnect once every future is done.

        ``wait``: return only then; otherwise at once, the connection staying open in the
        background until the last pending future has its result. ``cancel_futures``: cancel
        the pending futures first, on the cluster too. A view made by ``with_options`` shuts
        down the client it belongs to.
        """
        sh = self._shared
        with sh.lock:
            sh.shutdown = True
            pending = [f for f in sh.futures.values() if not f.done()]
        confirms: list[Future[dict[str, Any]]] = []
        if cancel_futures and pending:
            confirms = self._cancel_futures(pending)
        if wait or not (pending or confirms):
            self._close_when_done(confirms)
        else:
            threading.Thread(
                target=self._close_when_done, args=(confirms,), name="poolfleet-client-shutdown", daemon=True
            ).start()

    def _close_when_done(self, confirms: list[Future[dict[str, Any]]]) -> None:
        sh = self._shared
        while True:
            with sh.lock:
                pending = [f for f in sh.futures.values() if not f.done()]
            if not pending:
                break
            wait_futures(pending)
        # cancel requests must reach the master before the socket goes (it does not linger)
        deadline = time.monotonic() + CANCEL_CONFIRM_S
        for c in confirms:
            try:
                c.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - unconfirmed: the connection closes all the same
                pass
        with sh.lock:
            if sh.closed:
                return
            sh.closed = True
        sh.conn.close()

    def _check_open(self) -> None:
        if self._shared.shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _cancel_futures(self, futures: list[TaskFuture]) -> list[Future[dict[str, Any]]]:
        """Cancel these futures here and their tasks on the cluster, in few requests."""
        ids = [f.id_bytes for f in futures if not f.done()]
        confirms = []
        for i in range(0, len(ids), CANCEL_BATCH):
            try:
                confirms.append(self._conn.request(MsgKind.CANCEL, {"ids": ids[i : i + CANCEL_BATCH]}))
            except MasterUnreachable:
                break
        for f in futures:
            Future.cancel(f)
        return confirms

    def with_options(
        self,
        *,
        kind: str | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> Client:
        """A view of this client whose submits carry these task options."""
        o = self.options
        opts = replace(
            o,
            kind=kind if kind is not None else o.kind,
            queue=queue if queue is not None else o.queue,
            timeout_s=timeout_s if timeout_s is not None else o.timeout_s,
            retries=retries if retries is not None else o.retries,
        )
        return Client(options=opts, timeout_s=self.timeout_s, _shared=self)

    # -- submitting ------------------------------------------------------------
    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on the cluster; options come from ``with_options``.

        After ``shutdown`` (or leaving ``with``) it raises RuntimeError, as executors do.
        """
        return self.submit_many(fn, [(args, kwargs)])[0]

    def submit_chunks(
        self,
        fn: Callable[..., Any] | str,
        parts: Iterable[list[Any]],
        size: int,
        *,
        options: TaskOptions | None = None,
        star: bool = True,
    ) -> list[TaskFuture]:
        """Submit each list in ``parts`` as one task: a chunk of at most ``size`` calls of ``fn``.

        With ``star`` the items are argument tuples (``fn(*item)``), otherwise single arguments
        (``fn(item)``). Each future's result is the list of its calls' results. Each chunk
        leaves as soon as it is encoded, so the first ones run while the rest are being built;
        if one cannot be encoded, those already sent are cancelled and the error raised.
        """
        self._check_open()
        name = task_name(fn)
        opts = chunks.chunk_options(options or self.options, fn, size)
        chunk_name = chunks.CHUNK_TASK_NAME if star else chunks.MAP_CHUNK_TASK_NAME
        futures: list[TaskFuture] = []
        try:
            for part in parts:
                payload = codec.pack_call((name, part), {})
                tid = new_task_ids(1)[0]
                entry = opts.apply({"id": tid, "name": chunk_name, "payload": payload})
                futures += self._send([entry], [TaskFuture(tid, chunk_name, self)], True)
        except BaseException:
            if futures:
                self._cancel_futures(futures)
            raise
        return futures

    def submit_many(
        self,
        fn: Callable[..., Any] | str,
        calls: Iterable[tuple[tuple[Any, ...] | list[Any], dict[str, Any]]],
        *,
        options: TaskOptions | None = None,
        wait: bool = True,
    ) -> list[TaskFuture]:
        """Submit many calls of one function in one go; returns their futures in order.

        Every call's arguments are encoded before anything is sent, so a bad one raises and
        submits nothing. A big batch then leaves in parts of growing size (``FIRST_PART``,
        doubling), so that the cluster starts on the first tasks while the rest are built.
        """
        self._check_open()
        name = task_name(fn)
        opts = options or self.options
        payloads = [codec.pack_call(args, kwargs) for args, kwargs in calls]
        ids = new_task_ids(len(payloads))
        futures: list[TaskFuture] = []
        start, size = 0, FIRST_PART
        while True:
            part = ids[start : start + size]
            entries = [
                opts.apply({"id": tid, "name": name, "payload": p})
                for tid, p in zip(part, payloads[start : start + size], strict=True)
            ]
            futures += self._send(entries, [TaskFuture(tid, name, self) for tid in part], wait)
            start += size
            if start >= len(ids):
                return futures
            # Let the connection thread send this part before building the next: it cannot
            # while this thread holds the GIL, and the master starts on it meanwhile.
            self._conn.mark().wait(PART_WAIT_S)
            size *= 2

    def run(
        self,
        argv: list[str],
        *,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> TaskFuture:
        """Run an external program on a worker that allows it (kind cmd).

        The result is a map with ``exit_code``, ``stdout`` and ``stderr``.
        """
        if not argv or not all(isinstance(a, str) for a in argv):
            raise PoolfleetError("argv must be a non-empty list of strings")
        kwargs: dict[str, Any] = {"argv": list(argv)}
        if stdin is not None:
            kwargs["stdin"] = stdin
        if env:
            kwargs["env"] = dict(env)
        if cwd:
            kwargs["cwd"] = cwd
        return self.with_options(kind="cmd").submit(CMD_TASK_NAME, **kwargs)

    def _send(self, entries: list[dict[str, Any]], futures: list[TaskFuture], wait: bool) -> list[TaskFuture]:
        if wait:
            # awaiting a result; without wait nothing is pushed, and such a future only
            # reports the acknowledgement (``ack``), or a rejection
            with self._lock:
                for f in futures:
                    self._futures[f.id_bytes] = f
        ack = self._conn.submit(entries, wait)
        for f in futures:
            f.ack = ack
        ack.add_done_callback(lambda a: self._acked(a, futures))
        return futures

    def _acked(self, ack: Future[dict[str, Any]], futures: list[TaskFuture]) -> None:
        exc = ack.exception()
        if exc is not None:
            for f in futures:
                self._fail(f, exc)
            return
        _warn_unserved(ack.result())
        rejected = {r.get("id"): r for r in ack.result().get("rejected", [])}
        if not rejected:
            return
        for f in futures:
            r = rejected.get(f.id_bytes)
            if r is not None:
                self._fail(f, RemoteError(str(r.get("code")), str(r.get("message"))))

    def _fail(self, f: TaskFuture, exc: BaseException) -> None:
        with self._lock:
            self._futures.pop(f.id_bytes, None)
        if not f.done() and f.set_running_or_notify_cancel():
            f.set_exception(exc)

    def _on_result(self, entry: dict[str, Any]) -> None:
        tid = entry.get("id")
        with self._lock:
            f = self._futures.pop(tid, None) if isinstance(tid, bytes) else None
        if f is None or f.done():
            return
        f.info = {k: v for k, v in entry.items() if k not in ("value",)}
        try:
            value, err = outcome(entry)
        except PoolfleetError as exc:  # a result this client cannot decode still ends the future
            value, err = None, TaskError(f.task_id, "FAILED", type(exc).__name__, str(exc))
        if not f.set_running_or_notify_cancel():
            return
        if err is not None:
            f.set_exception(err)
        else:
            f.set_result(value)

    def _on_progress(self, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            tid = entry.get("id")
            with self._lock:
                f = self._futures.get(tid) if isinstance(tid, bytes) else None
            if f is not None and not f.done():
                f._progressed({k: entry.get(k) for k in ("fraction", "message", "at")})

    # -- mapping ---------------------------------------------------------------
    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """concurrent.futures.Executor.map: results in order.

        Every call is submitted at once; ``timeout`` counts from this call, and when it passes
        (or the iterator is closed early, or a call fails) the calls not yet done are cancelled.
        ``chunksize`` > 1 sends that many calls as one task, as ProcessPoolExecutor does.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)
        futures: list[TaskFuture]
        if chunksize == 1:
            futures = self.submit_many(fn, [(args, {}) for args in calls])
        else:
            futures = self.submit_chunks(fn, chunks.chunked(calls, chunksize), chunksize)

        def gen() -> Iterator[Any]:
            fs = list(reversed(futures))
            try:
                while fs:
                    f = fs[-1]
                    value = f.result(None if end is None else max(0.0, end - time.monotonic()))
                    fs.pop()
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                if fs:
                    self._cancel_futures(fs)

        return gen()

    # -- queries ---------------------------------------------------------------
    def _call(self, kind: MsgKind, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        fut = self._conn.request(kind, body)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply: dict[str, Any] = fut.result(limit)
        except FutureTimeout:
            raise MasterUnreachable(f"no answer from the master at {self.master} within {limit} s") from None
        return reply

    def status(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Task counts by state, queue depth by queue and kind, workers connected."""
        return self._call(MsgKind.STATUS, {}, timeout_s)

    def functions(self, timeout_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Every task name the connected workers offer: ``{name: {workers, kind, retries,
        timeout_s}}`` (how many workers offer it, and its declared defaults)."""
        return dict(self._call(MsgKind.WORKERS, {}, timeout_s).get("functions") or {})

    def workers(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """The connected workers with their slots and last heartbeat."""
        return list(self._call(MsgKind.WORKERS, {}, timeout_s)["workers"])

    def results(self, task_ids: list[str], timeout_s: float | None = None) -> dict[str, Any]:
        """Current state (and result, when final) of tasks by id, without waiting."""
        ids = [parse_id(t) for t in task_ids]
        reply = self._call(MsgKind.RESULT_GET, {"ids": ids}, timeout_s)
        out: dict[str, Any] = {format_id(e["id"]): e for e in reply["results"]}
        for tid in reply.get("unknown", []):
            out[format_id(tid)] = None
        return out

    def future(self, task_id: str) -> TaskFuture:
        """A future for a task submitted earlier (by anyone), pushed its result when it lands."""
        tid = parse_id(task_id)
        with self._lock:
            known = self._futures.get(tid)
            f = known if known is not None else TaskFuture(tid, "?", self)
            self._futures[tid] = f
        reply = self._conn.watch([tid])

        def check(r: Future[dict[str, Any]]) -> None:
            exc = r.exception()
            if exc is not None:
                self._fail(f, exc)
            elif tid in r.result().get("unknown", []):
                self._fail(
                    f,
                    RemoteError(
                        "unknown_id",
                        f"no task {task_id} on the master (never submitted, or its result expired)",
                    ),
                )

        reply.add_done_callback(check)
        return f

    def cancel(self, task_ids: list[str], timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Cancel tasks: pending ones are removed, running ones stopped by kind."""
        reply = self._call(MsgKind.CANCEL, {"ids": [parse_id(t) for t in task_ids]}, timeout_s)
        return list(reply["results"])

    def _cancel_async(self, ids: list[bytes]) -> None:
        self._conn.request(MsgKind.CANCEL, {"ids": ids})

    # -- inspection and control --------------------------------------------------------
    def tasks(
        self,
        *,
        states: Iterable[str] = (),
        name: str | None = None,
        queue: str | None = None,
        worker: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 50,
        timeout_s: float | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tasks, newest first, matching every filter given: (at most ``limit`` entries, the
        cursor to pass as ``before`` for the next page, or None after the last one).

        ``since`` is a Unix time (tasks whose id was made at or after it). Entries keep the
        wire form (``id`` as 16 bytes); the master reads its journal a window at a time, so one
        page may take several requests.
        """
        body: dict[str, Any] = {"limit": limit}
        if states:
            body["states"] = [TaskState(s.upper()).value for s in states]
        for key, value in (("name", name), ("queue", queue), ("worker", worker), ("since", since)):
            if value is not None:
                body[key] = value
        cursor = None if before is None else parse_id(before)
        out: list[dict[str, Any]] = []
        while True:
            if cursor is not None:
                body["before"] = cursor
            body["limit"] = limit - len(out)
            reply = self._call(MsgKind.TASKS, dict(body), timeout_s)
            out += reply["tasks"]
            cursor = reply.get("next")
            if cursor is None or len(out) >= limit:
                return out, None if cursor is None else format_id(cursor)

    def resolve(self, texts: list[str], timeout_s: float | None = None) -> list[str]:
        """Full ids (the 36-character form) for ids or unique id prefixes, in order.

        Raises PoolfleetError naming the text that matches no task, or more than one."""
        prefixes = [id_prefix(t) for t in texts]
        short = sorted({p for p in prefixes if len(p) < 32})
        found: dict[str, dict[str, Any]] = {}
        if short:
            reply = self._call(MsgKind.RESOLVE, {"prefixes": short}, timeout_s)
            found = {e["prefix"]: e for e in reply["ids"]}
        out = []
        for text, p in zip(texts, prefixes, strict=True):
            if len(p) == 32:
                out.append(format_id(bytes.fromhex(p)))
                continue
            e = found.get(p, {})
            if e.get("id") is None:
                if e.get("matches", 0) > 1:
                    raise AmbiguousId(f"id prefix {text!r} matches more than one task; give more digits")
                raise UnknownId(f"no task id starts with {text!r} (never submitted, or its result expired)")
            out.append(format_id(e["id"]))
        return out

    def show(self, task_id: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """Everything the master keeps of one task (id or unique prefix), or None if unknown."""
        tid = parse_id(self.resolve([task_id], timeout_s)[0])
        task: dict[str, Any] | None = self._call(MsgKind.TASK_SHOW, {"id": tid}, timeout_s).get("task")
        return task

    def retry(self, task_ids: list[str], timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Submit failed, timed out or cancelled tasks again, each as a new task with the same
        name, queue, kind, options and arguments; one entry per task with its ``outcome``
        (``retried`` with ``new_id``, ``refused`` or ``unknown``, with a ``message``)."""
        ids = [parse_id(t) for t in self.resolve(task_ids, timeout_s)]
        refs = [{"id": t, "new_id": n} for t, n in zip(ids, new_task_ids(len(ids)), strict=True)]
        return list(self._call(MsgKind.TASK_RETRY, {"tasks": refs}, timeout_s)["results"])

    def pause_queue(self, queue: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Dispatch nothing more from ``queue`` (pending tasks stay; running ones finish)."""
        return self._call(MsgKind.QUEUE_CONTROL, {"queue": queue, "action": "pause"}, timeout_s)

    def resume_queue(self, queue: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Dispatch from ``queue`` again."""
        return self._call(MsgKind.QUEUE_CONTROL, {"queue": queue, "action": "resume"}, timeout_s)

    def purge_queue(
        self,
        queue: str,
        states: list[str] | None = None,
        dry_run: bool = False,
        timeout_s: float | None = None,
    ) -> int:
        """Cancel every task of ``queue`` in ``states`` (default PENDING); the number cancelled
        (with ``dry_run``, that would be, changing nothing)."""
        body: dict[str, Any] = {"queue": queue, "dry_run": dry_run}
        if states:
            body["states"] = states
        return int(self._call(MsgKind.QUEUE_PURGE, body, timeout_s)["count"])

    def control_worker(self, worker_id: str, action: str, timeout_s: float | None = None) -> bool:
        """Ask a worker to ``drain`` (as a SIGTERM on its host) or ``stop`` (as a second one);
        False if no such worker is registered."""
        reply = self._call(MsgKind.WORKER_CONTROL, {"worker": worker_id, "action": action}, timeout_s)
        return bool(reply["found"])

    def logs(self, task_id: str, after: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
        """A task's output after offset ``after`` (TASK_LOGS_REPLY: ``output``, ``start``,
        ``end``, ``state``, ``final``, ``progress``); UnknownId if there is no such task."""
        tid = parse_id(self.resolve([task_id], timeout_s)[0])
        reply = self._call(MsgKind.TASK_LOGS, {"id": tid, "after": after}, timeout_s)
        if not reply.get("found"):
            raise UnknownId(f"no task {task_id}")
        return reply

    def follow_logs(self, task_id: str, poll_s: float = 0.5, timeout_s: float | None = None) -> Iterator[str]:
        """The output of a task as it is written, piece by piece, until the task is final."""
        tid = format_id(parse_id(self.resolve([task_id], timeout_s)[0]))
        after = 0
        while True:
            reply = self.logs(tid, after, timeout_s)
            if reply["end"] < after:  # a new attempt began: its output from the start
                reply = self.logs(tid, 0, timeout_s)
            if reply["output"]:
                yield str(reply["output"])
            after = int(reply["end"])
            if reply["final"]:
                return
            time.sleep(poll_s)


class UnservedQueueWarning(UserWarning):
    """Tasks were submitted to a queue no connected worker serves: they wait for one."""


def _warn_unserved(reply: dict[str, Any]) -> None:
    """Warn of tasks submitted to queues no connected worker serves (a SUBMITTED's ``unserved``)."""
    unserved = reply.get("unserved")
    if not unserved:
        return
    text = unserved_text(unserved, reply.get("served") or [])
    try:
        warnings.warn(text, UnservedQueueWarning, stacklevel=2)
    except Warning:  # warnings made errors: raising in the connection's thread helps nobody
        import logging

        logging.getLogger("poolfleet.client").warning(text)


def unserved_text(unserved: list[str], served: list[str]) -> str:
    names = ", ".join(unserved)
    there = ", ".join(served) if served else "none (no worker is connected)"
    return f"no connected worker serves queue {names}: the tasks wait for one; served queues: {there}"


class UnknownId(PoolfleetError):
    """No task has this id (or id prefix)."""


class AmbiguousId(PoolfleetError):
    """More than one task id starts with this prefix."""


def id_prefix(text: str) -> str:
    """The hex digits of a task id or id prefix (dashes dropped, lower case); raises
    PoolfleetError for anything else."""
    digits = text.strip().replace("-", "").lower()
    if not digits or len(digits) > 32 or any(c not in "0123456789abcdef" for c in digits):
        raise PoolfleetError(f"not a task id or id prefix: {text!r}; {ID_FORM}, or its first digits")
    return digits
