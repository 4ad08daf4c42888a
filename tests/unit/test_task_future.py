"""TaskFuture's states without a cluster: the Condition it makes only when something waits,
watches or cancels (client.TaskFuture._condition), and the futures API around it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, as_completed, wait
from typing import Any

import pytest

from poolfleet.client.client import TaskFuture


def make() -> TaskFuture:
    return TaskFuture(b"\x01" * 16, "tasks.noop", client=None)  # type: ignore[arg-type]


def until(seen: Callable[[], bool], what: str) -> None:
    """Until another thread has done what ``seen`` looks for (its own step is the signal; the
    interpreter's switch interval hands it the GIL)."""
    deadline = time.monotonic() + 10
    while not seen():
        assert time.monotonic() < deadline, what


def waiting_on(f: TaskFuture) -> None:
    """Until a thread waits on the future's condition."""
    until(lambda: f._cond is not None and len(f._cond._waiters) > 0, "no thread came to wait")  # type: ignore[attr-defined]


def test_has_every_field_a_future_sets_up_but_the_condition() -> None:
    # a Python whose Future.__init__ sets up more would break TaskFuture's own __init__
    fields = set(vars(Future())) - {"_condition"}
    assert fields <= set(vars(make()))


def test_settled_with_nobody_watching_makes_no_condition() -> None:
    f = make()
    assert f._start() is True
    assert f.running()  # asking takes the lock: the condition is made here
    g = make()
    assert g._start() and g._start()  # running stays running
    g._settle(42, None)
    assert g._cond is None
    assert g.done() and g.result() == 42 and g.exception() is None
    assert not g._start()  # done: no start after it


def test_exception_settled_without_a_condition_is_raised() -> None:
    f = make()
    err = ValueError("boom")
    f._settle(None, err)
    assert f.done() and f.exception() is err
    with pytest.raises(ValueError, match="boom"):
        f.result()
    f._settle(1, None)  # a second result leaves the first
    assert f.exception() is err


def test_a_thread_waiting_in_result_is_woken_by_the_result() -> None:
    f = make()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(f.result(timeout=10)))
    t.start()
    waiting_on(f)
    f._settle("value", None)
    t.join(10)
    assert got == ["value"]


def test_wait_and_as_completed_see_a_result_settled_after_they_began() -> None:
    a, b = make(), make()
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(wait([a, b], timeout=10, return_when=FIRST_COMPLETED)))
    t.start()
    # wait() adds its waiter under each future's condition, then blocks
    until(lambda: bool(b._waiters), "wait() did not begin")
    b._settle(2, None)
    t.join(10)
    done, pending = out[0]
    assert done == {b} and pending == {a}
    a._settle(1, None)
    assert sorted(x.result() for x in as_completed([a, b], timeout=10)) == [1, 2]


def test_done_callbacks_run_once_before_or_after_the_result() -> None:
    f = make()
    seen: list[Any] = []
    f.add_done_callback(lambda x: seen.append(("before", x.result())))
    f._settle(7, None)
    f.add_done_callback(lambda x: seen.append(("after", x.result())))
    assert seen == [("before", 7), ("after", 7)]


def test_a_local_cancel_stands_against_a_late_result() -> None:
    f = make()
    f._cancel_here()
    assert f.cancelled() and f.done()
    f._settle(1, None)
    assert f.cancelled()
    with pytest.raises(CancelledError):
        f.result()


def test_a_started_future_cannot_be_cancelled_here() -> None:
    f = make()
    f._start()
    f._cancel_here()
    assert not f.cancelled() and f.running()
    f._settle(3, None)
    assert f.result() == 3


def test_asyncio_wraps_it() -> None:
    f = make()

    async def main() -> Any:
        wrapped = asyncio.wrap_future(f)
        asyncio.get_running_loop().call_soon(f._settle, "async", None)
        return await asyncio.wait_for(wrapped, 10)

    assert asyncio.run(main()) == "async"


def test_two_threads_asking_at_once_get_one_condition() -> None:
    f = make()
    conds: list[Any] = []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        conds.append(f._condition)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(conds) == 8 and all(c is conds[0] for c in conds)


def test_a_forked_child_is_not_stuck_on_a_lock_its_parent_held() -> None:
    import os
    import select
    import signal

    from poolfleet.client import client as client_module

    client_module._COND_LOCK.acquire()  # as if another thread were making a condition
    try:
        pid = os.fork()
        if pid == 0:  # the child: a future's condition must not wait for the parent's lock
            try:
                f = make()
                f.add_done_callback(lambda _f: None)
                f._settle(1, None)
                os._exit(0 if f.result() == 1 else 1)
            finally:
                os._exit(2)
    finally:
        client_module._COND_LOCK.release()
    pidfd = os.pidfd_open(pid)  # readable once the child has exited
    try:
        exited, _, _ = select.select([pidfd], [], [], 20)
    finally:
        os.close(pidfd)
    if not exited:
        os.kill(pid, signal.SIGKILL)  # the child this test forked
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the future's lock")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
