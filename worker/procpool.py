"""The process pool of kind cpu: children the worker's main thread feeds and reads itself.

Each child has its own pipe. The main thread writes a *call* (one task, or a
chunk of tiny ones: see poolfleet.worker.pacing) to it and polls the pipe
with the master's socket; the child answers its calls in order. So the main
thread always knows which call a child runs (the oldest unanswered one), a
result reaches the main thread with one wake-up and no thread in between,
and a child's death shows at once as the end of its pipe.

A child holds at most ``DEPTH`` calls, so it never idles between two; a call
bigger than ``AHEAD_BYTES`` goes only to an idle child (the main thread must
never block on a full pipe while that child is busy writing a result).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from poolfleet.worker.runner import Outcome, child_main

#: Calls a child may hold: the one it runs and one waiting in its pipe.
DEPTH = 2
#: A call larger than this (payload bytes) waits for an idle child.
AHEAD_BYTES = 32 * 1024
#: How long a child whose pipe ended may take to be reported dead before it is killed.
EXIT_WAIT_S = 0.05

Item = tuple[bytes, int, str, bytes]  # task id, attempt, name, payload


@dataclass(eq=False)
class Call:
    """What one write to a child carries; ``refs`` are the caller's (jobs)."""

    refs: list[Any]
    items: list[Item]


@dataclass(eq=False)
class Child:
    proc: Any  # multiprocessing's Process (forkserver)
    conn: Connection
    fd: int
    left: int | None  # tasks it may still take before it recycles itself (max_tasks_per_child)
    calls: deque[Call] = field(default_factory=deque)
    started_at: float | None = None  # when the oldest call (the one running) started
    doomed: bool = False  # killed or told to stop: takes nothing more

    @property
    def pid(self) -> int:
        return int(self.proc.pid)


@dataclass
class Answer:
    """A child answered its running call."""

    child: Child
    call: Call
    outcomes: list[Outcome]


@dataclass
class Death:
    """A child's pipe ended: ``running`` was its running call, ``queued`` never started."""

    child: Child
    running: Call | None
    queued: list[Call]
    exitcode: int | None


Event = Answer | Death


class ChildPool:
    """``size`` children from a forkserver that has the task modules loaded."""

    def __init__(
        self,
        size: int,
        modules: tuple[str, ...],
        log_level: str,
        max_tasks_per_child: int | None,
        watch: Callable[[int], None],
        unwatch: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.modules = modules
        self.log_level = log_level
        self.max_tasks = max_tasks_per_child
        self.watch = watch
        self.unwatch = unwatch
        self.clock = clock
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["poolfleet.worker.runner", *modules])
        self.children: dict[int, Child] = {}  # by the fd of the worker's end of its pipe
        self.closing = False
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        mine, theirs = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=child_main,
            args=(theirs, self.modules, self.log_level, self.max_tasks),
            name="pf-child",
            daemon=True,
        )
        proc.start()
        theirs.close()  # the child's end lives only in the child: its death ends our pipe
        child = Child(proc, mine, mine.fileno(), self.max_tasks)
        self.children[child.fd] = child
        self.watch(child.fd)

    # -- giving work -------------------------------------------------------------
    def pick(self, size_bytes: int) -> Child | None:
        """The least busy child that can take a call of this size now, or None."""
        best: Child | None = None
        for child in self.children.values():
            n = len(child.calls)
            if child.doomed or n >= DEPTH or (child.left is not None and child.left <= 0):
                continue
            if n and size_bytes > AHEAD_BYTES:
                continue
            if best is None or n < len(best.calls):
                best = child
                if n == 0:
                    break
        return best

    def room(self) -> bool:
        return any(
            not c.doomed and len(c.calls) < DEPTH and (c.left is None or c.left > 0)
            for c in self.children.values()
        )

    def send(self, child: Child, call: Call) -> bool:
        """Write a call to a child; False if its pipe is broken (its death shows on the pipe)."""
        try:
            child.conn.send(call.items)
        except (OSError, ValueError):
            child.doomed = True
            return False
        if not child.calls:
            child.started_at = self.clock()
        child.calls.append(call)
        if child.left is not None:
            child.left -= len(call.items)
        return True

    def running(self) -> Iterator[tuple[Child, Call]]:
        for child in self.children.values():
            if child.calls:
                yield child, child.calls[0]

    # -- what children say ---------------------------------------------------------
    def read(self, fd: int) -> list[Event]:
        """Everything a child's pipe holds now: answers, and its death if the pipe ended."""
        child = self.children.get(fd)
        if child is None:
            return []
        out: list[Event] = []
        try:
            while child.conn.poll(0):
                outcomes = child.conn.recv()
                call = child.calls.popleft()
                child.started_at = self.clock() if child.calls else None
                out.append(Answer(child, call, outcomes))
        except (EOFError, OSError, IndexError):
            out.append(self._bury(child))
            if not self.closing:
                self._spawn()
        return out

    def _bury(self, child: Child) -> Death:
        del self.children[child.fd]
        self.unwatch(child.fd)
        child.conn.close()
        exitcode = self._exitcode(child)
        running = child.calls.popleft() if child.calls else None
        return Death(child, running, list(child.calls), exitcode)

    @staticmethod
    def _exitcode(child: Child) -> int | None:
        """The exit status of a child whose pipe ended.

        Its pipe ends when it exits; the forkserver, its parent, reports the status within
        a few milliseconds. A child still alive after ``EXIT_WAIT_S`` closed its pipe and
        lives on (a task closing every descriptor does that): it is killed, while its pid
        is surely its own. The main loop waits for this at most that long plus the kill.
        """
        child.proc.join(EXIT_WAIT_S)
        if child.proc.exitcode is None:
            _kill(child.pid)
            child.proc.join(1.0)
        code = child.proc.exitcode
        return int(code) if code is not None else None

    def kill(self, child: Child) -> None:
        """SIGKILL a child (timeout, cancel); its death then shows on its pipe."""
        child.doomed = True
        _kill(child.pid)

    def pids(self) -> list[int]:
        return [c.pid for c in self.children.values()]

    def close(self, wait: bool) -> None:
        """Stop every child: ``wait`` lets each finish its calls, otherwise SIGKILL."""
        self.closing = True
        for child in list(self.children.values()):
            if wait:
                try:
                    child.conn.send(None)
                except (OSError, ValueError):
                    pass
            else:
                _kill(child.pid)
        for child in list(self.children.values()):
            child.proc.join(10.0 if wait else 5.0)
            if child.proc.exitcode is None:
                _kill(child.pid)
                child.proc.join(5.0)
            self.unwatch(child.fd)
            child.conn.close()
        self.children.clear()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
