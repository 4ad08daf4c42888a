"""The process pool of kind cpu: multiprocessing.Pool, with its children fed and read by the
worker's main loop.

The stock pool moves every task through two threads of its own: ``apply_async`` queues it
for the task-handler thread, which pickles it into the children's pipe, and the
result-handler thread reads each result from the children's result pipe and runs the
callback, which then has to wake the main loop. On a round trip of a no-op that is two
hand-offs of the GIL and a wake-up, about a quarter of the worker's part of the round trip.

:class:`DirectPool` keeps the pool (its children, their pipes, their replacement when one
dies) and takes the two threads off the path of a task: :meth:`DirectPool.send` writes the
pickled task into the children's pipe from the calling thread when the pipe has room for it
(a task too big for that room goes through the task-handler thread as before, so the caller
never blocks on a pipe that busy children do not read), and :meth:`DirectPool.read_results`
reads whatever results are in the result pipe without blocking; the main loop calls it when
:attr:`DirectPool.result_fd` is readable. The result-handler thread stays parked.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from multiprocessing.pool import RUN, Pool
from multiprocessing.reduction import ForkingPickler
from typing import Any

#: how long the children's task pipe may hold the same bytes, with its read lock taken, before
#: the lock is taken to be orphaned by a killed child (see :meth:`DirectPool.repair`)
STUCK_AFTER_S = 1.0
_PAGE = 4096


class _Pickled(tuple):  # type: ignore[type-arg]
    """(job, index, pickled task): a task pickled already, for the task-handler thread."""


def _pipe_bytes(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


class QuietPool(Pool):
    """A ``multiprocessing.Pool`` whose worker-handler thread wakes only when it has work.

    The stock handler thread also waits on the pipe the results come back through, so it
    wakes, and scans the children, on every result, while the result thread reads it: about
    8 us of CPU and a hand-off of the GIL per result, 5 % of a core while two children run
    15 ms tasks. Here it wakes on what it acts on: a child exiting (its process sentinel,
    which the pool keeps watching) and the pool's own change notices (close, terminate, the
    task cache running empty).
    """

    def _get_sentinels(self) -> list[Any]:
        return [self._change_notifier._reader]  # type: ignore[attr-defined]


class DirectPool(QuietPool):
    """A :class:`QuietPool` whose tasks and results skip the pool's two handler threads."""

    def _setup_queues(self) -> None:
        super()._setup_queues()  # type: ignore[misc]
        self._write_lock = threading.Lock()
        writer = self._inqueue._writer  # type: ignore[attr-defined]
        stock_put = writer.send

        def put(task: Any) -> None:  # the task-handler thread's put: big tasks and sentinels
            with self._write_lock:
                if type(task) is _Pickled:
                    writer.send_bytes(task[2])
                else:
                    stock_put(task)

        self._quick_put = put
        self._unparked = threading.Event()
        reader = self._outqueue._reader  # type: ignore[attr-defined]

        def parked_get() -> Any:
            self._unparked.wait()
            return reader.recv()

        self._quick_get = parked_get
        try:  # a bigger task pipe: more queued tasks written without the handler thread
            fcntl.fcntl(writer.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        except (AttributeError, OSError):
            pass
        try:
            self._pipe_cap = fcntl.fcntl(writer.fileno(), fcntl.F_GETPIPE_SZ)
        except (AttributeError, OSError):
            self._pipe_cap = 1 << 16
        self._task_fd = self._inqueue._reader.fileno()  # type: ignore[attr-defined]
        self.result_fd: int = reader.fileno()
        os.set_blocking(self.result_fd, False)
        self._buf = bytearray()
        self._callbacks: dict[int, tuple[Callable[[Any], None], Callable[[BaseException], None]]] = {}
        self._ids = itertools.count(1 << 62)  # apart from the stock ApplyResult's job numbers
        self._stuck: tuple[int, float] | None = None
        self._wstuck: float | None = None  # since when the result pipe's write lock looks orphaned
        self.repaired = 0

    # -- tasks -------------------------------------------------------------------
    def send(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        callback: Callable[[Any], None],
        error_callback: Callable[[BaseException], None],
    ) -> None:
        """Queue ``func(*args)`` for a child; ``callback`` or ``error_callback`` runs in the
        thread that calls :meth:`read_results` once its result is read."""
        if self._state != RUN:  # type: ignore[attr-defined]
            raise ValueError("Pool not running")
        job = next(self._ids)
        data = ForkingPickler.dumps((job, 0, func, args, {}))
        self._callbacks[job] = (callback, error_callback)
        need = len(data) + 12 + 2 * _PAGE  # its header, and pages the pipe may hold part-filled
        if need + _pipe_bytes(self._task_fd) <= self._pipe_cap and self._write_lock.acquire(blocking=False):
            try:
                self._inqueue._writer.send_bytes(data)  # type: ignore[attr-defined]
            finally:
                self._write_lock.release()
        else:
            self._taskqueue.put(([_Pickled((job, 0, data))], None))  # type: ignore[attr-defined]

    # -- results -----------------------------------------------------------------
    def read_results(self) -> int:
        """Read the results in the result pipe without blocking and run their callbacks;
        returns how many. A result still being written stays buffered for the next call."""
        buf = self._buf
        while True:
            try:
                chunk = os.read(self.result_fd, 1 << 18)
            except BlockingIOError:
                break
            if not chunk:
                break
            buf += chunk
            if len(chunk) < 1 << 18:
                break
        done = 0
        at = 0
        while len(buf) - at >= 4:
            (size,) = struct.unpack_from("!i", buf, at)
            head = 4
            if size == -1:  # multiprocessing's header for a message of 2 GiB and more
                if len(buf) - at < 12:
                    break
                (size,) = struct.unpack_from("!Q", buf, at + 4)
                head = 12
            if len(buf) - at - head < size:
                break
            item = ForkingPickler.loads(memoryview(buf)[at + head : at + head + size])
            at += head + size
            done += 1
            self._deliver(item)
        if at:
            del buf[:at]
        return done

    def result_in_flight(self) -> bool:
        """Read what is in the result pipe; True if a child is part-way through writing a result.

        A child killed then would leave the result pipe's write lock taken and half a message
        in the pipe: every later result would be lost. Kills wait for the write to end."""
        self.read_results()
        return bool(self._buf)

    def _deliver(self, item: Any) -> None:
        if item is None:
            return  # a sentinel
        job, index, (ok, value) = item
        callbacks = self._callbacks.pop(job, None)
        if callbacks is None:  # a task of the stock apply_async: its cache
            result = self._cache.get(job)  # type: ignore[attr-defined]
            if result is not None:
                result._set(index, (ok, value))
            return
        if ok:
            callbacks[0](value)
        else:
            callbacks[1](value)

    # -- a lock left by a killed child -------------------------------------------------
    def repair(self, now: float | None = None) -> bool:
        """Release a pipe lock a killed child left taken (call now and then): the task pipe's
        read lock, or the result pipe's write lock (see :meth:`_repair_results`).

        Each child takes the task pipe's lock while it reads a task; a child killed (for a
        timeout or a cancel) just after it finished a task and took the lock for the next one
        leaves it taken for ever, and the other children never read another task. That shows as
        tasks in the pipe, the same bytes for :data:`STUCK_AFTER_S`, and the lock taken: a live
        reader would have read them within microseconds.
        """
        now = time.monotonic() if now is None else now
        released = self._repair_results(now)
        return self._repair_tasks(now) or released

    def _repair_results(self, now: float) -> bool:
        """The result pipe's write lock, taken by a child killed between taking it and writing
        (or between its last byte and the release): every later result would wait for it. That
        shows as the lock taken with nothing in the pipe, and nothing half-read, for
        :data:`STUCK_AFTER_S`: a live writer has its first bytes in the pipe at once."""
        lock = getattr(self._outqueue, "_wlock", None)  # type: ignore[attr-defined]
        if lock is None:
            return False
        if self._buf or _pipe_bytes(self.result_fd):
            self._wstuck = None  # a result on its way: its writer is alive
            return False
        if lock.acquire(False):
            lock.release()
            self._wstuck = None
            return False
        if self._wstuck is None:
            self._wstuck = now
            return False
        if now - self._wstuck < STUCK_AFTER_S:
            return False
        self._wstuck = None
        lock.release()  # taken by no live writer: a killed child's
        self.repaired += 1
        return True

    def _repair_tasks(self, now: float) -> bool:
        waiting = _pipe_bytes(self._task_fd)
        lock = self._inqueue._rlock  # type: ignore[attr-defined]
        if waiting == 0:
            self._stuck = None
            return False
        if self._stuck is None or self._stuck[0] != waiting:
            self._stuck = (waiting, now)
            return False
        if now - self._stuck[1] < STUCK_AFTER_S:
            return False
        self._stuck = None
        if lock.acquire(False):
            lock.release()  # free: the children are busy, the tasks wait their turn
            return False
        lock.release()  # taken by no live reader: a killed child's
        self.repaired += 1
        return True

    def close(self) -> None:
        self._unparked.set()
        super().close()

    def terminate(self) -> None:
        self._unparked.set()
        super().terminate()
