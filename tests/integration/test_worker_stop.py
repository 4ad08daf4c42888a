"""pworker stops when told, in every way it is told, and leaves no process behind.

Each worker here runs in a session of its own (the harness starts it so), like a
shell job or a service: its forkserver and pool children share its process group,
its cmd programs have sessions of their own. After the worker exits, no process it
started (seen in /proc while it ran) and no process of its session may be alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pf_testtasks
import pytest
from pfharness import Cluster, Proc, ProcRef, kill_refs, process_tree, survivors, wait_for

from poolfleet.client import Client, TaskCancelled, TaskTimeout

#: pworker's promise: it exits within drain_timeout_s plus this after the first SIGTERM or SIGINT.
EXIT_MARGIN_S = 1.0


@pytest.fixture
def seen() -> Iterator[list[ProcRef]]:
    """Processes the test saw under its workers; whatever survives a failure is killed."""
    refs: list[ProcRef] = []
    yield refs
    kill_refs(refs)


def _kill_a_running_cpu_task(cl: Client, how: str) -> None:
    """Leave the worker with a pool child killed under a task (the case that hung ``Pool.join``)."""
    if how == "timeout":
        f = cl.with_options(timeout_s=0.3).submit(pf_testtasks.spin_for, 30)
        with pytest.raises(TaskTimeout):
            f.result(20)
    else:
        f = cl.submit(pf_testtasks.spin_for, 30)
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 1, what="the task to run")
        cl.cancel([f.task_id])
        with pytest.raises(TaskCancelled):
            f.result(20)
    assert cl.submit(pf_testtasks.add, 1, 2).result(20) == 3  # its replacement child works


def _stopped_within(w: Proc, started: float, limit_s: float) -> float:
    """Wait for ``w`` to exit; fail if it took longer than ``limit_s`` or exited non-zero."""
    try:
        rc = w.wait(limit_s + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{w.name} did not exit {limit_s + 10:.1f} s after the signal:\n{w.log_tail()}")
    took = time.monotonic() - started
    assert rc == 0, w.log_tail()
    assert took <= limit_s, f"{w.name} took {took:.2f} s to exit, more than {limit_s} s"
    w.wait_event("worker_stopped", timeout=1)
    return took


def _nothing_left(w: Proc, refs: list[ProcRef], strays: int = 0) -> None:
    """No process of the worker is alive; pool children, forkserver, tracker and cmd groups
    were stopped in order, and only ``strays`` other processes had to be swept up."""
    left = survivors(refs, session=w.pid)
    assert not left, f"{w.name} left processes behind:\n" + "\n".join(left)
    swept = sum(e["count"] for e in w.events("worker_processes_killed"))
    assert swept == strays, w.log_tail()


def _tree(w: Proc, seen: list[ProcRef], kinds: int = 3) -> list[ProcRef]:
    """Snapshot the worker's processes once the forkserver, its children and the tracker are up."""
    refs = wait_for(lambda: (t := process_tree(w.pid)) and len(t) >= kinds and t, what="worker processes")
    seen.extend(refs)
    return list(refs)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_sigterm_stops_the_worker_after_a_cpu_task_was_killed(
    make_cluster: type[Cluster], seen: list[ProcRef], how: str
) -> None:
    drain = 5.0
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", str(drain), name=f"w-{how}", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        _kill_a_running_cpu_task(cl, how)
    refs = _tree(w, seen)
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    _stopped_within(w, started, drain + EXIT_MARGIN_S)
    _nothing_left(w, refs)


