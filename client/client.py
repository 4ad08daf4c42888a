"""The Python client: submit tasks, get concurrent.futures.Future objects back."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from dataclasses import dataclass, field, replace
from typing import Any

from poolfleet.client import chunks, remote
from poolfleet.client.connection import Connection
from poolfleet.client.control import WorkflowControl
from poolfleet.client.shipping import HOW_TO_SHIP, Shipper, needs_shipping, ship_mode
from poolfleet.common import codec
from poolfleet.common.errors import (
    MasterUnreachable,
    PoolfleetError,
    RemoteError,
    TaskError,
)
from poolfleet.common.ids import ID_FORM, format_id, new_task_ids, parse_id
from poolfleet.common.protocol import CMD_TASK_NAME, ErrorCode, Kind, MsgKind, TaskState

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
            f"--tasks mytasks, and import it from there; {HOW_TO_SHIP}."
        )
    if "<" in qualname or "." in qualname:
        raise PoolfleetError(
            f"function {qualname!r} in {module} is not a module-level function "
            f"(lambdas, nested functions and methods cannot run on workers by name); {HOW_TO_SHIP}"
        )
    if inspect.isbuiltin(fn):
        raise PoolfleetError(f"{module}.{qualname} is a built-in; wrap it in a function of a task module")
    return f"{module}:{qualname}"


#: ``submit_many`` sends a big batch in parts: this many tasks first, then twice as many each
#: time. The first part is on its way while the rest is being built.
FIRST_PART = 64
#: How long ``submit_many`` waits for a part to leave before building the next.
PART_WAIT_S = 0.01


class TaskRef(codec.TaskRef):
    """A reference to a task by its id (text or 16 bytes), to stand in another task's
    arguments, or in ``after``, like the task's future: ``c.submit(f, TaskRef(id))``."""

    def __init__(self, task_id: str | bytes) -> None:
        super().__init__(parse_id(task_id) if isinstance(task_id, str) else task_id)

    def __repr__(self) -> str:
        return f"TaskRef({format_id(self.id_bytes)!r})"


def eta_epoch(eta: dt.datetime) -> float:
    """An aware datetime as seconds since the epoch; a naive one is refused."""
    if not isinstance(eta, dt.datetime):
        raise PoolfleetError(f"eta must be a datetime, not {type(eta).__name__}")
    if eta.tzinfo is None or eta.utcoffset() is None:
        raise PoolfleetError(
            f"eta {eta.isoformat()} has no time zone: pass an aware datetime, "
            "e.g. datetime(2026, 12, 24, 18, tzinfo=ZoneInfo('Europe/Berlin')) or ...tzinfo=timezone.utc"
        )
    return eta.timestamp()


def ref_ids(tasks: Iterable[codec.TaskRef | str]) -> tuple[bytes, ...]:
    """The ids of futures, TaskRefs or text ids (for ``after``)."""
    out = []
    for t in tasks:
        if isinstance(t, codec.TaskRef):
            out.append(t.id_bytes)
        elif isinstance(t, str):
            out.append(parse_id(t))
        else:
            raise PoolfleetError(f"after= takes futures, TaskRefs or task ids, not {type(t).__name__}")
    return tuple(out)


@dataclass(frozen=True)
class TaskOptions:
    """Per-call options; None leaves the task's own default.

    ``delay_s``: start no sooner than this many seconds after the master has it; ``eta``:
    not before this time (seconds since the epoch); ``after``: ids of tasks that must have
    succeeded first (their results are not passed)."""

    kind: str | None = None
    queue: str | None = None
    timeout_s: float | None = None
    retries: int | None = None
    delay_s: float | None = None
    eta: float | None = None
    after: tuple[bytes, ...] = ()
    #: higher goes first within its queue (-100 to 100; None: 0)
    priority: int | None = None

    def apply(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self.kind is not None:
            entry["kind"] = Kind(self.kind).value
        if self.queue is not None:
            entry["queue"] = self.queue
        if self.timeout_s is not None:
            entry["timeout_s"] = float(self.timeout_s)
        if self.retries is not None:
            entry["retries"] = int(self.retries)
        if self.delay_s is not None:
            entry["delay_s"] = float(self.delay_s)
        if self.eta is not None:
            entry["eta"] = float(self.eta)
        if self.after:
            entry["after"] = list(self.after)
        if self.priority:
            entry["priority"] = int(self.priority)
        return entry


#: Makes a TaskFuture's condition on first use (see TaskFuture._condition).
_COND_LOCK = threading.Lock()


def _new_cond_lock() -> None:
    """After fork: a lock another thread of the parent held would never be released here."""
    global _COND_LOCK
    _COND_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_cond_lock)


