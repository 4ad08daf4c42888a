"""Operating the fleet from ptask against real daemons: find tasks (ptask tasks), ids by unique
prefix, inspect one (ptask show) with its attempts, retry final tasks as new ones, and pause and
resume a queue."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client
from poolfleet.client.cli_ops import when

T = "pf_testtasks"

Journal = tuple[tuple[str, ...], dict[str, str] | None]


@pytest.fixture(params=["sqlite", "postgresql"])
def journal(request: pytest.FixtureRequest) -> Journal:
    """Every test here runs on both journals: (pmaster arguments, environment) of each."""
    if request.param == "sqlite":
        return (), None
    pg = request.getfixturevalue("pg_server")
    return ("--journal", pg.url(pg.new_database())), pg.env


def listing(c: Cluster, *args: str) -> dict[str, Any]:
    out = c.ptask("tasks", "--json", *args)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def unique_prefix(tid: str, others: list[str]) -> str:
    """The shortest prefix of ``tid`` (dashes dropped) that no id in ``others`` shares."""
    h = tid.replace("-", "")
    hs = [o.replace("-", "") for o in others if o != tid]
    for n in range(1, 33):
        if not any(o.startswith(h[:n]) for o in hs):
            return h[:n]
    return h


def test_tasks_lists_open_and_finished_newest_first_with_filters_and_pages(
    make_cluster: type[Cluster], journal: Journal
) -> None:
    c = make_cluster()
    c.start_master(*journal[0], env=journal[1])
    c.start_worker(name="wa")
    cl: Client = c.client()
    adds = [cl.submit(f"{T}:add", i, 1) for i in range(3)]
    assert [f.result(20) for f in adds] == [1, 2, 3]
    bad = cl.submit(f"{T}:boom", "no good")
    assert wait_for(bad.done, what="the failed task")
    parked = cl.with_options(queue="nobody").submit(f"{T}:add", 5, 5)  # no worker serves it
    assert parked.ack is not None
    parked.ack.result(10)
    # newest first is id order: ids made in one millisecond differ only in their random bits
    ids = [*sorted(f.task_id for f in adds), bad.task_id, parked.task_id]
    worker_of = {f.task_id: f.info.get("worker_id") for f in adds}
    assert set(worker_of.values()) == {"wa"}

    doc = listing(c)
    got = [
        (t["id"], t["state"], t["name"], t["queue"], t["attempt"], t.get("worker_id")) for t in doc["tasks"]
    ]
    assert got == [
        (ids[4], "PENDING", f"{T}:add", "nobody", 0, None),
        (ids[3], "FAILED", f"{T}:boom", "default", 1, "wa"),
        (ids[2], "SUCCEEDED", f"{T}:add", "default", 1, "wa"),
        (ids[1], "SUCCEEDED", f"{T}:add", "default", 1, "wa"),
        (ids[0], "SUCCEEDED", f"{T}:add", "default", 1, "wa"),
    ]
    assert doc["next"] is None

    out = c.ptask("tasks", "--state", "failed")
    created = when(doc["tasks"][1]["created_at"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"task{' ' * 34}state   name{' ' * 15}queue    attempt  worker  created (UTC)",
        f"{ids[3]}  FAILED  pf_testtasks:boom  default        1  wa      {created}",
    ]

    # filters combine; a page ends with the cursor of the next one
    page = listing(c, "--name", f"{T}:add", "--queue", "default", "--limit", "2")
    assert [t["id"] for t in page["tasks"]] == [ids[2], ids[1]]
    assert page["next"] == ids[1]
    rest = listing(c, "--name", f"{T}:add", "--queue", "default", "--limit", "2", "--before", page["next"])
    assert [t["id"] for t in rest["tasks"]] == [ids[0]] and rest["next"] is None
    out = c.ptask("tasks", "--name", f"{T}:add", "--limit", "1")
    assert out.stdout.splitlines()[-1] == f"(more: add --before {ids[4]})"

    assert [t["id"] for t in listing(c, "--state", "PENDING", "--state", "FAILED")["tasks"]] == [
        ids[4],
        ids[3],
    ]
    assert [
        t["id"] for t in listing(c, "--worker", "wa", "--state", "SUCCEEDED", "--limit", "1")["tasks"]
    ] == [ids[2]]
    assert listing(c, "--since", "1d")["tasks"][-1]["id"] == ids[0]
    assert c.ptask("tasks", "--worker", "nobody-at-all").stdout == "no tasks\n"
    out = c.ptask("tasks", "--state", "DONE")
    assert out.returncode == 2
    assert "unknown state 'DONE'" in out.stderr
    out = c.ptask("tasks", "--since", "yesterday")
    assert out.returncode == 2 and "--since takes a duration like 30s" in out.stderr


def test_show_a_failed_task_by_prefix_and_result_and_cancel_take_prefixes(
    make_cluster: type[Cluster], journal: Journal
) -> None:
    c = make_cluster()
    c.start_master(*journal[0], env=journal[1])
    c.start_worker(name="wa")
    cl: Client = c.client()
    bad = cl.with_options(timeout_s=7.5).submit(f"{T}:boom", "x" * 300)
    assert wait_for(bad.done, what="the failed task")
    good = cl.submit(f"{T}:add", 2, 3)
    assert good.result(20) == 5
    parked = cl.with_options(queue="nobody").submit(f"{T}:add", 1, 1)
    assert parked.ack is not None
    parked.ack.result(10)
    ids = [bad.task_id, good.task_id, parked.task_id]
    prefix = unique_prefix(bad.task_id, ids)

    out = c.ptask("show", prefix)
    assert out.returncode == 0, out.stderr
    shown = json.loads(c.ptask("show", prefix, "--json").stdout)
    lines = out.stdout.splitlines()
    tb_at = lines.index("traceback:")
    assert lines[:tb_at] == [
        f"id:        {bad.task_id}",
        f"name:      {T}:boom",
        "queue:     default",
        "kind:      cpu",
        "options:   timeout_s=7.5",
        "state:     FAILED",
        "attempt:   1",
        "worker:    wa",
        f"created:   {when(shown['created_at'])} UTC",
        f"finished:  {when(shown['finished_at'])} UTC",
        f"duration:  {shown['duration_ms']:.1f} ms",
        f"args:      {json.dumps(['x' * 300])[:200]}... ({len(json.dumps(['x' * 300]))} characters; --full shows all)",
        f"error:     ValueError: {'x' * 300}",
    ]
    assert lines[tb_at + 1].startswith("  Traceback (most recent call last):")
    assert f"  ValueError: {'x' * 300}" in lines
    at = lines.index("attempts:")
    started = when(shown["attempts"][0]["started_at"])
    assert lines[at + 1 :] == [
        "  #  worker  started              ended                outcome",
        f"  1  wa      {started}  {when(shown['finished_at'])}  FAILED",
    ]
    full = c.ptask("show", prefix, "--full").stdout.splitlines()
    assert f"args:      {json.dumps(['x' * 300])}" in full

    out = c.ptask("show", unique_prefix(good.task_id, ids))
    assert "result:    5" in out.stdout.splitlines()
    assert "args:      (not kept once a task has succeeded)" in out.stdout.splitlines()

    # result and cancel take what submit printed, or a unique prefix
    out = c.ptask("result", unique_prefix(good.task_id, ids))
    assert (out.returncode, out.stdout) == (0, "5\n")
    out = c.ptask("cancel", unique_prefix(parked.task_id, ids))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split() == [parked.task_id, "cancelled", "CANCELLED"]

    # an ambiguous prefix, one no task has, and one that is no id at all
    common = good.task_id[:4]  # ids of one minute share their first digits
    out = c.ptask("show", common)
    assert out.returncode == 2
    assert out.stderr == f"ptask: error: id prefix '{common}' matches more than one task; give more digits\n"
    out = c.ptask("show", "ffff")
    assert out.returncode == 4
    assert "no task id starts with 'ffff'" in out.stderr
    out = c.ptask("result", "not-an-id")
    assert out.returncode == 2 and "not a task id or id prefix: 'not-an-id'" in out.stderr


def test_retry_runs_a_failed_task_again_as_a_new_task_and_show_lists_every_attempt(
    make_cluster: type[Cluster], tmp_path: Path, journal: Journal
) -> None:
    c = make_cluster()
    c.start_master(*journal[0], env=journal[1])
    c.start_worker(name="wa")
    cl: Client = c.client()
    marks = str(tmp_path / "marks")
    first = cl.with_options(retries=1).submit(f"{T}:flaky", marks, 2)  # attempts 1 and 2 fail
    assert wait_for(first.done, what="the flaky task to fail twice")
    shown = json.loads(c.ptask("show", first.task_id, "--json").stdout)
    assert shown["state"] == "FAILED" and shown["attempt"] == 2
    assert shown["options"] == {"retries": 1}
    assert shown["payload"] == [[marks, 2], {}]  # kept with a task that did not succeed
    assert [(a["attempt"], a["worker_id"], a["outcome"]) for a in shown["attempts"]] == [
        (1, "wa", "FAILED (retried)"),
        (2, "wa", "FAILED"),
    ]
    assert all(a["started_at"] <= a["ended_at"] for a in shown["attempts"])

    ok = cl.submit(f"{T}:add", 1, 2)
    assert ok.result(20) == 3
    out = c.ptask("retry", first.task_id)
    assert out.returncode == 0, out.stderr
    new_id = out.stdout.strip()
    assert len(new_id) == 36 and new_id != first.task_id
    again = cl.future(new_id)
    assert again.result(20) == 3  # the third run of flaky: the same arguments
    shown = json.loads(c.ptask("show", new_id, "--json").stdout)
    assert (shown["name"], shown["queue"], shown["kind"], shown["options"]) == (
        f"{T}:flaky",
        "default",
        "cpu",
        {"retries": 1},
    )

    out = c.ptask("retry", ok.task_id)
    assert out.returncode == 4
    assert out.stderr == (
        f"ptask: error: task {ok.task_id} not retried: the task succeeded; "
        "only a failed, timed out or cancelled task can be retried\n"
    )


def test_a_paused_queue_dispatches_nothing_until_resumed(
    make_cluster: type[Cluster], journal: Journal
) -> None:
    c = make_cluster()
    c.start_master(*journal[0], env=journal[1])
    c.start_worker(name="wa")
    out = c.ptask("queue", "pause", "default")
    assert (out.returncode, out.stdout) == (0, "queue default paused: 0 pending\n")
    assert c.ptask("queue", "pause", "default").stdout == "queue default paused (already): 0 pending\n"
    cl: Client = c.client()
    fut = cl.submit(f"{T}:add", 20, 22)
    assert fut.ack is not None
    fut.ack.result(10)  # acknowledged after the commit of a turn whose dispatch round ran
    st = cl.status()
    assert st["paused"] == ["default"] and st["counts"]["PENDING"] == 1
    assert "paused queues (nothing dispatched): default" in c.ptask("status").stdout.splitlines()
    assert [t["state"] for t in listing(c)["tasks"]] == ["PENDING"]

    assert c.master is not None
    c.master.signal(signal.SIGTERM)  # the pause is kept across a restart
    assert c.master.wait(20) == 0
    c.restart_master()
    wait_for(lambda: cl.status(timeout_s=2)["workers"] == 1, what="the worker to come back")
    assert cl.status()["paused"] == ["default"]
    fut2 = cl.submit(f"{T}:add", 1, 1)
    assert fut2.ack is not None
    fut2.ack.result(10)
    assert cl.status()["counts"]["PENDING"] == 2

    out = c.ptask("queue", "resume", "default")
    assert (out.returncode, out.stdout) == (0, "queue default resumed: 2 pending\n")
    assert fut.result(20) == 42 and fut2.result(20) == 2
    assert cl.status()["paused"] == []
    out = c.ptask("queue", "pause", "bad queue!")
    assert out.returncode == 2 and "bad queue name 'bad queue!'" in out.stderr