def test_drain_timeout_is_honoured_and_running_work_is_killed(
    make_cluster: type[Cluster], seen: list[ProcRef], tmp_path: Path
) -> None:
    drain = 2.0
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", str(drain), "--allow-cmd", "sh", name="wdt", cpu=1, io=1)
    pidfile = tmp_path / "background.pid"
    with Client(c.client_endpoint) as cl:
        _kill_a_running_cpu_task(cl, "timeout")
        cpu = cl.submit(pf_testtasks.spin_for, 60)
        cmd = cl.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"])
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 2 and pidfile.exists(), what="two running tasks")
        background = int(wait_for(lambda: pidfile.read_text().strip(), what="the program's child"))
        refs = _tree(w, seen, kinds=5)
        assert background in {pid for pid, _ in refs}
        started = time.monotonic()
        w.signal(signal.SIGTERM)
        _stopped_within(w, started, drain + EXIT_MARGIN_S)
        w.wait_event("drain_timed_out", timeout=1)
        _nothing_left(w, refs)  # the pool child running the task, and the program's whole group
        # both tasks were handed back, not lost: they wait for another worker
        wait_for(lambda: cl.status()["counts"]["PENDING"] == 2, what="both tasks back in the queue")
        assert not cpu.done() and not cmd.done()
        cl.cancel([cpu.task_id, cmd.task_id])  # no other worker: leaving `with` would wait for them


def test_second_signal_stops_at_once_after_a_cpu_timeout(
    make_cluster: type[Cluster], seen: list[ProcRef]
) -> None:
    """Whatever the first SIGTERM left the worker doing, a second signal ends it at once."""
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", "60", name="wtwice", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        _kill_a_running_cpu_task(cl, "timeout")
    refs = _tree(w, seen)
    w.signal(signal.SIGTERM)
    w.wait_event("worker_draining")
    started = time.monotonic()
    w.signal(signal.SIGTERM)  # may find it gone already: that is the point
    _stopped_within(w, started, EXIT_MARGIN_S)
    _nothing_left(w, refs)


def test_sigterm_to_the_process_group_drains_and_exits(
    make_cluster: type[Cluster], seen: list[ProcRef]
) -> None:
    """``kill %1``, ``timeout``, a supervisor's stop-as-group: the pool children and the
    forkserver get the SIGTERM too. The running task still finishes (the worker drains),
    and the worker exits without hanging in multiprocessing's exit handler."""
    drain = 10.0
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", str(drain), name="wgroup", cpu=2, io=1)
    with Client(c.client_endpoint) as cl:
        _kill_a_running_cpu_task(cl, "timeout")
        running = cl.submit(pf_testtasks.spin_for, 1.5)
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 1, what="a running task")
        refs = _tree(w, seen, kinds=4)
        started = time.monotonic()
        os.killpg(w.pid, signal.SIGTERM)
        w.wait_event("worker_draining")
        _stopped_within(w, started, drain + EXIT_MARGIN_S)
        assert running.result(20) > 0  # finished by the pool child that got the SIGTERM too
        assert running.info["worker_id"] == "wgroup"
    _nothing_left(w, refs)


def test_ctrl_c_after_a_cpu_timeout_leaves_nothing(make_cluster: type[Cluster], seen: list[ProcRef]) -> None:
    """Ctrl-C in a terminal: SIGINT to the foreground process group; the worker stops at once."""
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", "60", name="wctrlc", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        _kill_a_running_cpu_task(cl, "timeout")
    refs = _tree(w, seen)
    started = time.monotonic()
    os.killpg(w.pid, signal.SIGINT)
    _stopped_within(w, started, EXIT_MARGIN_S)
    w.wait_event("worker_stopping_now", timeout=1)
    _nothing_left(w, refs)


def test_a_process_a_task_left_running_is_killed_at_stop(
    make_cluster: type[Cluster], seen: list[ProcRef]
) -> None:
    """A cpu task that starts a program in a session of its own and returns: the program is
    still the worker's (a descendant), and goes when the worker goes."""
    c = make_cluster()
    c.start_master()
    w = c.start_worker("--drain-timeout-s", "5", name="wstray", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:
        sleeper = cl.submit(pf_testtasks.start_sleeper, 60).result(20)
    refs = _tree(w, seen, kinds=4)
    assert sleeper in {pid for pid, _ in refs}
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    _stopped_within(w, started, 5 + EXIT_MARGIN_S)
    _nothing_left(w, refs, strays=1)
