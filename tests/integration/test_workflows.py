"""Workflows against real daemons: futures as arguments (chords, chains), after=, failures and
cancels that reach the tasks waiting, refusals at submit, delayed tasks, and both kinds of
held task surviving a kill -9 of the master."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pf_flowtasks as flow
import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client, TaskError, TaskRef
from poolfleet.client.remote import TaskCancelledError
from poolfleet.common.errors import PoolfleetError, RemoteError
from poolfleet.common.ids import format_id, new_task_id

TASKS = ("pf_flowtasks",)


def cluster(make_cluster: Callable[..., Cluster], *master_args: str, workers: int = 1) -> Cluster:
    c = make_cluster()
    c.start_master(*master_args)
    for _ in range(workers):
        c.start_worker(tasks=TASKS, cpu=1, io=2)
    return c


def state_of(cl: Client, fut: Any) -> str | None:
    entry = cl.results([fut.task_id])[fut.task_id]
    return None if entry is None else str(entry["state"])


def test_a_chord_of_100_over_two_workers(make_cluster: Callable[..., Cluster]) -> None:
    c = cluster(make_cluster, workers=2)
    cl = c.client()
    parts = [cl.submit(flow.square, i) for i in range(100)]
    chord = cl.submit(flow.total, parts)
    assert chord.result(120) == sum(i * i for i in range(100))
    assert {p.info.get("worker_id") for p in parts} == {"w2", "w3"}  # both workers ran squares
    assert chord.info["attempt"] == 1


def test_a_chain_of_three_whose_middle_fails_fails_the_last_at_once_naming_it(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = cluster(make_cluster)
    cl = c.client()
    first = cl.submit(flow.square, 3)
    middle = cl.submit(flow.boom, first)
    last = cl.submit(flow.add, middle, 1)
    assert first.result(60) == 9
    with pytest.raises(TaskError) as failed:
        middle.result(60)
    assert failed.value.type == "ValueError" and "boom on 9" in str(failed.value)
    with pytest.raises(TaskError) as dep:
        last.result(60)
    assert dep.value.type == "DependencyFailed"
    assert middle.task_id in str(dep.value) and "FAILED" in str(dep.value)
    assert last.info["attempt"] == 0  # never sent to a worker
    shown = c.ptask("result", last.task_id)
    assert shown.returncode == 1 and middle.task_id in shown.stderr, shown
    (again,) = cl.retry([last.task_id])  # its arguments still refer to the failed task
    assert again["outcome"] == "retried", again
    with pytest.raises(TaskError) as retried:
        cl.future(format_id(again["new_id"])).result(60)
    assert retried.value.type == "DependencyFailed" and middle.task_id in str(retried.value)


def test_cancelling_a_task_cancels_what_waits_on_it(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(make_cluster)
    cl = c.client()
    gate = cl.submit(flow.gate, str(tmp_path / "never"))  # runs on the worker until killed
    child = cl.submit(flow.echo, [gate])
    grandchild = cl.with_options(after=[child]).submit(flow.echo, 1)
    wait_for(lambda: state_of(cl, gate) == "RUNNING", 60, what="the gate running")
    assert state_of(cl, child) == "WAITING" and state_of(cl, grandchild) == "WAITING"
    status = c.ptask("status", "--json")
    assert json.loads(status.stdout)["counts"]["WAITING"] == 2, status
    assert gate.cancel() is False  # a running task: Future.cancel leaves it alone
    assert [o["outcome"] for o in cl.kill(gate)] == ["cancelling"]  # the cluster's cancel
    for fut in (child, grandchild):
        with pytest.raises(TaskCancelledError):
            cl.future(fut.task_id).result(60)
    entry = cl.results([grandchild.task_id])[grandchild.task_id]
    assert entry["state"] == "CANCELLED" and entry["error"]["type"] == "DependencyFailed"
    assert entry["error"]["dependency"] == child.task_id


def test_a_dependency_the_master_does_not_know_is_refused_at_submit(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = cluster(make_cluster)
    cl = c.client()
    nobody = TaskRef(new_task_id())
    for fut in (cl.submit(flow.echo, {"x": [nobody]}), cl.with_options(after=[nobody]).submit(flow.echo, 1)):
        with pytest.raises(RemoteError) as refused:
            fut.result(30)
        assert refused.value.code == "unknown_id" and "does not know" in str(refused.value)
    with pytest.raises(PoolfleetError, match="no time zone"):
        from datetime import datetime

        cl.with_options(eta=datetime(2026, 12, 24, 18))
    assert cl.submit(flow.square, 2).result(30) == 4  # the master and client go on


def test_ptask_passes_references_and_orders_with_after(make_cluster: Callable[..., Cluster]) -> None:
    c = cluster(make_cluster)
    first = c.ptask("submit", "pf_flowtasks:square", "4")
    assert first.returncode == 0, first
    tid = first.stdout.strip()
    second = c.ptask("submit", "pf_flowtasks:add", json.dumps({"$ref": tid}), "1", "--wait")
    assert (second.returncode, second.stdout.strip()) == (0, "17"), second
    third = c.ptask("submit", "pf_flowtasks:echo", "x", "--after", tid[:13], "--json")
    assert json.loads(third.stdout)["state"] == "WAITING", third
    unknown = c.ptask("submit", "pf_flowtasks:echo", "x", "--after", format_id(new_task_id()))
    assert unknown.returncode != 0
    naive = c.ptask("submit", "pf_flowtasks:echo", "x", "--at", "2026-12-24T18:00:00")
    assert naive.returncode == 2 and "offset" in naive.stderr, naive


def test_a_delayed_task_runs_at_its_time_not_before(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(make_cluster)
    cl = c.client()
    stamps = tmp_path / "stamps"
    asked = time.time()
    later = cl.with_options(delay_s=3).submit(flow.stamp, str(stamps), "delay")
    parked = cl.with_options(delay_s=3600).submit(flow.stamp, str(stamps), "parked")
    assert later.result(60) >= asked + 3
    shown = c.ptask("result", parked.task_id)
    assert shown.returncode == 0 and "DELAYED" in shown.stdout, shown
    assert json.loads(c.ptask("status", "--json").stdout)["counts"]["DELAYED"] == 1
    cancelled = c.ptask("cancel", parked.task_id, "--json")
    assert json.loads(cancelled.stdout)[0]["outcome"] == "cancelled", cancelled
    at = time.time() + 2
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(at + 1))
    out = c.ptask("submit", "pf_flowtasks:stamp", str(stamps), "at", "--at", iso, "--json")
    assert json.loads(out.stdout)["state"] == "DELAYED", out
    tid = json.loads(out.stdout)["id"]
    assert cl.future(tid).result(60) >= int(at + 1)
    delayed = c.ptask("submit", "pf_flowtasks:stamp", str(stamps), "d2", "--delay", "2s", "--wait")
    assert delayed.returncode == 0, delayed


def test_waiting_and_delayed_tasks_survive_a_kill_9_of_the_master(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(make_cluster, "--recovery-grace-s", "1")
    cl = c.client()
    door = tmp_path / "door"
    gate = cl.with_options(kind="io").submit(flow.gate, str(door))  # leaves the cpu slot free
    dependent = cl.submit(flow.add, cl.submit(flow.square, 5), 0)
    waiter = cl.submit(flow.echo, [gate, dependent])
    delayed = cl.with_options(delay_s=15).submit(flow.stamp, str(tmp_path / "stamps"), "late")
    asked = time.time()
    assert dependent.result(60) == 25
    wait_for(lambda: state_of(cl, waiter) == "WAITING" and state_of(cl, delayed) == "DELAYED", 30)
    # a result is pushed to its client before the commit that records it: wait for that commit
    # (the square and the add journalled SUCCEEDED), not only for the client's answer
    wait_for(lambda: c.journal_counts().get("SUCCEEDED") == 2, 30, what="the finished tasks' commit")
    counts = c.journal_counts()
    assert counts.get("WAITING") == 1 and counts.get("DELAYED") == 1, counts
    assert c.master is not None
    c.master.kill()  # SIGKILL
    c.restart_master("--recovery-grace-s", "1")
    door.write_text("open")
    again = c.client()
    assert again.future(waiter.task_id).result(90) == ["open", 25]
    assert again.future(delayed.task_id).result(90) >= asked + 15


def test_results_referred_to_are_kept_past_their_ttl(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(make_cluster, "--result-ttl-s", "1")
    cl = c.client()
    door = tmp_path / "door"
    needed, other = cl.submit(flow.square, 6), cl.submit(flow.square, 7)
    gate = cl.with_options(kind="io").submit(flow.gate, str(door))
    waiter = cl.submit(flow.echo, [needed, gate])
    assert (needed.result(60), other.result(60)) == (36, 49)
    wait_for(lambda: state_of(cl, other) is None, 60, what="the unneeded result to expire")
    assert state_of(cl, needed) == "SUCCEEDED"  # kept: a waiting task refers to it
    door.write_text("go")
    assert waiter.result(60) == [36, "go"]
