"""``Pool``: the multiprocessing.Pool interface, run on the cluster.

Change ``from multiprocessing import Pool`` to ``from poolfleet.client import Pool``
and the calls below run on the workers instead of local processes. The
function must live in a module the workers load (``pworker --tasks``).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from poolfleet.client.client import Client, TaskFuture, TaskOptions

ValueError_ = ValueError


class AsyncResult:
    """Mirror of multiprocessing.pool.AsyncResult over one or more task futures."""

    def __init__(
        self,
        futures: list[TaskFuture],
        single: bool,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        self._futures = futures
        self._single = single
        self._done = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._remaining = len(futures)
        self._lock = threading.Lock()
        if not futures:
            self._finish()
        for f in futures:
            f.add_done_callback(self._one_done)

    @property
    def task_ids(self) -> list[str]:
        return [f.task_id for f in self._futures]

    def _one_done(self, _f: Future[Any]) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        try:
            exc = self._exception()
            if exc is None and self._callback is not None:
                self._callback(self._value())
            elif exc is not None and self._error_callback is not None:
                self._error_callback(exc)
        finally:
            self._done.set()

    def _exception(self) -> BaseException | None:
        for f in self._futures:
            if f.cancelled():
                from poolfleet.common.errors import TaskCancelled

                return TaskCancelled(f.task_id, "CANCELLED", "Cancelled", "cancelled by terminate()")
            exc = f.exception()
            if exc is not None:
                return exc
        return None

    def _value(self) -> Any:
        values = [f.result() for f in self._futures]
        return values[0] if self._single else values

    def ready(self) -> bool:
        return self._done.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError_(f"{self!r} not ready")
        return self._exception() is None

    def wait(self, timeout: float | None = None) -> None:
        self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value, or raise the task's error; multiprocessing.TimeoutError if not ready in time."""
        if not self._done.wait(timeout):
            raise multiprocessing.TimeoutError
        exc = self._exception()
        if exc is not None:
            raise exc
        return self._value()


MapResult = AsyncResult


class Pool:
    """multiprocessing.Pool's interface over a poolfleet cluster.

    ``processes`` is accepted for compatibility: the cluster's slots decide how
    much runs at once. ``master`` defaults to POOLFLEET_MASTER. Task options
    (``kind``, ``queue``, ``timeout_s``, ``retries``) apply to every call.
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
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if initializer is not None:
            raise ValueError(
                "initializer cannot run on the cluster: set up state at import time of the task "
                "module the workers load"
            )
        self._processes = processes
        self._own_client = client is None
        self._client = client or Client(master)
        self._options = TaskOptions(kind=kind, queue=queue, timeout_s=timeout_s, retries=retries)
        self._state = "RUN"
        self._outstanding: set[TaskFuture] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<poolfleet.client.Pool state={self._state} master={self._client.master}>"

    # -- plumbing --------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _submit(
        self, func: Callable[..., Any] | str, calls: list[tuple[tuple[Any, ...] | list[Any], dict[str, Any]]]
    ) -> list[TaskFuture]:
        self._check_running()
        futures = self._client.submit_many(func, calls, options=self._options)
        with self._lock:
            self._outstanding.update(futures)
        for f in futures:
            f.add_done_callback(self._forget)
        return futures

    def _forget(self, f: Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(f)  # type: ignore[arg-type,unused-ignore]

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
        return AsyncResult(futures, True, callback, error_callback)

    def map(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[Any]:
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
        futures = self._submit(func, [((x,), {}) for x in iterable])
        return AsyncResult(futures, False, callback, error_callback)

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
        futures = self._submit(func, [(tuple(x), {}) for x in iterable])
        return AsyncResult(futures, False, callback, error_callback)

    def imap(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int = 1
    ) -> Iterator[Any]:
        """Results in input order as they become available (submits in batches as it goes)."""
        futures = self._submit(func, [((x,), {}) for x in iterable])

        def gen() -> Iterator[Any]:
            for f in futures:
                yield f.result()

        return gen()

    def imap_unordered(
        self, func: Callable[..., Any] | str, iterable: Iterable[Any], chunksize: int = 1
    ) -> Iterator[Any]:
        """Results in completion order."""
        futures = self._submit(func, [((x,), {}) for x in iterable])

        def gen() -> Iterator[Any]:
            pending: set[Future[Any]] = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()

        return gen()

    def close(self) -> None:
        """No more submissions; running tasks carry on."""
        if self._state == "RUN":
            self._state = "CLOSE"

    def terminate(self) -> None:
        """Cancel everything this pool still waits for and stop."""
        self._state = "TERMINATE"
        with self._lock:
            pending = list(self._outstanding)
        for f in pending:
            f.cancel()
        if self._own_client:
            self._client.close()

    def join(self) -> None:
        """Wait for every task submitted through this pool (after close or terminate)."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        while True:
            with self._lock:
                pending = list(self._outstanding)
            if not pending:
                break
            wait(pending)
        if self._own_client and self._state == "CLOSE":
            self._client.close()
            self._state = "CLOSED"

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def cpu_count() -> int:
    """Local core count, as multiprocessing.cpu_count (so the seed's imports keep working)."""
    return multiprocessing.cpu_count()
