"""Priorities and fleet-wide rate limits against real daemons: a priority 10 task submitted
last starts before a backlog on one busy slot; 5/s holds across two workers."""

from __future__ import annotations

import json
from pathlib import Path

from pfharness import Cluster, wait_for

from poolfleet.client import Client

T = "pf_workflowtasks"


def starts(path: Path) -> list[tuple[int, float]]:
    """(tag, wall time) of each start the task recorded, in file order."""
    if not path.exists():
        return []
    return [(int(a), float(b)) for a, b, *_ in (line.split() for line in path.read_text().splitlines())]


def test_a_higher_priority_submitted_last_starts_before_the_backlog_on_one_slot(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(tasks=(T,), cpu=1, io=0)
    path, gate = tmp_path / "starts.txt", tmp_path / "gate"
    cl: Client = c.client()
    blocker = cl.submit(f"{T}:hold", str(path), 0, str(gate))  # keeps the one slot busy
    wait_for(lambda: starts(path), 30, what="the blocker to start")
    backlog = [cl.submit(f"{T}:started", str(path), i) for i in range(1, 6)]
    urgent = cl.with_options(priority=10).submit(f"{T}:started", str(path), 99)
    out = c.ptask("submit", f"{T}:started", str(path), "50", "--priority", "5")
    assert out.returncode == 0, out.stderr
    for f in [*backlog, urgent]:
        assert f.ack is not None
        f.ack.result(10)  # all pending on the master before the slot frees
    gate.touch()
    assert [f.result(30) for f in [blocker, urgent, *backlog]] == [0, 99, 1, 2, 3, 4, 5]
    wait_for(lambda: len(starts(path)) == 8, 30, what="every start")
    assert [tag for tag, _ in starts(path)] == [0, 99, 50, 1, 2, 3, 4, 5]
    shown = c.ptask("show", urgent.task_id, "--json")
    assert json.loads(shown.stdout)["options"] == {"priority": 10}


def test_a_rate_limit_of_5_per_second_holds_across_two_workers(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(tasks=(T,), cpu=0, io=8, name="wa")
    c.start_worker(tasks=(T,), cpu=0, io=8, name="wb")
    out = c.ptask("limit", "set", f"{T}:started", "5/s")
    assert (out.returncode, out.stdout) == (0, f"limit {T}:started 5/s\n"), out.stderr
    assert c.ptask("limit", "set", f"{T}:started", "5/s").stdout == f"limit {T}:started 5/s (already)\n"
    bad = c.ptask("limit", "set", f"{T}:started", "5/d")
    assert bad.returncode == 2 and "10/s, 100/m or 1000/h" in bad.stderr
    path = tmp_path / "starts.txt"
    cl: Client = c.client().with_options(kind="io")
    futures = [cl.submit(f"{T}:started", str(path), i) for i in range(16)]
    assert sorted(f.result(60) for f in futures) == list(range(16))
    times = sorted(t for _, t in starts(path))
    assert len(times) == 16
    for i, t in enumerate(times):  # no window of one second holds more than five starts
        assert sum(1 for u in times[i:] if u < t + 1.0) <= 5, times
    assert times[-1] - times[0] >= 3.0  # 16 starts at 5/s: four windows
    assert {f.info.get("worker_id") for f in futures} == {"wa", "wb"}  # across both workers
    listed = json.loads(c.ptask("limit", "list", "--json").stdout)
    assert [(d["name"], d["rate"]) for d in listed] == [(f"{T}:started", "5/s")]
    assert c.ptask("limit", "remove", f"{T}:started").stdout == f"limit {T}:started removed\n"
    assert c.ptask("limit", "list").stdout == "no rate limits\n"
