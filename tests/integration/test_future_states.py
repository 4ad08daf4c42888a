"""Future states as concurrent.futures has them, against real daemons.

``running()`` turns True once a slot has started the task (the master pushes TASKS_STARTED);
``cancel()`` of a running task returns False and leaves it running, of a pending one cancels
it on the cluster; ``Client.kill`` stops a running task. Also what the ported CPython executor
tests (test_cpython_executor.py) skip but can be checked here.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pf_cftasks
import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client

TASKS = ("pf_cftasks",)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("states"))
    try:
        c.start_master()
        c.start_worker(tasks=TASKS, name="wa")
        yield c
    finally:
        c.close()


def master_state(c: Cluster, task_id: str) -> str | None:
    with Client(c.client_endpoint) as check:
        entry = check.results([task_id])[task_id]
    return None if entry is None else str(entry["state"])


def test_running_is_true_once_a_slot_started_it_and_cancel_then_refuses(
    fleet: Cluster, tmp_path: Path
) -> None:
    event = tmp_path / "go"
    with Client(fleet.client_endpoint) as c:
        f = c.submit(pf_cftasks.wait_event, str(event))
        wait_for(f.running, what="the future running")
        assert master_state(fleet, f.task_id) == "RUNNING"
        assert f.cancel() is False
        assert f.running() and not f.cancelled()
        assert master_state(fleet, f.task_id) == "RUNNING"  # nothing done on the cluster
        event.touch()
        assert f.result(60) is True
    assert master_state(fleet, f.task_id) == "SUCCEEDED"


def test_cancel_of_a_pending_task_cancels_it_on_the_cluster(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        f = c.with_options(queue="nobody-serves-this").submit(pf_cftasks.mul, 2, 3)
        wait_for(lambda: master_state(fleet, f.task_id) == "PENDING", what="the task pending")
        assert f.cancel() is True
        assert f.cancelled() and f.done()
        with pytest.raises(CancelledError):
            f.result(0)
        assert f.cancel() is True  # as Future.cancel of a cancelled future
    assert master_state(fleet, f.task_id) == "CANCELLED"


def test_cancel_racing_the_started_notice_leaves_the_future_running(fleet: Cluster, tmp_path: Path) -> None:
    """The notice is still on its way when cancel() is called: the master answers "running"."""
    event = tmp_path / "go"
    with Client(fleet.client_endpoint) as c:
        c._conn.on_started = None  # this client never hears the notice: always "in flight"
        f = c.submit(pf_cftasks.wait_event, str(event))
        wait_for(lambda: master_state(fleet, f.task_id) == "RUNNING", what="the task running")
        assert not f.running()  # the client does not know yet
        assert f.cancel() is False
        assert f.running() and not f.cancelled()
        event.touch()
        assert f.result(60) is True
    assert master_state(fleet, f.task_id) == "SUCCEEDED"


def test_kill_stops_a_running_task(fleet: Cluster, tmp_path: Path) -> None:
    with Client(fleet.client_endpoint) as c:
        f = c.submit(pf_cftasks.wait_event, str(tmp_path / "never"))
        wait_for(f.running, what="the future running")
        (outcome,) = c.kill(f)
        assert outcome["outcome"] == "cancelling"
        with pytest.raises(CancelledError):
            f.result(60)
        pending = c.with_options(queue="nobody-serves-this").submit(pf_cftasks.mul, 2, 3)
        wait_for(lambda: master_state(fleet, pending.task_id) == "PENDING", what="the task pending")
        assert [r["outcome"] for r in c.kill(pending.task_id)] == ["cancelled"]
    assert master_state(fleet, f.task_id) == "CANCELLED"
    assert master_state(fleet, pending.task_id) == "CANCELLED"


def test_shutdown_cancel_futures_lets_a_running_task_finish(fleet: Cluster, tmp_path: Path) -> None:
    event = tmp_path / "go"
    c = Client(fleet.client_endpoint)
    running = c.submit(pf_cftasks.wait_event, str(event))
    wait_for(running.running, what="the future running")
    queued = c.with_options(queue="nobody-serves-this").submit(pf_cftasks.mul, 2, 3)
    c.shutdown(wait=False, cancel_futures=True)
    wait_for(queued.cancelled, what="the pending future cancelled")
    assert running.running()
    event.touch()
    assert running.result(60) is True
    assert master_state(fleet, queued.task_id) == "CANCELLED"


def test_submit_cancel_shutdown_does_not_hang(fleet: Cluster) -> None:
    """CPython's test_hang_gh94440, with a task: a future cancelled right after its submit."""
    executor = Client(fleet.client_endpoint)
    assert executor.submit(pf_cftasks.mul, 6, 7).result(60) == 42
    executor.submit(pf_cftasks.mul, 1, 1).cancel()
    executor.shutdown(wait=True)  # returns: the cancelled or finished future is done


def test_a_finished_future_is_not_kept_by_the_client(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        f = c.submit(pf_cftasks.mul, 2, 21)
        assert f.result(60) == 42
        ref = weakref.ref(f)
        del f
        gc.collect()
        assert ref() is None


def test_tuples_come_back_as_lists(fleet: Cluster) -> None:
    """test_submit_keyword and test_map_exception, compared as msgpack gives results back."""
    with Client(fleet.client_endpoint) as c:
        assert c.submit(pf_cftasks.mul, 2, y=8).result(60) == 16
        assert c.submit(pf_cftasks.capture, 1, self=2, fn=3).result(60) == [[1], {"self": 2, "fn": 3}]
        with pytest.raises(TypeError):
            c.submit(fn=pf_cftasks.capture, arg=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            c.submit(arg=1)  # type: ignore[call-arg]
        i = c.map(pf_cftasks.divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        assert next(i) == [0, 1]
        assert next(i) == [0, 1]
        with pytest.raises(ZeroDivisionError):
            next(i)


def test_map_chunksize_with_results_msgpack_carries(fleet: Cluster) -> None:
    """ProcessPoolExecutorTest.test_map_chunksize on range(15), whose powers fit in 64 bits."""
    ref = [pf_cftasks.pow(i, i) for i in range(15)]
    with Client(fleet.client_endpoint) as c:
        for chunksize in (6, 50, 15):
            assert list(c.map(pf_cftasks.pow, range(15), range(15), chunksize=chunksize)) == ref
        with pytest.raises(ValueError):
            list(c.map(pf_cftasks.pow, range(15), range(15), chunksize=-1))
