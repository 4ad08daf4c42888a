"""Future states as concurrent.futures has them, against real daemons.

``running()`` turns True once a slot has started the task (the master pushes TASKS_STARTED);
``cancel()`` of a running task returns False and leaves it running, of a pending one cancels
it on the cluster; ``Client.kill`` stops a running task. Also what the ported CPython executor
tests (test_cpython_executor.py) skip but can be checked here.
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pf_cftasks
import pytest
import zmq
from pfharness import Cluster, wait_for
from pfpeers import FakeMaster, dispatch_entry

from poolfleet.client import Client
from poolfleet.common import messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import MsgKind

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


class RecordingMaster(FakeMaster):
    """A fake master that also keeps the STARTED messages it gets."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        super().__init__(ctx)
        self.started: list[bytes] = []

    def _handle(self, frames: list[bytes]) -> None:
        super()._handle(frames)
        try:
            kind, body = messages.decode(frames[1:])
        except ProtocolError:
            return
        if kind is MsgKind.STARTED:
            self.started += [t["id"] for t in body["tasks"]]

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.send(MsgKind.HEARTBEAT, {"master_id": "fake-master"})
            self.pump(0.05)


def test_a_worker_cancels_unless_started_only_what_no_slot_has_started(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    """CANCEL_TASKS with if_not_started: a started job goes on (and is said STARTED at once),
    one still queued is cancelled."""
    c = make_cluster()
    ctx: zmq.Context[Any] = zmq.Context()
    fake = RecordingMaster(ctx)
    event = tmp_path / "go"
    try:
        c.start_worker(master=fake.endpoint, wait=False, cpu=1, tasks=TASKS, name="wsoft")
        fake.wait_worker()
        running = dispatch_entry("pf_cftasks:wait_event", str(event), kind="cpu")
        queued = dispatch_entry("pf_cftasks:mul", 2, 3, kind="cpu")  # behind it: one cpu slot
        fake.dispatch([running, queued])
        fake.wait_until("the first job said started", lambda: running["id"] in fake.started)
        told = len(fake.started)
        refs = [{"id": t["id"], "attempt": 1, "if_not_started": True} for t in (running, queued)]
        fake.send(MsgKind.CANCEL_TASKS, {"tasks": refs})
        results = fake.wait_results([queued["id"]])
        assert results[queued["id"]]["state"] == "CANCELLED"
        fake.wait_until("the started job said started again", lambda: len(fake.started) > told)
        assert fake.started[told:] == [running["id"]]
        assert running["id"] not in fake.results  # not cancelled: it runs on
        event.touch()
        assert fake.wait_results([running["id"]])[running["id"]]["state"] == "SUCCEEDED"
    finally:
        fake.close()
        c.close()
        ctx.destroy(linger=0)
