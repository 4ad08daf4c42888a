"""Pure logic of the performance work: adaptive prefetch, bounded dispatch rounds,
chunk decisions, the folded journal start, and the checks' fast path."""

from __future__ import annotations

import math
import sqlite3
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

from poolfleet.common import messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id, new_task_id
from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master import registry as reg
from poolfleet.master import scheduler as sched
from poolfleet.master.journal import Journal
from poolfleet.master.state import TaskRecord
from poolfleet.worker import pacing


def worker(cpu: int = 2, io: int = 0) -> reg.WorkerInfo:
    slots = {k: n for k, n in ((Kind.CPU, cpu), (Kind.IO, io)) if n}
    return reg.WorkerInfo(b"w", "w", "h", 1, ("default",), slots, 0.0, 0.0)


def record(n: int) -> TaskRecord:
    return TaskRecord(n.to_bytes(16, "big"), "m:f", "default", Kind.CPU, b"", None, 0, 0.0)


# -- adaptive prefetch ---------------------------------------------------------
def test_no_prefetch_until_run_times_are_known() -> None:
    # a first batch of tasks of unknown length may be tasks of seconds: a worker that joins a
    # moment later must still find them pending, not queued behind another worker's slots
    w = worker(cpu=2)
    assert w.prefetch(Kind.CPU, 4) == 0
    assert w.free(Kind.CPU, 4) == 2


def test_short_tasks_get_more_credit_up_to_the_cap() -> None:
    w = worker(cpu=2, io=50)
    for i in range(5):
        w.add(bytes([i]), Kind.CPU)
        w.remove(bytes([i]), 0.001)  # counted as MIN_TASK_MS
    assert w.prefetch(Kind.CPU, 4) == reg.PREFETCH_MAX
    w.add(b"io", Kind.IO)
    w.remove(b"io", 50.0)
    assert w.prefetch(Kind.IO, 4) == math.floor(50 * reg.PREFETCH_WINDOW_MS / 50.0)


def test_tasks_of_seconds_get_no_prefetch_and_zero_turns_prefetch_off() -> None:
    w = worker(cpu=2)
    w.add(b"a", Kind.CPU)
    w.remove(b"a", 10_000.0)
    assert w.prefetch(Kind.CPU, 4) == 0
    assert w.free(Kind.CPU, 4) == 2  # only its slots: the rest stays pending for idle workers
    w.add(b"b", Kind.CPU)
    w.remove(b"b", 0.01)
    assert w.prefetch(Kind.CPU, 0) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, None])
def test_nonsense_run_times_are_ignored(bad: float | None) -> None:
    w = worker(cpu=2)
    w.add(b"a", Kind.CPU)
    w.remove(b"a", bad)
    assert Kind.CPU not in w.mean_ms
    assert w.busy[Kind.CPU] == 0


# -- bounded dispatch rounds -----------------------------------------------------
def test_a_round_stops_at_max_per_round_and_says_so() -> None:
    s = sched.Scheduler(prefetch=10_000)
    for n in range(sched.MAX_PER_ROUND + 10):
        s.push(record(n), 0.0)
    w = worker(cpu=2)
    w.mean_ms[Kind.CPU] = 0.01  # tiny tasks: the prefetch applies
    plan = s.assign([w], 0.0)
    assert len(plan[b"w"]) == sched.MAX_PER_ROUND
    assert s.more and s.next_due_s(0.0) == 0.0
    for rec in plan[b"w"]:  # the master starts what it dispatched
        rec.state, rec.worker = TaskState.DISPATCHED, b"w"
        w.add(rec.id, Kind.CPU)
    plan = s.assign([w], 0.0)
    assert len(plan[b"w"]) == 10
    assert not s.more and s.next_due_s(0.0) is None


# -- chunks ---------------------------------------------------------------------
@dataclass
class FakeJob:
    name: str
    timeout_s: float | None = None
    done: bool = False
    solo: bool = False


def test_only_measured_tiny_tasks_without_timeout_share_a_call() -> None:
    p = pacing.Pacer(enabled=True, slots=2)
    p.observe("m:tiny", 0.01)
    p.observe("m:slow", 50.0)
    first = FakeJob("m:tiny")
    waiting = deque([FakeJob("m:tiny"), FakeJob("m:tiny", timeout_s=5), FakeJob("m:tiny")])
    assert p.take(first, waiting) == [first, FakeJob("m:tiny")]  # stops at the one with a timeout
    assert len(waiting) == 2
    assert p.take(FakeJob("m:slow"), deque([FakeJob("m:slow")])) == [FakeJob("m:slow")]
    assert p.take(FakeJob("m:unknown"), deque([FakeJob("m:unknown")])) == [FakeJob("m:unknown")]
    assert p.take(FakeJob("m:tiny", solo=True), deque([FakeJob("m:tiny")])) == [FakeJob("m:tiny", solo=True)]


def test_chunks_leave_work_for_every_child_and_skip_done_jobs() -> None:
    p = pacing.Pacer(enabled=True, slots=2)
    p.observe("m:tiny", 0.01)
    waiting = deque(FakeJob("m:tiny") for _ in range(99))
    waiting[0].done = True
    chunk = p.take(FakeJob("m:tiny"), waiting)
    assert len(chunk) == 50  # half of the 100 jobs
    assert not any(j.done for j in chunk)
    assert len(waiting) == 49  # 99 - the done one - 49 taken
    off = pacing.Pacer(enabled=False, slots=2)
    off.observe("m:tiny", 0.01)
    assert len(off.take(FakeJob("m:tiny"), deque([FakeJob("m:tiny")]))) == 1


def test_a_chunk_frees_its_call_when_its_last_job_leaves() -> None:
    c = pacing.Chunk(3)
    assert [c.release(), c.release(), c.release()] == [False, False, True]


# -- journal: a start folded into the insert ------------------------------------------
def test_start_in_the_same_commit_is_folded_and_a_later_one_updates(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    try:
        a, b = new_task_id(), new_task_id()
        for tid in (a, b):
            j.stage_insert(tid, "m:f", "default", "cpu", b"p", None, 0, 1.0)
        j.stage_start(a, 1)
        assert j.staged == 2  # no UPDATE staged for a
        j.commit()
        j.stage_start(b, 1)
        assert j.staged == 1
        j.commit()
    finally:
        j.close()
    db = sqlite3.connect(str(tmp_path / "j.sqlite3"))
    rows = dict((r[0], (r[1], r[2])) for r in db.execute("SELECT id, state, attempt FROM tasks"))
    db.close()
    assert rows == {a: ("DISPATCHED", 1), b: ("DISPATCHED", 1)}


# -- checks and ids -------------------------------------------------------------
def test_fast_check_refuses_what_the_slow_one_refuses() -> None:
    good = {"id": b"x" * 16, "attempt": 1, "state": "SUCCEEDED", "duration_ms": 0.5}
    assert messages.check("r", good, messages.TASK_RESULT) is good
    for bad in ({**good, "attempt": True}, {**good, "duration_ms": False}, {"attempt": 1, "state": "x"}):
        with pytest.raises(ProtocolError):
            messages.check("r", bad, messages.TASK_RESULT)
    with pytest.raises(ProtocolError) as info:
        messages.check_entries(
            "TASK_RESULTS.results", [good, good, {**good, "attempt": "1"}], messages.TASK_RESULT
        )
    assert "TASK_RESULTS.results[2]" in info.value.message


def test_format_id_is_the_uuid_text() -> None:
    for _ in range(100):
        tid = new_task_id()
        assert format_id(tid) == str(uuid.UUID(bytes=tid))
    with pytest.raises(ValueError):
        format_id(b"short")