class TaskFuture(Future[Any], codec.TaskRef):
    """A Future for one task; ``task_id`` is its id, ``cancel()`` also cancels it on the cluster.

    Passed in another task's arguments (at any depth), it stands for this task's result: the
    master starts that task once this one has succeeded, with the result in its place."""

    def __init__(self, task_id: bytes, name: str, client: Client) -> None:
        # Future.__init__'s fields but its Condition, which is made when first asked for (see
        # _condition): most futures are settled by one thread and read once, after that
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        self._cond: threading.Condition | None = None
        self.id_bytes = task_id
        self.name = name
        self._client = client
        self.info: dict[str, Any] = {}
        self.ack: Future[dict[str, Any]] | None = None
        #: cancel() asked the master: a CANCELLED result cancels this future
        self._cancel_asked = False
        #: set when the future stops being pending, made only for a cancel() that waits for
        #: the worker's word (an Event per future cost a sixth of the client's CPU per task)
        self._moved: threading.Event | None = None
        #: the latest progress report pushed by the master: {fraction, message, at}, or None
        self.progress: dict[str, Any] | None = None
        self._progress_callbacks: list[Callable[[TaskFuture], Any]] = []

    @property
    def task_id(self) -> str:
        """The id in its text form (made when asked: most futures are never asked)."""
        return format_id(self.id_bytes)

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        """``Future``'s lock and condition, made on first use (under ``_COND_LOCK``, so that two
        threads never make two). Making a Condition with its RLock for every future was a third
        of the client's samples in a no-op run (docs/BENCHMARKS.md, fourteenth round); a future
        nobody waits on, cancels or adds a callback to never needs one: ``_start``,
        ``_settle``, ``done`` and ``result`` then run without it. Whatever would wait or watch
        makes it first, and so sees every change made without it."""
        cond = self._cond
        if cond is None:
            with _COND_LOCK:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def done(self) -> bool:
        # the state is one attribute and done is final: no lock needed to read it
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:  # final: read without the lock
            return self._result
        return Future.result(self, timeout)

    def cancel(self) -> bool:
        """``concurrent.futures.Future.cancel``: False once the task runs (a slot started it) or
        is done; a pending task is cancelled on the cluster too.

        It asks the master to cancel the task only if no slot has started it, and waits for the
        answer (at most ``CANCEL_WAIT_S``): a task that started meanwhile makes this future
        running and the call return False. To stop a running task, use ``Client.kill``.
        """
        with self._condition:
            if self._state != PENDING:
                return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
        return self._client._cancel_one(self)

    def _start(self) -> bool:
        """A slot started the task: running from now on. False if cancelled or done here."""
        if self._cond is None:
            with _COND_LOCK:
                if self._cond is None:  # nobody waits or watches: no one to notify
                    if self._state == PENDING:
                        self._state = RUNNING
                    return self._state == RUNNING
        with self._condition:
            if self._state == RUNNING:
                return True
            if self._state in (PENDING, CANCELLED):
                running = self.set_running_or_notify_cancel()
                if self._moved is not None:
                    self._moved.set()  # a cancel() waiting for the worker's word
                return running
            return False

    def _settle(self, value: Any, err: BaseException | None) -> None:
        """The task's result arrived: ``_start`` then ``set_result`` (or ``set_exception``)
        under one hold of the future's lock, as ``concurrent.futures.Future`` does each (a
        cancelled future is notified of its cancel instead; a done one is left as it is)."""
        if self._cond is None:
            with _COND_LOCK:
                # no condition: no waiter, no callback, no cancel (each makes it first)
                if self._cond is None and self._state in (PENDING, RUNNING):
                    if err is None:
                        self._result = value
                    else:
                        self._exception = err
                    self._state = FINISHED
                    return
        with self._condition:
            state = self._state
            if state != PENDING and state != RUNNING and state != CANCELLED:
                return
            if self._moved is not None:
                self._moved.set()  # a cancel() waiting for the worker's word, as in _start
            if state == CANCELLED:
                self.set_running_or_notify_cancel()
                return
            if err is None:
                self._result = value
                for waiter in self._waiters:
                    waiter.add_result(self)
            else:
                self._exception = err
                for waiter in self._waiters:
                    waiter.add_exception(self)
            self._state = FINISHED
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def _wait_moved(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until this future is no longer pending."""
        with self._condition:  # _start sets it under the same lock
            if self._moved is None:
                self._moved = threading.Event()
            moved = self._moved
        self.add_done_callback(lambda _f: moved.set())
        with self._condition:
            if self._state != PENDING:
                return
        moved.wait(max(0.0, timeout))

    def _cancel_here(self) -> None:
        """Cancel this future locally, unless it runs or is done, and wake ``wait()`` callers."""
        with self._condition:
            if self._state == PENDING:
                Future.cancel(self)
                self.set_running_or_notify_cancel()

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
#: How long ``TaskFuture.cancel`` waits for the master's answer; without one the future is
#: cancelled here all the same (and the task too, if the request reaches the master in time).
CANCEL_WAIT_S = 5.0
#: Task ids per CANCEL request.
CANCEL_BATCH = 500


@dataclass
class _Shared:
    """What a client and its ``with_options`` views share."""

    conn: Connection
    shipper: Shipper
    futures: dict[bytes, TaskFuture] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    shutdown: bool = False
    closed: bool = False


class Client(WorkflowControl, Executor):
    """Connection to a pmaster for submitting tasks and following their results.

    A ``concurrent.futures.Executor``: ``submit``, ``map`` (with ``timeout`` counted from the
    call and ``chunksize``), ``shutdown`` and the context manager, which waits for the
    futures still pending when it exits.

    ``master`` defaults to the ``POOLFLEET_MASTER`` entry of ``env`` (the process
    environment unless given), then ``tcp://127.0.0.1:5555``.

    ``ship_code``: whether a function workers cannot import by name (defined in ``__main__``, a
    lambda, a closure) is shipped pickled (cloudpickle, ``pip install poolfleet[shipping]``),
    once per function, to workers started with ``--run-shipped-code``. None (the default) takes
    the ``POOLFLEET_SHIP_CODE`` entry of ``env`` (``1`` ships), else off: such a function then
    fails at submit, saying how to ship it. The master decides whether this client may ship
    code; if not, the submit raises RemoteError with its reason (never a silent fallback).
    ``max_code_bytes`` bounds a pickled function (1 MiB by default).
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
        ship_code: bool | None = None,
        max_code_bytes: int = 0,
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
        import os

        environ = env if env is not None else os.environ
        if master is None:
            master = environ.get("POOLFLEET_MASTER") or DEFAULT_MASTER
        self.master = master
        self._owner = True
        mode = ship_mode(ship_code, environ)
        conn = Connection(
            master,
            self._on_result,
            curve_server_key=curve_server_key,
            curve_secret_key=curve_secret_key,
            on_started=self._on_started,
        )
        conn.on_progress = self._on_progress
        self._shared = _Shared(conn, Shipper(conn, mode, max_code_bytes, timeout_s))

    @property
    def _conn(self) -> Connection:
        return self._shared.conn

    @property
    def shipper(self) -> Shipper:
        """Ships the functions workers cannot import (``sent``: functions sent so far)."""
        return self._shared.shipper

    def name_of(self, fn: Callable[..., Any] | str) -> str:
        """The task name ``fn`` is submitted under: ``module:function``, or, for a function
        workers cannot import, the shipped name (stored on the master the first time)."""
        if needs_shipping(fn) and self._shared.shipper.enabled:
            return self._shared.shipper.name_for(fn)  # type: ignore[arg-type]
        return task_name(fn)

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

    def _cancel_futures(
        self, futures: list[TaskFuture], *, running_too: bool = False
    ) -> list[Future[dict[str, Any]]]:
        """Cancel these futures and their tasks on the cluster, in few requests.

        Without ``running_too`` (as an executor's cancel), a task a slot has started goes on and
        its future runs; each future is settled by the master's answer (cancelled here without
        one). With ``running_too`` running tasks are stopped too and every future not done is
        cancelled here at once (Pool.terminate).
        """
        todo = [f for f in futures if not f.done() and (running_too or not f.running())]
        acks = {id(f.ack): f.ack for f in todo if f.ack is not None}
        if not running_too and acks and not self._conn.on_own_thread():
            # a task is cancelled as the master has it: what the submit's turn already started
            # goes on, as the calls a local executor's threads took at once
            wait_futures(list(acks.values()), CANCEL_WAIT_S)
            todo = [f for f in todo if not f.done() and not f.running()]
        for f in todo:
            f._cancel_asked = True
        confirms = []
        for i in range(0, len(todo), CANCEL_BATCH):
            part = todo[i : i + CANCEL_BATCH]
            body: dict[str, Any] = {"ids": [f.id_bytes for f in part]}
            if not running_too:
                body["if_not_started"] = True
            try:
                confirm = self._conn.request(MsgKind.CANCEL, body)
            except PoolfleetError:
                confirm = Future()
                confirm.set_exception(MasterUnreachable("the client is closed"))
            if not running_too:
                confirm.add_done_callback(functools.partial(_settle_cancels, part))
            confirms.append(confirm)
        if running_too:
            for f in todo:
                f._cancel_here()
        return confirms

    def _cancel_one(self, f: TaskFuture) -> bool:
        """TaskFuture.cancel of a pending future: cancel the task unless it has started."""
        conn = self._conn
        if conn.on_own_thread():
            # a callback on the connection thread cannot wait for the answer, which that thread
            # reads: the task is cancelled whatever its state, so the future's word holds
            try:
                conn.request(MsgKind.CANCEL, {"ids": [f.id_bytes]})
            except PoolfleetError:
                pass
            f._cancel_here()
            return f.cancelled()
        deadline = time.monotonic() + CANCEL_WAIT_S
        sent = self._cancel_futures([f])
        if not sent:  # it ran or finished while its submit was being acknowledged
            return f.cancelled()
        wait_futures(sent, CANCEL_WAIT_S)
        _settle_cancels([f], sent[0])
        # at a worker and not known to have started: the worker says which (STARTED, or the
        # CANCELLED result); without its word in time the future is cancelled here
        f._wait_moved(deadline - time.monotonic())
        f._cancel_here()
        return f.cancelled()

    def with_options(
        self,
        *,
        kind: str | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        delay_s: float | None = None,
        eta: dt.datetime | None = None,
        after: Iterable[codec.TaskRef | str] | None = None,
        priority: int | None = None,
    ) -> Client:
        """A view of this client whose submits carry these task options.

        ``delay_s``: the task starts no sooner than that many seconds after the master has it;
        ``eta``: not before that time (an aware datetime; a naive one is refused); ``after``:
        futures (or TaskRefs, or task ids) of tasks that must succeed first, their results not
        passed (a task passed in the arguments is waited for anyway); ``priority``: higher
        first within a queue, from -100 to 100, default 0.
        """
        o = self.options
        if delay_s is not None and not delay_s >= 0:
            raise PoolfleetError(f"delay_s must be 0 or more seconds, not {delay_s!r}")
        opts = replace(
            o,
            kind=kind if kind is not None else o.kind,
            queue=queue if queue is not None else o.queue,
            timeout_s=timeout_s if timeout_s is not None else o.timeout_s,
            retries=retries if retries is not None else o.retries,
            delay_s=float(delay_s) if delay_s is not None else o.delay_s,
            eta=eta_epoch(eta) if eta is not None else o.eta,
            after=ref_ids(after) if after is not None else o.after,
            priority=priority if priority is not None else o.priority,
        )
        return Client(options=opts, timeout_s=self.timeout_s, _shared=self)

    # -- submitting ------------------------------------------------------------
    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run ``fn(*args, **kwargs)`` on the cluster; options come from ``with_options``.

        ``fn`` is a task function, its ``module:function`` name, or a ``functools.partial`` of
        a task function (its arguments travel with each call).

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
        name = self.name_of(fn)
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
                self._cancel_futures(futures, running_too=True)
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
        if isinstance(fn, functools.partial):  # its arguments go first, as when it is called
            bound, fn = fn, fn.func
            calls = (((*bound.args, *a), {**bound.keywords, **k}) for a, k in calls)
        name = self.name_of(fn)
        opts = options or self.options
        found: list[bytes] = []
        payloads: list[bytes] = []
        with_refs: set[int] = set()
        for args, kwargs in calls:
            before = len(found)
            payloads.append(codec.pack_call(args, kwargs, found))
            if len(found) > before:
                with_refs.add(len(payloads) - 1)
        ids = new_task_ids(len(payloads))
        futures: list[TaskFuture] = []
        start, size = 0, FIRST_PART
        while True:
            part = ids[start : start + size]
            entries = [
                opts.apply({"id": tid, "name": name, "payload": p})
                for tid, p in zip(part, payloads[start : start + size], strict=True)
            ]
            if with_refs:
                for i, e in enumerate(entries, start):
                    if i in with_refs:
                        e["refs"] = True
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
                if r.get("code") == ErrorCode.CODE_UNKNOWN:  # the next submit sends the function again
                    self._shared.shipper.forget()
                self._fail(f, RemoteError(str(r.get("code")), str(r.get("message"))))

    def _fail(self, f: TaskFuture, exc: BaseException) -> None:
        with self._lock:
            self._futures.pop(f.id_bytes, None)
        if f._start():
            f.set_exception(exc)

    def _on_started(self, tid: bytes) -> None:
        with self._lock:
            f = self._futures.get(tid)
        if f is not None:
            f._start()

    def _on_result(self, entry: dict[str, Any]) -> None:
        tid = entry.get("id")
        with self._lock:
            f = self._futures.pop(tid, None) if isinstance(tid, bytes) else None
        if f is None or f.done():
            return
        info = dict(entry)
        info.pop("value", None)
        f.info = info
        if f._cancel_asked and entry.get("state") == TaskState.CANCELLED:
            f._cancel_here()  # the cancel this future asked for: cancelled, as an executor's
            if f.cancelled():
                return
        try:
            value, err = outcome(entry)
        except PoolfleetError as exc:  # a result this client cannot decode still ends the future
            value, err = None, TaskError(f.task_id, "FAILED", type(exc).__name__, str(exc))
        f._settle(value, err)

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
        f.ack = reply

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
        """Cancel tasks by id: pending ones are removed, running ones stopped by kind."""
        reply = self._call(MsgKind.CANCEL, {"ids": [parse_id(t) for t in task_ids]}, timeout_s)
        return list(reply["results"])

    def kill(self, *tasks: TaskFuture | str, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Cancel tasks on the cluster whatever their state, running ones too (a ``cpu`` or
        ``cmd`` task is killed, an ``io`` one reported CANCELLED); ``TaskFuture.cancel`` leaves
        a running task alone, as concurrent.futures does.

        Takes futures or task ids; returns the master's outcome per task (``cancelled``,
        ``cancelling``, ``finished`` or ``unknown``). A future whose task has started gets the
        CANCELLED result as ``TaskCancelledError``; one not started is cancelled.
        """
        futures = {t.id_bytes: t for t in tasks if isinstance(t, TaskFuture)}
        ids = [t.id_bytes if isinstance(t, TaskFuture) else parse_id(t) for t in tasks]
        for f in futures.values():
            f._cancel_asked = True
        # the connection sends requests in order: this CANCEL never overtakes their SUBMIT
        results = list(self._call(MsgKind.CANCEL, {"ids": ids}, timeout_s)["results"])
        for r in results:
            killed = futures.get(r.get("id"))
            if killed is not None and r.get("outcome") != "finished":  # a finished one's result comes
                killed._cancel_here()  # unless it runs: then its CANCELLED result comes
        return results

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


def _settle_cancels(futures: list[TaskFuture], confirm: Future[dict[str, Any]]) -> None:
    """Apply the master's answer to a cancel-unless-started of these futures (idempotent)."""
    outcomes: dict[Any, Any] = {}
    if confirm.done() and confirm.exception() is None:
        outcomes = {r.get("id"): r.get("outcome") for r in confirm.result().get("results", [])}
    for f in futures:
        outcome = outcomes.get(f.id_bytes)
        if outcome == "running":
            f._start()
        elif outcome not in ("finished", "cancelling"):  # cancelled, unknown, or no answer
            f._cancel_here()
        # finished: its result comes; cancelling: the worker's STARTED or CANCELLED result


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
