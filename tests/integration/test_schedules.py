"""Schedules kept by the master, against real daemons: ticks fire once each across a master
kill, a missed tick runs once (or is skipped), cron expressions, pause/resume/remove."""

from __future__ import annotations

import itertools
import json
import math
import signal
import sqlite3
import time
from pathlib import Path

from pfharness import Cluster, wait_for

from poolfleet.client import Client
from poolfleet.master.schedule import tick_of

T = "pf_workflowtasks"


def runs(path: Path) -> list[tuple[bytes, float]]:
    """(task id, wall time of the run) per line the task wrote."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        tid, t = line.split()
        out.append((bytes.fromhex(tid), float(t)))
    return out


def ticks(path: Path) -> list[float]:
    """The tick of each run, from its task id (a schedule's run id carries its tick)."""
    return sorted(tick_of(tid) for tid, _ in runs(path))


def gaps(ts: list[float]) -> list[tuple[float, float]]:
    """Consecutive ticks more than one second apart."""
    return [(a, b) for a, b in itertools.pairwise(ts) if b - a > 1.0 + 1e-6]


def test_a_schedule_every_second_fires_once_per_tick_across_a_master_kill(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(tasks=(T,), cpu=2)
    once, skip = tmp_path / "once.txt", tmp_path / "skip.txt"
    cl: Client = c.client()
    doc = cl.schedule_add("beat", f"{T}:stamp", [str(once)], every_s=1.0)
    assert doc["next_tick"] == math.floor(doc["created_at"]) + 1
    cl.schedule_add("quiet", f"{T}:stamp", [str(skip)], every_s=1.0, catchup="skip")
    wait_for(lambda: len(runs(once)) >= 3 and len(runs(skip)) >= 3, 30, what="three runs of each")
    assert c.master is not None
    c.master.signal(signal.SIGKILL)
    c.master.wait(10)
    db = sqlite3.connect(str(c.data_dir / "journal.sqlite3"))
    try:  # the last tick each recorded (some may not have run yet)
        (seen,) = db.execute("SELECT max(last_tick) FROM schedules").fetchone()
    finally:
        db.close()
    assert seen >= max(ticks(once) + ticks(skip))
    # the master is down for at least two more ticks
    wait_for(lambda: time.time() > seen + 3.5, 10, what="ticks to pass while the master is down")
    m2 = c.restart_master()
    recovered = m2.wait_event("schedules_recovered")["wall"]
    wait_for(
        lambda: (
            len([t for t in ticks(once) if t > recovered]) >= 2
            and len([t for t in ticks(skip) if t > recovered]) >= 2
        ),
        30,
        what="runs after the restart",
    )
    for path in (once, skip):
        ids = [tid for tid, _ in runs(path)]
        assert len(ids) == len(set(ids)), f"a tick ran twice: {path.read_text()}"
        ts = ticks(path)
        assert len(ts) == len(set(ts))
        (gap,) = gaps(ts)  # consecutive seconds, but for the one gap of the restart
        assert gap[1] - gap[0] >= 2.0
        if path is once:  # the latest tick missed runs once, at the start
            assert gap[1] == math.floor(recovered)
        else:  # the missed ticks are skipped: the next run is the first tick after the start
            assert gap[1] == math.floor(recovered) + 1
    listed = {d["name"]: d for d in cl.schedules()}
    assert listed["beat"]["last_tick"] >= ticks(once)[-1] - 1
    assert listed["beat"]["last_state"] in ("PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED")


def test_cron_schedules_from_ptask_and_pause_resume_remove(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(tasks=(T,), cpu=2)
    out = c.ptask(
        "schedule", "add", "five", f"{T}:stamp", "x", "--cron", "*/5 * * * *", "--timezone", "Europe/Berlin"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("schedule five: cron */5 * * * * (Europe/Berlin); next run ")
    bad = c.ptask("schedule", "add", "bad", f"{T}:stamp", "--cron", "*/5 * * *")
    assert bad.returncode == 2 and "bad cron expression" in bad.stderr, bad.stderr
    bad = c.ptask("schedule", "add", "bad", f"{T}:stamp", "--cron", "* * * * *", "--timezone", "Mars/Base")
    assert bad.returncode == 2 and "unknown time zone 'Mars/Base'" in bad.stderr
    bad = c.ptask("schedule", "add", "bad", f"{T}:nosuch", "--every", "1s")
    assert bad.returncode == 4 and "unknown task" in bad.stderr
    bad = c.ptask("schedule", "add", "bad", f"{T}:stamp", "--every", "often")
    assert bad.returncode == 2 and "--every takes a duration" in bad.stderr
    assert c.ptask("schedule", "pause", "nosuch").returncode == 4

    # a six-field expression has seconds first: every second second
    path = tmp_path / "cron.txt"
    out = c.ptask("schedule", "add", "even", f"{T}:stamp", str(path), "--cron", "*/2 * * * * *")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(runs(path)) >= 2, 30, what="two runs of the cron schedule")
    assert all(t % 2 == 0 for t in ticks(path))

    doc = json.loads(c.ptask("schedule", "list", "--json").stdout)
    five = next(d for d in doc if d["name"] == "five")
    assert five["next_tick"] % 300 == 0 and five["args"] == ["x"] and five["timezone"] == "Europe/Berlin"
    assert c.ptask("schedule", "pause", "even").stdout == "schedule even paused\n"
    assert c.ptask("schedule", "pause", "even").stdout == "schedule even paused (already)\n"
    (row,) = [line for line in c.ptask("schedule", "list").stdout.splitlines() if line.startswith("even ")]
    assert " paused " in row and "cron */2 * * * * * (UTC)" in row
    n, paused_at = len(runs(path)), time.time()
    wait_for(lambda: time.time() > paused_at + 4.5, 10, what="two ticks to pass while it is paused")
    assert len(runs(path)) <= n + 1  # at most one run that was on its way when it was paused
    n = len(runs(path))
    assert c.ptask("schedule", "resume", "even").returncode == 0
    wait_for(lambda: len(runs(path)) >= n + 1, 30, what="a run after the resume")
    assert c.ptask("schedule", "remove", "even").stdout == "schedule even removed\n"
    assert [d["name"] for d in json.loads(c.ptask("schedule", "list", "--json").stdout)] == ["five"]
