"""Stopping the worker's processes for good, within a deadline.

``multiprocessing.Pool`` cannot be trusted to stop: ``close`` + ``join`` waits for
ever once a child was killed under a task (the task's entry stays in the pool's
cache), and ``terminate`` (also run by multiprocessing's exit handler) can block on
a queue lock that a killed child held. So the worker never asks the pool to stop:
it stops the pool's child-replacing thread, SIGKILLs the children, reaps them, then
stops the forkserver and the resource tracker itself, each wait bounded. A last
sweep SIGKILLs whatever descendant of the worker is still there (a process a task
started, say), identified by pid and start time so a reused pid is never hit.

Linux only where it reads ``/proc``; elsewhere the sweep finds nothing to do.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.pool import Pool
from typing import Any

#: (pid, start time in clock ticks since boot): a process, not just a number that may be reused.
ProcRef = tuple[int, int]


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int | None = None) -> list[ProcRef]:
    """Every live process below ``root`` (this process by default), parents before children."""
    root = os.getpid() if root is None else root
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    children: dict[int, list[ProcRef]] = {}
    for name in entries:
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append((int(name), st[1]))
    out: list[ProcRef] = []
    todo = [root]
    while todo:
        for ref in children.get(todo.pop(), []):
            out.append(ref)
            todo.append(ref[0])
    return out


def kill_refs(refs: list[ProcRef]) -> int:
    """SIGKILL each process still alive with the same start time; return how many were."""
    killed = 0
    for pid, started in refs:
        st = _stat(pid)
        if st is None or st[1] != started:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _reap(pid: int, deadline: float) -> bool:
    """Wait for our own child ``pid`` until ``deadline``; True once it is reaped (or not ours)."""
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _end_child(pid: int, deadline: float, grace_s: float) -> None:
    """Let a direct child exit on its own for ``grace_s``, then SIGKILL it; reap it."""
    if _reap(pid, min(deadline, time.monotonic() + grace_s)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid, deadline)


def stop_process_pool(pool: Pool, deadline: float) -> None:
    """SIGKILL the pool's children and reap them, without the pool's own (unbounded) stop."""
    from multiprocessing.pool import TERMINATE

    pool._terminate.cancel()  # type: ignore[attr-defined]  # no pool stop at interpreter exit
    pool._state = TERMINATE  # type: ignore[attr-defined]  # no "unclosed pool" warning either
    handler = pool._worker_handler  # type: ignore[attr-defined]
    handler._state = TERMINATE  # the thread that replaces dead children: stop it first
    with contextlib.suppress(Exception):
        pool._change_notifier.put(None)  # type: ignore[attr-defined]  # wakes it
    handler.join(max(0.0, min(deadline - time.monotonic(), 0.5)))
    procs: list[Any] = list(pool._pool)  # type: ignore[attr-defined]
    for proc in procs:
        if proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            # never reaped in time: multiprocessing's exit handler would join it for ever
            multiprocessing.process._children.discard(proc)  # type: ignore[attr-defined]
    # The pool's remaining threads are daemon threads blocked on its queues; they end with
    # the process.


def stop_forkserver(deadline: float) -> None:
    """End the forkserver this process started (and reap it), if there is one."""
    from multiprocessing import forkserver

    fs: Any = getattr(forkserver, "_forkserver", None)
    pid = getattr(fs, "_forkserver_pid", None)
    if fs is None or pid is None:
        return
    alive_fd = fs._forkserver_alive_fd
    if alive_fd is not None:
        with contextlib.suppress(OSError):
            os.close(alive_fd)  # end of file on its "alive" pipe tells it to exit
    _end_child(pid, deadline, 0.2)
    fs._forkserver_pid = fs._forkserver_alive_fd = fs._forkserver_address = None


def stop_resource_tracker(deadline: float) -> None:
    """End multiprocessing's resource tracker once nothing uses it any more (and reap it).

    The finalizers of multiprocessing's locks run first: they report the locks' cleanup
    to the tracker, and would otherwise start a new tracker at interpreter exit.
    """
    from multiprocessing import resource_tracker, util

    tracker: Any = getattr(resource_tracker, "_resource_tracker", None)
    if tracker is None or getattr(tracker, "_pid", None) is None:
        return
    with contextlib.suppress(Exception):
        util._run_finalizers(0)  # type: ignore[attr-defined]
    pid, fd = tracker._pid, tracker._fd
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # end of file: it unlinks what is left and exits
    tracker._fd = tracker._pid = None
    _end_child(pid, deadline, 0.3)


@contextlib.contextmanager
def sigterm_blocked() -> Iterator[None]:
    """Block SIGTERM in this thread while the process pool starts.

    What starts meanwhile (the forkserver, the pool's own threads, which start later
    forkservers and children) inherits the blocked signal: a SIGTERM sent to the
    worker's whole process group (a shell's ``kill %1``, ``timeout``, a supervisor's
    stop-as-group) reaches only the worker itself, which then drains. A SIGTERM that
    arrives in this window stays pending and is delivered when it ends.

    The resource tracker starts first: starting it unblocks SIGTERM in the calling thread
    (it ignores SIGTERM by itself).
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
