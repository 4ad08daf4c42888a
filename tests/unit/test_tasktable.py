"""The task table: cold tasks (packed, sharing a batch) become records on any look-up by id,
and the scheduler dispatches them in their place in the lane."""

from __future__ import annotations

import itertools

from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master.registry import WorkerInfo
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.state import TaskRecord
from poolfleet.master.tasktable import COLD_PAYLOAD_MAX, ColdBatch, TaskTable

_ids = itertools.count(1)


def tid() -> bytes:
    return next(_ids).to_bytes(16, "big")


def batch(table: TaskTable, name: str = "m:f", seq: int = 7, priority: int = 0) -> ColdBatch:
    return table.batch(name, "default", Kind.CPU, name, priority, 2.5, 3, 1234.5, seq)


def worker(name: str, cpu: int) -> WorkerInfo:
    return WorkerInfo(
        identity=name.encode(), worker_id=name, host="h", pid=1, queues=("default",), slots={Kind.CPU: cpu},
        connected_at=0.0, last_seen=0.0, busy={}, held={}, mean_ms={},
    )  # fmt: skip


def test_a_cold_task_is_seen_by_every_lookup_and_thawed_once() -> None:
    table = TaskTable()
    b = batch(table)
    a, c = tid(), tid()
    table.put_cold(a, b"payload-a", b)
    table.put_cold(c, b"payload-c", b)
    assert len(table) == 2 and a in table and c in table and tid() not in table
    assert dict.__len__(table) == 0  # nothing thawed by len or in
    assert set(table) == {a, c}
    rec = table.get(a)
    assert rec is not None
    assert (rec.id, rec.name, rec.queue, rec.kind, rec.payload) == (
        a,
        "m:f",
        "default",
        Kind.CPU,
        b"payload-a",
    )
    assert (rec.timeout_s, rec.retries, rec.created_at, rec.seq, rec.state) == (
        2.5,
        3,
        1234.5,
        7,
        TaskState.PENDING,
    )
    assert table.get(a) is rec and table[a] is rec  # the same record from now on
    assert a not in table.cold and len(table) == 2
    assert table[c].payload == b"payload-c"  # [] thaws too
    assert not table.cold  # and nothing refers to the batch any more


def test_a_cold_task_is_found_in_its_batch_in_any_order_and_not_across_two_ids() -> None:
    table = TaskTable()
    b = batch(table)
    # the second half of one id followed by the first half of the next spell a third id:
    # the look-up must not take that match for it
    x, y = bytes(range(16)), bytes(range(16, 32))
    z = x[8:] + y[:8]
    for t, p in ((x, b"px"), (y, b""), (z, b"pz-longer")):
        table.put_cold(t, p, b)
    assert [table[t].payload for t in (z, x, y)] == [b"pz-longer", b"px", b""]


def test_a_big_payload_or_an_odd_id_makes_a_record_at_once() -> None:
    table = TaskTable()
    b = batch(table)
    big, odd, small = tid(), b"short-id", tid()
    table.put_cold(big, b"x" * (COLD_PAYLOAD_MAX + 1), b)
    table.put_cold(odd, b"y", b)
    table.put_cold(small, b"z", b)
    assert set(table.cold) == {small}
    assert dict.__contains__(table, big) and dict.__contains__(table, odd)
    assert table.resolve(big) is dict.get(table, big) and table.resolve(odd) is not None
    assert table[big].payload == b"x" * (COLD_PAYLOAD_MAX + 1) and table[odd].seq == 7


def test_pop_of_a_cold_task_removes_it_and_returns_its_record() -> None:
    table = TaskTable()
    b = batch(table)
    a = tid()
    table.put_cold(a, b"x", b)
    rec = table.pop(a)
    assert rec is not None and rec.id == a and rec.payload == b"x"
    assert a not in table and len(table) == 0 and table.pop(a) is None


def test_snapshot_and_peek_read_cold_tasks_without_thawing() -> None:
    table = TaskTable()
    b = batch(table, name="m:g")
    ids = [tid() for _ in range(3)]
    for i, t in enumerate(ids):
        table.put_cold(t, bytes([i]), b)
    hot = TaskRecord(
        id=tid(),
        name="m:h",
        queue="q",
        kind=Kind.IO,
        payload=b"",
        timeout_s=None,
        retries=None,
        created_at=0.0,
    )
    table[hot.id] = hot
    seen = {r.id: r for r in table.snapshot()}
    assert set(seen) == {*ids, hot.id} and seen[hot.id] is hot
    assert [seen[t].payload for t in ids] == [b"\x00", b"\x01", b"\x02"]
    assert len(table.cold) == 3  # still cold
    peeked = table.peek(ids[1])
    assert peeked is not None and peeked.queue == "default" and peeked.name == "m:g"
    assert table.peek(hot.id) is hot and table.peek(tid()) is None
    assert len(table.cold) == 3
    assert {r.id for r in table.values()} == {*ids, hot.id}  # values() thaws every one
    assert not table.cold


def test_the_scheduler_dispatches_cold_tasks_in_lane_order_and_skips_those_that_left() -> None:
    table = TaskTable()
    s = Scheduler(prefetch=0, table=table)
    b1 = batch(table, seq=s.new_seq())
    first = [tid() for _ in range(4)]
    for t in first:
        table.put_cold(t, b"", b1)
        s.push_cold(t, b1)
    rec = TaskRecord(
        id=tid(), name="m:f", queue="default", kind=Kind.CPU, payload=b"", timeout_s=None, retries=None,
        created_at=0.0,
    )  # fmt: skip
    table[rec.id] = rec
    s.push(rec, 0.0)
    assert s.pending_count() == 5
    # one cold task is looked at (thawed) before its turn, one is cancelled while cold
    looked = table.get(first[1])
    assert looked is not None
    gone = table.pop(first[2])
    assert gone is not None
    gone.state = TaskState.CANCELLED
    s.discard(gone)
    assert s.pending_count() == 4
    w = worker("w", cpu=10)
    plan = s.assign([w], 0.0)
    got = [r.id for r in plan[b"w"]]
    assert got == [first[0], first[1], first[3], rec.id]
    assert plan[b"w"][1] is looked  # the record the look-up made, not a second one
    assert all(table.get(t) is r for t, r in zip(got, plan[b"w"], strict=True))
    assert s.pending_count() == 0 and not table.cold


def test_cold_batches_keep_fifo_order_across_names_by_their_number() -> None:
    table = TaskTable()
    s = Scheduler(prefetch=0, table=table)
    order = []
    for name in ("m:a", "m:b", "m:a"):
        b = table.batch(name, "default", Kind.CPU, name, 0, None, None, 0.0, s.new_seq())
        for _ in range(2):
            t = tid()
            table.put_cold(t, b"", b)
            s.push_cold(t, b)
            order.append(t)
    w = worker("w", cpu=6)
    plan = s.assign([w], 0.0)
    assert [r.id for r in plan[b"w"]] == [order[0], order[1], order[2], order[3], order[4], order[5]]
