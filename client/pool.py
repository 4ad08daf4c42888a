"""``Pool``: the multiprocessing.Pool interface, run on the cluster.

Change ``from multiprocessing import Pool`` to ``from poolfleet.client import Pool``
and the calls below run on the workers instead of local processes. The
function must live in a module the workers load (``pworker --tasks``), or be shipped
(``POOLFLEET_SHIP_CODE=1``, to workers started with ``--run-shipped-code``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

from poolfleet.client import chunks
from poolfleet.client.client import CANCEL_CONFIRM_S, Client, TaskFuture, TaskOptions
from poolfleet.client.remote import TaskCancelledError

if TYPE_CHECKING:
    from poolfleet.client.imap import IMapIterator, _Feed

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"


class AsyncResult:
    """Mirror of multiprocessing.pool.AsyncResult over one or more task futures.

    Ready once every future has its value, or at the first failure (as multiprocessing's map
    fails fast); the callbacks run then, on the client's connection thread.
    """

    def __init__(
        self,
        pool: Pool | None,
        futures: list[TaskFuture],
        single: bool,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        flatten: bool = False,
    ) -> None:
        self._pool = pool  # keeps the pool alive while its results are, as multiprocessing does
        self._futures = futures
        self._single = single
        self._flatten = flatten
        self._done = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._remaining = len(futures)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if not futures:
            self._finish()
        for f in futures:
            f.add_done_callback(self._one_done)

    @property
    def task_ids(self) -> list[str]:
        return [f.task_id for f in self._futures]

    def _one_done(self, f: Future[Any]) -> None:
        exc = _error_of(f)
        with self._lock:
            if self._done.is_set() or (self._remaining == 0 and self._futures):
                return
            self._remaining -= 1
            if exc is not None and self._error is None:
                self._error = exc
            last = self._remaining == 0 or exc is not None
            if last:
                self._remaining = 0
        if last:
            self._finish()

    def _finish(self) -> None:
        try:
            if self._error is None and self._callback is not None:
                self._callback(self._value())
            elif self._error is not None and self._error_callback is not None:
                self._error_callback(self._error)
        finally:
            self._done.set()
            self._pool = None

    def _value(self) -> Any:
        values = [f.result() for f in self._futures]
        if self._flatten:
            return chunks.flatten(values)
        return values[0] if self._single else values

    def ready(self) -> bool:
        return self._done.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value, or raise the task's error; multiprocessing.TimeoutError if not ready in time."""
        if not self._done.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._error is not None:
            raise self._error
        return self._value()


def _error_of(f: Future[Any]) -> BaseException | None:
    if f.cancelled():
        tid = getattr(f, "task_id", "?")
        return TaskCancelledError(tid, "CANCELLED", "Cancelled", "cancelled by terminate()")
    return f.exception()


ApplyResult = AsyncResult
MapResult = AsyncResult


