"""Operating the fleet, part two, against real daemons: what a task writes (ptask logs, logs -f,
the future's logs()), its progress (ptask show, ptask tasks, the future's callback), purging a
queue, and draining or stopping a worker over the protocol."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pfharness import BIN, Cluster, daemon_env, wait_for

from poolfleet.client import Client

T = "pf_outtasks"


def _start(c: Cluster, *args: str, name: str = "wo") -> None:
    c.start_master()
    c.start_worker(*args, tasks=("pf_outtasks", "pf_testtasks"), name=name, cpu=1, io=2)


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_output_of_stdout_stderr_and_logging_is_kept_with_the_result(
    make_cluster: type[Cluster], kind: str
) -> None:
    c = make_cluster()
    _start(c)
    cl: Client = c.client()
    fut = cl.with_options(kind=kind).submit(f"{T}:chatty", 2)
    assert fut.result(30) == 2
    want = "".join(f"out {i}\nerr {i}\nINFO pf_outtasks: log {i}\n" for i in range(2))
    assert fut.logs() == want
    out = c.ptask("logs", fut.task_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want
    doc = json.loads(c.ptask("logs", fut.task_id, "--json").stdout)
    assert (doc["state"], doc["start"], doc["end"], doc["final"]) == ("SUCCEEDED", 0, len(want), True)
    shown = c.ptask("show", fut.task_id).stdout
    assert f"output:    {len(want)} characters" in shown
    # a task that wrote nothing has no output; an unknown id is refused clearly
    quiet = cl.with_options(kind=kind).submit("pf_testtasks:add", 1, 2)
    assert quiet.result(30) == 3
    assert c.ptask("logs", quiet.task_id).stdout == ""
    bad = c.ptask("logs", "ffffffff")
    assert bad.returncode != 0 and "ffffffff" in bad.stderr


def test_output_is_bounded_by_the_worker_option(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    _start(c, "--max-task-output", "1000")
    cl: Client = c.client()
    fut = cl.with_options(kind="cpu").submit(f"{T}:big_output", 5000)
    assert fut.result(30) == 5000
    text = "".join(str(i % 10) for i in range(4999)) + "\n"
    doc = json.loads(c.ptask("logs", fut.task_id, "--json").stdout)
    assert (doc["output"], doc["start"], doc["end"]) == (text[-1000:], 4000, 5000)
    out = c.ptask("logs", fut.task_id)
    assert out.stdout == text[-1000:] and "first 4000 characters were not kept" in out.stderr


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_running_output_and_progress_are_seen_live_and_followed(
    make_cluster: type[Cluster], tmp_path: Path, kind: str
) -> None:
    c = make_cluster()
    _start(c)
    cl: Client = c.client()
    gate = tmp_path / f"gate-{kind}"
    seen: list[dict[str, Any]] = []
    fut = cl.with_options(kind=kind).submit(f"{T}:gated", str(gate))
    fut.add_progress_callback(lambda f: seen.append(dict(f.progress or {})))
    # while it waits at the gate: its output, and its last report, are at the master
    assert wait_for(lambda: cl.logs(fut.task_id)["output"] == "before the gate\n", what="live output")
    assert wait_for(lambda: any(p.get("message") == "waiting at the gate" for p in seen), what="a push")
    assert all(0.0 <= p["fraction"] <= 1.0 for p in seen)
    assert len(seen) < 100  # throttled: not one push per report
    shown = json.loads(c.ptask("show", fut.task_id, "--json").stdout)
    assert shown["state"] == "RUNNING"
    assert (shown["progress"]["fraction"], shown["progress"]["message"]) == (0.5, "waiting at the gate")
    listed = json.loads(c.ptask("tasks", "--json", "--state", "RUNNING").stdout)["tasks"]
    assert [t["progress"]["message"] for t in listed] == ["waiting at the gate"]
    table = c.ptask("tasks", "--state", "RUNNING").stdout
    assert "50% waiting at the gate" in table
    # ptask logs -f prints what is there, keeps following, and ends with the task
    env = daemon_env({"POOLFLEET_MASTER": c.client_endpoint})
    follower = subprocess.Popen(
        [str(BIN / "ptask"), "logs", "-f", fut.task_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "before the gate\n"
        gate.touch()
        assert fut.result(30) == "done"
        rest, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert rest == "after the gate\n", err
    assert follower.returncode == 0
    assert wait_for(lambda: any(p.get("message") == "through" for p in seen) or fut.done(), what="end")
    final = json.loads(c.ptask("show", fut.task_id, "--json").stdout)
    assert (final["progress"]["fraction"], final["progress"]["message"]) == (1.0, "through")
    done = json.loads(c.ptask("tasks", "--json", "--state", "SUCCEEDED").stdout)["tasks"]
    assert done[0]["progress"]["message"] == "through"
    assert fut.logs() == "before the gate\nafter the gate\n"
