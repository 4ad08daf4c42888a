"""The worker's cpu pool fed and read by its main loop (worker/quietpool.py DirectPool): real
pool children over real pipes, big tasks and results, and the read lock a killed child leaves.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from poolfleet.worker.quietpool import STUCK_AFTER_S, DirectPool, _pipe_bytes
from tests.pfharness import wait_for


def _size(data: bytes) -> int:
    return len(data)


def _blob(n: int) -> bytes:
    return b"r" * n


def _boom(text: str) -> None:
    raise ValueError(text)


def _take_and_die(lock: Any) -> None:
    lock.acquire()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def pool() -> Iterator[DirectPool]:
    p = DirectPool(1, context=multiprocessing.get_context("fork"))
    try:
        yield p
    finally:
        p.terminate()


def _collect(pool: DirectPool, got: list[Any], want: int, timeout: float = 30.0) -> None:
    ready = select.poll()
    ready.register(pool.result_fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while len(got) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(got)} of {want} results after {timeout} s"
        ready.poll(left * 1000)
        pool.read_results()


def test_tasks_and_errors_come_back_through_the_callbacks(pool: DirectPool) -> None:
    got: list[Any] = []
    for i in range(200):
        pool.send(_size, (b"x" * i,), got.append, got.append)
    pool.send(_boom, ("no",), got.append, lambda e: got.append(("error", repr(e))))
    _collect(pool, got, 201)
    assert sorted(g for g in got if isinstance(g, int)) == list(range(200))
    assert ("error", "ValueError('no')") in got


def test_a_task_bigger_than_the_pipe_goes_through_the_pool_thread(pool: DirectPool) -> None:
    """The main loop never blocks on a pipe the children do not read: a task bigger than
    the room in the pipe is written by the pool's own task thread, and still runs."""
    got: list[Any] = []
    big = b"b" * (pool._pipe_cap + 100_000)
    pool.send(_size, (big,), got.append, got.append)
    pool.send(_size, (b"small",), got.append, got.append)
    _collect(pool, got, 2)
    assert sorted(got) == [5, len(big)]


def test_a_result_read_in_pieces_is_delivered_whole(pool: DirectPool) -> None:
    got: list[Any] = []
    pool.send(_blob, (5_000_000,), got.append, got.append)  # many reads of the result pipe
    pool.send(_blob, (3,), got.append, got.append)
    _collect(pool, got, 2)
    assert [len(g) for g in got] == [5_000_000, 3]
    assert got[0] == b"r" * 5_000_000


def test_the_read_lock_of_a_killed_child_is_released(pool: DirectPool) -> None:
    """A child killed while it holds the task pipe's lock (idle, waiting for its next task)
    leaves the lock taken: its replacement never reads a task. repair() sees tasks lying in
    the pipe unread with the lock taken, and releases it."""
    lock = pool._inqueue._rlock  # type: ignore[attr-defined]

    def held_by_the_child() -> bool:
        if lock.acquire(False):
            lock.release()
            return False
        return True

    wait_for(held_by_the_child, what="the idle child holds the read lock")
    (child,) = pool._pool  # type: ignore[attr-defined]
    os.kill(child.pid, signal.SIGKILL)
    wait_for(lambda: [p.pid for p in pool._pool] != [child.pid], what="the child replaced")  # type: ignore[attr-defined]
    got: list[Any] = []
    pool.send(_size, (b"abc",), got.append, got.append)
    assert _pipe_bytes(pool._task_fd) > 0
    t0 = time.monotonic()
    assert pool.repair(t0) is False  # first look: the bytes are noted
    assert pool.repair(t0 + STUCK_AFTER_S / 2) is False  # not stuck for long enough yet
    assert pool.read_results() == 0 and got == []
    assert pool.repair(t0 + STUCK_AFTER_S + 0.1) is True
    _collect(pool, got, 1)
    assert got == [3] and pool.repaired == 1


def test_the_result_write_lock_of_a_killed_child_is_released(pool: DirectPool) -> None:
    """A child killed after it took the result pipe's write lock and before it wrote (or after
    its last byte, before the release) leaves the lock taken: every later result waits for it.
    A process that takes the lock and is killed holding it leaves the same state; repair()
    sees the lock taken with nothing in the pipe, and releases it."""
    lock = pool._outqueue._wlock  # type: ignore[attr-defined]
    taker = multiprocessing.get_context("fork").Process(target=_take_and_die, args=(lock,))
    taker.start()
    taker.join(30)
    assert taker.exitcode == -signal.SIGKILL
    got: list[Any] = []
    pool.send(_size, (b"abcd",), got.append, got.append)
    wait_for(lambda: _pipe_bytes(pool._task_fd) == 0, what="the child took the task")
    t0 = time.monotonic()
    assert pool.repair(t0) is False  # first look: the lock is noted taken
    assert pool.repair(t0 + STUCK_AFTER_S / 2) is False  # not for long enough yet
    assert pool.read_results() == 0 and got == []  # the child waits for the lock
    assert pool.repair(t0 + STUCK_AFTER_S + 0.1) is True
    _collect(pool, got, 1)
    assert got == [4] and pool.repaired == 1


def test_repair_leaves_a_result_being_written_alone(pool: DirectPool) -> None:
    """A live child writing a big result holds the write lock with bytes in the pipe: no repair."""
    got: list[Any] = []
    pool.send(_blob, (8 << 20,), got.append, got.append)  # 8 MiB: more than the pipe holds
    lock = pool._outqueue._wlock  # type: ignore[attr-defined]
    wait_for(lambda: _pipe_bytes(pool.result_fd) > 0, what="the child writing its result")
    t0 = time.monotonic()
    assert not lock.acquire(False)  # the writer holds it, blocked on the full pipe
    assert pool.repair(t0) is False
    assert pool.repair(t0 + STUCK_AFTER_S + 0.1) is False
    _collect(pool, got, 1)
    assert got == [b"r" * (8 << 20)] and pool.repaired == 0


def test_repair_leaves_busy_children_alone(pool: DirectPool) -> None:
    """Tasks wait in the pipe while every child is busy: the lock is free then, and stays so."""
    got: list[Any] = []
    pool.send(time.sleep, (1.0,), got.append, got.append)
    wait_for(lambda: _pipe_bytes(pool._task_fd) == 0, what="the child took the first task")
    pool.send(_size, (b"q",), got.append, got.append)
    t0 = time.monotonic()
    assert pool.repair(t0) is False
    assert pool.repair(t0 + STUCK_AFTER_S + 0.1) is False  # the lock was free: nothing released
    _collect(pool, got, 2)
    assert got == [None, 1] and pool.repaired == 0