class Pool:
    """multiprocessing.Pool's interface over a poolfleet cluster.

    ``processes`` is checked as multiprocessing checks it; it sets the default chunk size of
    ``map`` (when not given, the cluster's slots do), while the cluster's slots decide how much
    runs at once. ``master`` defaults to POOLFLEET_MASTER. Task options (``kind``, ``queue``,
    ``timeout_s``, ``retries``) apply to every call. ``imap_window`` bounds the tasks an
    ``imap`` keeps in flight and the results it holds for the caller (256 by default).
    ``ship_code`` is the Client's (functions in ``__main__``, lambdas, closures shipped pickled
    to workers that run shipped code; POOLFLEET_SHIP_CODE=1 when not given).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        *,
        master: str | None = None,
        client: Client | None = None,
        kind: str | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        imap_window: int | None = None,
        ship_code: bool | None = None,
    ) -> None:
        self._state = "INIT"
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if initializer is not None:
            raise ValueError(
                "initializer cannot run on the cluster: set up state at import time of the task "
                "module the workers load"
            )
        self._processes = processes
        self._own_client = client is None
        self._client = client or Client(master, ship_code=ship_code)
        self._options = TaskOptions(kind=kind, queue=queue, timeout_s=timeout_s, retries=retries)
        self._outstanding: set[TaskFuture] = set()
        self._feeds: weakref.WeakSet[_Feed] = weakref.WeakSet()
        self._slots: dict[str, int] = {}
        self._imap_window = imap_window
        self._lock = threading.Lock()
        self._state = RUN

    def __repr__(self) -> str:
        return f"<poolfleet.client.Pool state={self._state} master={self._client.master}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            if getattr(self, "_own_client", False) and not sys.is_finalizing():
                self._client.shutdown(wait=False)

    # -- plumbing --------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _track(self, futures: list[TaskFuture]) -> list[TaskFuture]:
        with self._lock:
            self._outstanding.update(futures)
        for f in futures:
            f.add_done_callback(self._forget)
        return futures

    def _forget(self, f: Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(f)  # type: ignore[arg-type,unused-ignore]

    def _submit(
        self, func: Callable[..., Any] | str, calls: list[tuple[tuple[Any, ...] | list[Any], dict[str, Any]]]
    ) -> list[TaskFuture]:
        self._check_running()
        return self._track(self._client.submit_many(func, calls, options=self._options))

    def _submit_chunks(
        self, func: Callable[..., Any] | str, calls: list[Any], chunksize: int, star: bool
    ) -> tuple[list[TaskFuture], bool]:
        """``calls`` (argument tuples with ``star``, else single arguments) as tasks of
        ``chunksize`` calls each, one task per call for 1; the futures, and whether their
        results are lists to flatten."""
        self._check_running()
        if chunksize <= 1:
            entries: list[tuple[tuple[Any, ...] | list[Any], dict[str, Any]]] = [
                (c if star else (c,), {}) for c in calls
            ]
            return self._track(self._client.submit_many(func, entries, options=self._options)), False
        parts = chunks.chunked(calls, chunksize)
        futures = self._client.submit_chunks(func, parts, chunksize, options=self._options, star=star)
        return self._track(futures), True

    def _submit_part(self, func: Callable[..., Any] | str, calls: list[Any], chunksize: int) -> TaskFuture:
        """One imap part of single arguments (also after close(), as multiprocessing's imap
        goes on feeding)."""
        if self._state == TERMINATE:
            raise ValueError("Pool was terminated")
        if chunksize <= 1:
            fut = self._client.submit_many(func, [((calls[0],), {})], options=self._options)[0]
        else:
            fut = self._client.submit_chunks(func, [calls], chunksize, options=self._options, star=False)[0]
        return self._track([fut])[0]

    def _divisor(self, func: Callable[..., Any] | str) -> int:
        """What multiprocessing divides a map by: the pool's processes, here the ``processes``
        given, else the slots the cluster has for the function's kind (asked once)."""
        if self._processes is not None:
            return int(self._processes)
        kind = chunks.chunk_options(self._options, func, 1).kind or "cpu"
        n = self._slots.get(kind)
        if n is None:
            try:
                n = sum(int((w.get("slots") or {}).get(kind, 0)) for w in self._client.workers(timeout_s=10))
            except Exception:  # noqa: BLE001 - unknown: the local count, as multiprocessing uses
                n = 0
            n = n or os.cpu_count() or 1
            self._slots[kind] = n
        return n

    def _map(
        self,
        func: Callable[..., Any] | str,
        calls: list[Any],
        star: bool,
        chunksize: int | None,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> AsyncResult:
        self._check_running()
        if chunksize is None:
            chunksize = chunks.default_chunksize(len(calls), self._divisor(func)) if calls else 1
        futures, flat = self._submit_chunks(func, calls, chunksize, star) if calls else ([], False)
        return AsyncResult(self, futures, False, callback, error_callback, flatten=flat)

    # -- the multiprocessing.Pool API -------------------------------------------
    def apply(
        self, func: Callable[..., Any] | str, args: Iterable[Any] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., Any] | str,
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        futures = self._submit(func, [(tuple(args), dict(kwds or {}))])
        return AsyncResult(self, futures, True, callback, error_callback)

    def map(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
        """Results in order; ``chunksize`` calls travel and run as one task (by default about four
        tasks per slot, as multiprocessing computes it)."""
        result: list[Any] = self.map_async(func, iterable, chunksize).get()
        return result

    def map_async(
        self,
        func: Callable[..., Any] | str,
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        self._check_running()
        return self._map(func, list(iterable), False, chunksize, callback, error_callback)

    def starmap(
        self, func: Callable[..., Any] | str, iterable: Iterable[Iterable[Any]], chunksize: int | None = None
    ) -> list[Any]:
        result: list[Any] = self.starmap_async(func, iterable, chunksize).get()
        return result

    def starmap_async(
        self,
        func: Callable[..., Any] | str,
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult:
        self._check_running()
        return self._map(func, [tuple(x) for x in iterable], True, chunksize, callback, error_callback)

    def imap(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Results in input order; the input is read as results are taken, a bounded window ahead."""
        return self._imap(func, iterable, chunksize, ordered=True)

    def imap_unordered(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Results in completion order; the input is read as for ``imap``."""
        return self._imap(func, iterable, chunksize, ordered=False)

    def _imap(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int, ordered: bool
    ) -> IMapIterator:
        from poolfleet.client.imap import IMapIterator

        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        self._client.name_of(func)  # a function workers cannot run fails here, not in next()
        if self._imap_window is None:
            return IMapIterator(self, func, iterable, chunksize, ordered)
        return IMapIterator(self, func, iterable, chunksize, ordered, max(1, self._imap_window))

    def close(self) -> None:
        """No more submissions; running tasks (and imap input still being read) carry on."""
        if self._state == RUN:
            self._state = CLOSE
            for feed in list(self._feeds):
                feed.release()

    def terminate(self) -> None:
        """Stop reading imap input, cancel every task this pool still waits for, and stop."""
        self._state = TERMINATE
        for feed in list(self._feeds):
            feed.stop()
        with self._lock:
            pending = [f for f in self._outstanding if not f.done()]
        # as multiprocessing's terminate stops its processes, running tasks are stopped too
        confirms = self._client._cancel_futures(pending, running_too=True)
        for c in confirms:
            try:
                c.result(CANCEL_CONFIRM_S)
            except Exception:  # noqa: BLE001 - best effort, as for shutdown
                pass
        if self._own_client:
            self._client.shutdown(wait=True)

    def join(self) -> None:
        """Wait for every task submitted through this pool (after close or terminate)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state == "INIT":
            return
        for feed in list(self._feeds):
            if feed.thread.is_alive() and feed.thread is not threading.current_thread():
                feed.thread.join()
        while True:
            with self._lock:
                pending = list(self._outstanding)
            if not pending:
                break
            wait(pending)
        if self._own_client:
            self._client.shutdown(wait=True)

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def cpu_count() -> int:
    """Local core count, as multiprocessing.cpu_count (so the seed's imports keep working)."""
    return multiprocessing.cpu_count()
