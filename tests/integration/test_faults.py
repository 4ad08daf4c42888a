"""Failure semantics with real processes and real signals: lose nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pf_testtasks
import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client, TaskCancelled, TaskError, TaskTimeout


def test_kill9_one_of_three_workers_loses_nothing(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    victims = [c.start_worker(name=f"w{i}", cpu=1, io=2) for i in range(3)]
    with Client(c.client_endpoint) as cl:
        futs = cl.submit_many(pf_testtasks.spin_for, [((0.002,), {}) for _ in range(2000)])
        # kill a worker while it is busy
        wait_for(lambda: sum(f.done() for f in futs) >= 200, timeout=60, what="200 results")
        victims[1].kill()
        for f in futs:
            f.result(120)
        assert c.master is not None
        c.master.wait_event("worker_expired")
        st = cl.status()
        assert st["counts"]["SUCCEEDED"] == 2000  # each result recorded exactly once
        assert (
            st["counts"]["PENDING"] == 0 and st["counts"]["RUNNING"] == 0 and st["counts"]["DISPATCHED"] == 0
        )
        # the killed worker, restarted, rejoins and gets work
        again = c.start_worker(name="w1-again", cpu=1, io=2)
        futs2 = cl.submit_many(pf_testtasks.spin_for, [((0.01,), {}) for _ in range(60)])
        for f in futs2:
            f.result(60)
        assert "w1-again" in {f.info["worker_id"] for f in futs2}
        assert again.alive()
    assert c.journal_counts_when({"SUCCEEDED": 2060}) == {"SUCCEEDED": 2060}


@pytest.mark.parametrize("how", ["sigkill", "exit", "segfault"])
def test_dead_pool_child_fails_task_and_is_replaced(make_cluster: type[Cluster], how: str) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wk", cpu=2)
    with Client(c.client_endpoint) as cl:
        started = time.monotonic()
        f = cl.submit(pf_testtasks.kill_self, how)
        with pytest.raises(TaskError) as info:
            f.result(30)
        assert time.monotonic() - started < 5 + 2  # within 5 s of the death, plus submit overhead
        assert info.value.type == "ChildDied"
        expected = {"sigkill": "SIGKILL", "exit": "exit code 7", "segfault": "SIGSEGV"}[how]
        assert expected in info.value.message
        # full capacity afterwards: two tasks run at the same time in two different children
        a, b = (cl.submit(pf_testtasks.span, 0.5) for _ in range(2))
        (pa, sa, ea), (pb, sb, eb) = a.result(30), b.result(30)
        assert pa != pb
        assert max(sa, sb) < min(ea, eb)  # the two spans overlap
        ws = cl.workers()
        assert ws[0]["slots"]["cpu"] == 2 and ws[0]["busy"]["cpu"] == 0


def test_dead_child_retries_per_retries_and_poison_guard(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master("--max-lost", "2", "--backoff-base-s", "0.01")
    c.start_worker(name="wp", cpu=2)
    with Client(c.client_endpoint) as cl:
        f = cl.with_options(retries=10).submit(pf_testtasks.kill_self, "sigkill")
        with pytest.raises(TaskError) as info:
            f.result(60)
    assert info.value.type == "PoisonTask"
    assert "3 times" in info.value.message and "max_lost=2" in info.value.message
    assert f.info["attempt"] == 3


def test_retries_with_backoff_then_success(make_cluster: type[Cluster], tmp_path: Path) -> None:
    c = make_cluster()
    c.start_master("--backoff-base-s", "0.05")
    c.start_worker(name="wr")
    marker = tmp_path / "flaky"
    with Client(c.client_endpoint) as cl:
        f = cl.with_options(retries=3).submit(pf_testtasks.flaky, str(marker), 2)
        assert f.result(30) == 3
        assert f.info["attempt"] == 3
        g = cl.with_options(retries=1).submit(pf_testtasks.flaky, str(tmp_path / "f2"), 5)
        with pytest.raises(TaskError, match="attempt 2 fails"):
            g.result(30)
    assert c.master is not None
    retried = c.master.events("task_retried")
    assert len(retried) >= 3
    assert all(e["delay_s"] > 0 for e in retried)


def test_cpu_timeout_kills_child(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wt", cpu=1)
    with Client(c.client_endpoint) as cl:
        f = cl.with_options(timeout_s=0.3).submit(pf_testtasks.spin_for, 30)
        with pytest.raises(TaskTimeout, match="pool child was killed"):
            f.result(20)
        # the single slot is usable again right away
        assert cl.submit(pf_testtasks.add, 1, 1).result(20) == 2


def test_io_timeout_keeps_slot_busy_until_thread_returns(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wio", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        f = cl.with_options(timeout_s=0.2).submit(pf_testtasks.io_sleep, 2.0)
        with pytest.raises(TaskTimeout, match="cannot be stopped"):
            f.result(20)
        # the abandoned thread still holds the only io slot
        ws = cl.workers()
        assert ws[0]["held"] == {"io": 1}
        g = cl.submit(pf_testtasks.io_sleep, 0.01)
        assert g.result(20) == "slept 0.01"
        # it could only run after the first thread returned (2 s after it started)
        wait_for(lambda: cl.workers()[0]["held"] == {}, timeout=10, what="held slot released")


def test_cmd_timeout_kills_process_group(make_cluster: type[Cluster], tmp_path: Path) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--allow-cmd", "sh", name="wcmd")
    pidfile = tmp_path / "grandchild.pid"
    with Client(c.client_endpoint) as cl:
        script = f"sleep 60 & echo $! > {pidfile}; wait"
        f = cl.with_options(timeout_s=0.5).run(["sh", "-c", script])
        with pytest.raises(TaskTimeout, match="process group was killed"):
            f.result(20)
    grandchild = int(pidfile.read_text())

    def gone() -> bool:
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state == "Z"

    wait_for(gone, timeout=10, what="the program's child to be killed too")


def test_cancel_running_by_kind(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--allow-cmd", "sleep", name="wcan", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        cpu = cl.submit(pf_testtasks.spin_for, 30)
        io = cl.submit(pf_testtasks.io_sleep, 1.5)
        cmd = cl.run(["sleep", "30"])
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 3, what="three running tasks")
        out = cl.cancel([cpu.task_id, io.task_id, cmd.task_id])
        assert [o["outcome"] for o in out] == ["cancelling"] * 3
        for f, msg in (
            (cpu, "pool child was killed"),
            (io, "result is discarded"),
            (cmd, "process group was killed"),
        ):
            with pytest.raises(TaskCancelled, match=msg):
                f.result(20)
        assert cl.submit(pf_testtasks.add, 2, 2).result(20) == 4


def test_max_tasks_per_child_recycles(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--max-tasks-per-child", "2", name="wm", cpu=1)
    with Client(c.client_endpoint) as cl:
        pids = [cl.submit(pf_testtasks.pid_and_host).result(20)[0] for _ in range(6)]
    # one slot, two tasks per child: at least three different children served them
    assert len(set(pids)) >= 3
    assert all(pids.count(p) <= 2 for p in set(pids))


def test_sigterm_drains_worker(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", "20", name="wdrain", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        running = cl.submit(pf_testtasks.spin_for, 1.0)
        queued = [cl.submit(pf_testtasks.add, i, 0) for i in range(5)]
        wait_for(lambda: cl.status()["counts"]["RUNNING"] >= 1, what="a running task")
        w.signal(signal.SIGTERM)
        w.wait_event("worker_draining")
        assert w.wait(30) == 0
        assert running.result(20) > 0  # the running task finished on the draining worker
        assert running.info["worker_id"] == "wdrain"
        # the rest went back to the master and run on a new worker
        c.start_worker(name="wnext")
        assert [f.result(30) for f in queued] == list(range(5))


def test_second_signal_stops_at_once_and_master_requeues(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", "60", name="wquit", cpu=1)
    with Client(c.client_endpoint) as cl:
        f = cl.submit(pf_testtasks.spin_for, 0.5)
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 1, what="running task")
        w.signal(signal.SIGTERM)
        w.wait_event("worker_draining")
        w.signal(signal.SIGINT)
        assert w.wait(15) == 0
        c.start_worker(name="wrescue", cpu=1)
        assert f.result(30) > 0
        assert f.info["worker_id"] == "wrescue"


def test_sigterm_on_master_exits_zero(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master()
    # no worker: the task stays pending, so the client is not left with `with` (which waits for
    # it); the cluster's cleanup shuts it down
    cl = c.client()
    f = cl.submit(pf_testtasks.add, 1, 2)
    f.ack.result(10)  # type: ignore[union-attr]
    m.signal(signal.SIGTERM)
    assert m.wait(15) == 0
    m.wait_event("master_stopped")
    assert c.journal_counts() == {"PENDING": 1}


def test_kill9_master_mid_run_then_restart(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master()
    c.start_worker(name="wx", cpu=2)
    c.start_worker(name="wy", cpu=2)
    n = 5000
    with Client(c.client_endpoint) as cl:
        futs = cl.submit_many(pf_testtasks.spin_for, [((0.001,), {}) for _ in range(n)])
        wait_for(lambda: sum(f.done() for f in futs) >= 500, timeout=60, what="500 results")
        m.kill()
        c.restart_master()
        for f in futs:
            f.result(180)
        st = cl.status()
    assert st["counts"].get("SUCCEEDED") == n
    assert c.journal_counts_when({"SUCCEEDED": n}) == {"SUCCEEDED": n}


def test_ptask_wait_survives_master_restart(make_cluster: type[Cluster]) -> None:
    import subprocess

    from pfharness import BIN, daemon_env

    c = make_cluster()
    m = c.start_master()
    env = daemon_env({"POOLFLEET_MASTER": c.client_endpoint})
    p = subprocess.Popen(
        [str(BIN / "ptask"), "submit", "pf_testtasks:add", "20", "22", "--wait", "--json", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: c.journal_counts().get("PENDING") == 1, what="the submit to be journalled")
        m.kill()
        c.restart_master()
        c.start_worker(name="wlate")
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert json.loads(out)["result"] == 42


def test_worker_reconnects_and_delivers_buffered_results(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master()
    w = c.start_worker(name="wbuf", cpu=1)
    with Client(c.client_endpoint) as cl:
        f = cl.submit(pf_testtasks.spin_for, 1.5)
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 1, what="running")
        m.kill()
        # the task finishes while the master is away; the worker buffers the result
        w.wait_event("master_lost", timeout=20)
        c.restart_master()
        w.wait_event("worker_registered", count=2, timeout=30)
        assert f.result(30) > 0
        assert f.info["attempt"] == 1  # adopted, not rerun
    assert c.master is not None
    adopted = c.master.wait_event("worker_registered")
    assert adopted["adopted"] == 1


def test_result_ttl_expires_results(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master("--result-ttl-s", "0.5")
    c.start_worker(name="wttl")
    with Client(c.client_endpoint) as cl:
        f = cl.submit(pf_testtasks.add, 1, 1)
        assert f.result(20) == 2
        assert cl.results([f.task_id])[f.task_id]["state"] == "SUCCEEDED"
        wait_for(lambda: cl.results([f.task_id])[f.task_id] is None, timeout=10, what="expiry")
    assert c.journal_counts() == {}


def test_worker_expired_when_silent_and_tasks_rerun(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    frozen = c.start_worker(name="wfrozen", cpu=1)
    with Client(c.client_endpoint) as cl:
        f = cl.submit(pf_testtasks.spin_for, 0.5)
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 1, what="running")
        frozen.signal(signal.SIGSTOP)  # alive but silent: no heartbeats
        try:
            assert c.master is not None
            c.master.wait_event("worker_expired", timeout=20)
            c.start_worker(name="wlive", cpu=1)
            assert f.result(30) > 0
            assert f.info["worker_id"] == "wlive"
            assert f.info["attempt"] == 2
        finally:
            frozen.signal(signal.SIGCONT)
        # the frozen worker wakes up, its stale result is dropped, and it rejoins
        c.master.wait_event("result_dropped", timeout=20)
        frozen.wait_event("worker_registered", count=2, timeout=20)
        assert cl.status()["counts"]["SUCCEEDED"] == 1


def test_client_resends_unacknowledged_submits_after_master_restart(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master()
    with Client(c.client_endpoint) as cl:
        assert cl.status()["counts"]["PENDING"] == 0  # connected
        m.kill()
        # submitted while no master runs: nothing acknowledges these yet
        futs = cl.submit_many(pf_testtasks.add, [((i, i), {}) for i in range(50)])
        assert not any(f.ack.done() for f in futs)  # type: ignore[union-attr]
        c.restart_master()
        c.start_worker(name="wafter")
        assert [f.result(60) for f in futs] == [2 * i for i in range(50)]
    assert c.journal_counts_when({"SUCCEEDED": 50}) == {"SUCCEEDED": 50}


def test_worker_takes_heartbeat_timing_from_the_master(make_cluster: type[Cluster]) -> None:
    c = make_cluster()  # master: 0.2 s heartbeats, liveness 3
    m = c.start_master()
    # the worker's own settings would give the master 90 s before it counts as lost
    w = c.start_worker("--heartbeat-interval-s", "30", "--liveness", "3", name="wslow")
    m.kill()
    lost = w.wait_event("master_lost", timeout=15)
    assert "no message for" in lost["reason"]


def test_stale_result_does_not_free_the_slot_of_the_current_attempt(make_cluster: type[Cluster]) -> None:
    import zmq
    from pfpeers import RawPeer

    from poolfleet.common.protocol import PROTOCOL_VERSION, MsgKind

    c = make_cluster()
    c.start_master("--backoff-base-s", "0.01")
    ctx = zmq.Context()
    fake = RawPeer(ctx, c.worker_endpoint, identity=b"fake-worker")
    try:
        fake.send(
            MsgKind.HELLO,
            {
                "version": PROTOCOL_VERSION,
                "role": "worker",
                "worker_id": "fake",
                "queues": ["default"],
                "slots": {"cpu": 1},
                "tasks": {"poolfleet.worker.builtins:noop": {"kind": "cpu"}},
            },
        )
        assert fake.recv_until(MsgKind.WELCOME) is not None
        with Client(c.client_endpoint) as cl:
            f = cl.with_options(retries=1).submit("poolfleet.worker.builtins:noop")
            first = fake.recv_until(MsgKind.DISPATCH)
            assert first is not None
            tid = first["tasks"][0]["id"]
            failed = {
                "id": tid,
                "attempt": 1,
                "state": "FAILED",
                "error": {"type": "RuntimeError", "message": "x", "traceback": ""},
            }
            fake.send(MsgKind.TASK_RESULTS, {"results": [failed]})
            second = fake.recv_until(MsgKind.DISPATCH)
            assert second is not None and second["tasks"][0]["attempt"] == 2
            # a late duplicate of attempt 1 arrives while attempt 2 runs on the same worker
            fake.send(MsgKind.TASK_RESULTS, {"results": [failed]})
            assert c.master is not None
            c.master.wait_event("result_dropped")
            assert cl.workers()[0]["busy"]["cpu"] == 1
            fake.send(
                MsgKind.TASK_RESULTS,
                {"results": [{"id": tid, "attempt": 2, "state": "SUCCEEDED", "value": b"\xc0"}]},
            )
            assert f.result(20) is None
            assert cl.workers()[0]["busy"]["cpu"] == 0
    finally:
        fake.close()
        ctx.term()


def at_worker(counts: dict[str, int]) -> int:
    return counts.get("DISPATCHED", 0) + counts.get("RUNNING", 0)


def test_cancel_of_a_cpu_task_still_queued_in_the_pool(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wq", cpu=1)
    with Client(c.client_endpoint) as cl:
        # short tasks first: the master learns they are short and prefetches (it sends nothing
        # beyond the free slots while run times are unknown)
        assert [f.result(20) for f in [cl.submit(pf_testtasks.add, i, 1) for i in range(4)]] == [1, 2, 3, 4]
        running = cl.submit(pf_testtasks.spin_for, 30)
        queued = cl.submit(pf_testtasks.spin_for, 30)  # handed to the pool behind the first
        wait_for(lambda: at_worker(cl.status()["counts"]) == 2, what="both tasks on the worker")
        cl.cancel([queued.task_id])
        with pytest.raises(TaskCancelled):
            queued.result(20)
        cl.cancel([running.task_id])
        with pytest.raises(TaskCancelled):
            running.result(20)
        # the queued task must not run its 30 s once a child picks it up: its child is killed
        assert cl.submit(pf_testtasks.add, 2, 2).result(20) == 4
