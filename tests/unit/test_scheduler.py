"""The scheduler: FIFO per (queue, kind), credit-based dispatch, delayed retries, depth accounting."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master.registry import FleetCounts, WorkerInfo, WorkerRegistry
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.state import TaskRecord

_ids = itertools.count()


def task(queue: str = "default", kind: Kind = Kind.CPU, not_before: float = 0.0) -> TaskRecord:
    n = next(_ids)
    return TaskRecord(
        id=n.to_bytes(16, "big"), name=f"m:f{n}", queue=queue, kind=kind, payload=b"", timeout_s=None,
        retries=0, created_at=0.0, not_before=not_before,
    )  # fmt: skip


def worker(
    name: str,
    cpu: int = 0,
    io: int = 0,
    queues: tuple[str, ...] = ("default",),
    busy: dict[Kind, int] | None = None,
    held: dict[Kind, int] | None = None,
    mean_ms: float | None = None,
) -> WorkerInfo:
    slots = {k: n for k, n in ((Kind.CPU, cpu), (Kind.IO, io)) if n}
    return WorkerInfo(
        identity=name.encode(), worker_id=name, host="h", pid=1, queues=queues, slots=slots,
        connected_at=0.0, last_seen=0.0, busy=dict(busy or {}), held=dict(held or {}),
        mean_ms={} if mean_ms is None else {Kind.CPU: mean_ms, Kind.IO: mean_ms},
    )  # fmt: skip


def registered(ws: list[WorkerInfo]) -> FleetCounts:
    """Register ``ws`` as the core does: the registry's counts follow their tasks."""
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    for w in ws:
        reg.add(w)
    return reg.counts


def planned(plan: dict[bytes, list[TaskRecord]]) -> dict[str, list[str]]:
    return {ident.decode(): [r.name for r in recs] for ident, recs in plan.items()}


def test_fifo_within_a_queue_and_kind() -> None:
    s = Scheduler(prefetch=0)
    tasks = [task() for _ in range(5)]
    for t in tasks:
        s.push(t, 0.0)
    plan = s.assign([worker("a", cpu=3)], 0.0)
    assert plan[b"a"] == tasks[:3]
    plan = s.assign([worker("a", cpu=3)], 0.0)
    assert plan[b"a"] == tasks[3:]


def test_assign_does_not_mutate_records() -> None:
    s = Scheduler(prefetch=0)
    t = task()
    s.push(t, 0.0)
    s.assign([worker("a", cpu=1)], 0.0)
    assert (t.state, t.worker, t.attempt) == (TaskState.PENDING, None, 0)


def test_credits_are_slots_plus_prefetch_minus_busy_minus_held() -> None:
    # 60 ms tasks on 4 slots: the 50 ms window gives 3 tasks of prefetch
    w = worker("a", cpu=4, busy={Kind.CPU: 1}, held={Kind.CPU: 2}, mean_ms=60.0)
    assert w.free(Kind.CPU, 3) == 4 + 3 - 1 - 2
    assert w.free(Kind.IO, 3) == 0  # no io slots: no io credit, prefetch or not
    s = Scheduler(prefetch=3)
    for _ in range(10):
        s.push(task(), 0.0)
    assert len(s.assign([w], 0.0)[b"a"]) == 4


def test_no_credit_no_task() -> None:
    s = Scheduler(prefetch=1)
    s.push(task(), 0.0)
    full = worker("a", cpu=2, busy={Kind.CPU: 3})
    assert s.assign([full], 0.0) == {}
    assert s.pending_count() == 1


def test_draining_workers_get_nothing() -> None:
    s = Scheduler(prefetch=2)
    s.push(task(), 0.0)
    w = worker("a", cpu=2)
    w.draining = True
    assert w.free(Kind.CPU, 2) == 0
    assert s.assign([w], 0.0) == {}


def test_kinds_go_only_to_workers_with_slots_of_that_kind() -> None:
    s = Scheduler(prefetch=0)
    cpu_t, io_t = task(kind=Kind.CPU), task(kind=Kind.IO)
    s.push(cpu_t, 0.0)
    s.push(io_t, 0.0)
    plan = s.assign([worker("c", cpu=1), worker("i", io=1)], 0.0)
    assert plan == {b"c": [cpu_t], b"i": [io_t]}


def test_tasks_spread_across_workers() -> None:
    s = Scheduler(prefetch=0)
    for _ in range(4):
        s.push(task(), 0.0)
    plan = s.assign([worker("a", cpu=4), worker("b", cpu=4)], 0.0)
    assert {k: len(v) for k, v in plan.items()} == {b"a": 2, b"b": 2}


def test_worker_with_most_credit_goes_first() -> None:
    s = Scheduler(prefetch=0)
    first, second, third = task(), task(), task()
    for t in (first, second, third):
        s.push(t, 0.0)
    plan = s.assign([worker("small", cpu=1), worker("big", cpu=5)], 0.0)
    assert plan[b"big"] == [first, third]
    assert plan[b"small"] == [second]


def test_queues_route_to_subscribed_workers_only() -> None:
    s = Scheduler(prefetch=0)
    gpu, default = task(queue="gpu"), task()
    s.push(gpu, 0.0)
    s.push(default, 0.0)
    plan = s.assign([worker("d", cpu=4), worker("g", cpu=4, queues=("gpu",))], 0.0)
    assert plan == {b"d": [default], b"g": [gpu]}
    s.push(task(queue="nobody"), 0.0)
    assert s.assign([worker("d", cpu=4)], 0.0) == {}
    assert s.depths() == {("nobody", Kind.CPU): 1}


def test_credits_are_shared_by_all_queues_of_a_worker() -> None:
    # A worker serving two queues has one set of slots: one round must not give it
    # a full set of credits per queue.
    s = Scheduler(prefetch=1)
    for q in ("a", "b"):
        for _ in range(5):
            s.push(task(queue=q), 0.0)
    plan = s.assign([worker("w", cpu=2, queues=("a", "b"), mean_ms=60.0)], 0.0)
    assert len(plan[b"w"]) == 3  # 2 slots + 1 prefetch
    assert s.pending_count() == 10 - 3


def test_delayed_retry_is_promoted_only_when_due() -> None:
    s = Scheduler(prefetch=0)
    later = task(not_before=100.0)
    s.push(later, now=50.0)
    w = worker("a", cpu=1)
    assert s.pending_count() == 1
    assert s.next_due_s(50.0) == 50.0
    assert s.assign([w], 99.9) == {}
    assert s.next_due_s(99.9) is not None and abs(s.next_due_s(99.9) - 0.1) < 1e-9  # type: ignore[operator]
    assert s.assign([w], 100.0) == {b"a": [later]}
    assert s.next_due_s(100.0) is None
    assert s.pending_count() == 0


def test_delayed_tasks_come_out_in_due_order() -> None:
    s = Scheduler(prefetch=0)
    t3, t1, t2 = task(not_before=30.0), task(not_before=10.0), task(not_before=20.0)
    for t in (t3, t1, t2):
        s.push(t, 0.0)
    s.promote(25.0)
    plan = s.assign([worker("a", cpu=5)], 25.0)
    assert plan[b"a"] == [t1, t2]
    assert s.assign([worker("a", cpu=5)], 30.0)[b"a"] == [t3]


def test_task_due_now_is_ready_at_once() -> None:
    s = Scheduler(prefetch=0)
    s.push(task(not_before=5.0), now=5.0)
    assert s.next_due_s(5.0) is None
    assert len(s.assign([worker("a", cpu=1)], 5.0)[b"a"]) == 1


def test_cancelled_tasks_are_skipped_lazily_and_depth_is_fixed_at_once() -> None:
    s = Scheduler(prefetch=0)
    a, b, c = task(), task(), task()
    for t in (a, b, c):
        s.push(t, 0.0)
    s.discard(a)
    a.state = TaskState.CANCELLED
    assert s.depths() == {("default", Kind.CPU): 2}
    plan = s.assign([worker("w", cpu=1)], 0.0)
    assert plan[b"w"] == [b]
    assert s.depths() == {("default", Kind.CPU): 1}
    assert s.assign([worker("w", cpu=5)], 0.0)[b"w"] == [c]
    assert s.depths() == {}
    assert s.pending_count() == 0


def test_cancelled_delayed_task_is_dropped_when_due() -> None:
    s = Scheduler(prefetch=0)
    t = task(not_before=10.0)
    s.push(t, 0.0)
    s.discard(t)
    t.state = TaskState.CANCELLED
    assert s.assign([worker("w", cpu=1)], 20.0) == {}
    assert s.pending_count() == 0
    assert s.next_due_s(20.0) is None


def test_returned_task_goes_to_the_front() -> None:
    s = Scheduler(prefetch=0)
    first, returned = task(), task()
    s.push(first, 0.0)
    s.push_front(returned)
    assert s.depths() == {("default", Kind.CPU): 2}
    assert s.assign([worker("w", cpu=1)], 0.0)[b"w"] == [returned]


def test_depth_per_queue_and_kind() -> None:
    s = Scheduler(prefetch=0)
    for q, k, n in (("default", Kind.CPU, 3), ("default", Kind.IO, 2), ("x", Kind.CPU, 1)):
        for _ in range(n):
            s.push(task(queue=q, kind=k), 0.0)
    s.push(task(not_before=9.0), 0.0)  # delayed tasks count as pending too
    assert s.depths() == {("default", Kind.CPU): 4, ("default", Kind.IO): 2, ("x", Kind.CPU): 1}
    assert s.pending_count() == 7
    s.assign([worker("w", cpu=1, io=1)], 0.0)
    assert s.depths() == {("default", Kind.CPU): 3, ("default", Kind.IO): 1, ("x", Kind.CPU): 1}


def _start(plan: dict[bytes, list[TaskRecord]], by_id: dict[bytes, WorkerInfo]) -> None:
    """Apply a plan as the core does: each task is now held by its worker."""
    for ident, recs in plan.items():
        for rec in recs:
            rec.state, rec.worker = TaskState.DISPATCHED, ident
            by_id[ident].add(rec.id, rec.kind)


@contextmanager
def counting_free() -> Iterator[list[bytes]]:
    """The identities of the workers whose credit a round counts (``WorkerInfo.free``), in order."""
    looked: list[bytes] = []
    real_free = WorkerInfo.free

    def counted(self: WorkerInfo, kind: Kind, prefetch: int) -> int:
        looked.append(self.identity)
        return real_free(self, kind, prefetch)

    WorkerInfo.free = counted  # type: ignore[method-assign]
    try:
        yield looked
    finally:
        WorkerInfo.free = real_free  # type: ignore[method-assign]


def test_a_round_looks_only_at_workers_that_may_have_credit() -> None:
    """After a round left a thousand workers without credit, the next rounds look only at
    those a task left since (WorkerInfo.wants), until new work or FULL_ROUND_S has passed."""
    from poolfleet.master.scheduler import FULL_ROUND_S

    s = Scheduler(prefetch=0)
    ws = [worker(f"w{i}", cpu=1) for i in range(1000)]
    by_id = {w.identity: w for w in ws}
    tasks = [task() for _ in range(1500)]
    for t in tasks:
        s.push(t, 0.0)
    plan = s.assign(ws, 0.0)
    assert sum(len(v) for v in plan.values()) == 1000  # MAX_PER_ROUND, one each
    _start(plan, by_id)
    assert s.assign(ws, 0.0) == {}  # no credit anywhere
    assert not any(w.wants for w in ws)
    # one task finishes on w7: only w7 is looked at, and it gets the next task
    done = plan[b"w7"][0]
    by_id[b"w7"].remove(done.id)
    with counting_free() as looked:
        plan = s.assign(ws, 0.01)
        assert planned(plan) == {"w7": [tasks[1000].name]}
        assert looked == [b"w7"]
        _start(plan, by_id)
        # new work makes the next round look at everyone, and so does the time passing
        looked.clear()
        s.push(task(), 0.02)
        s.assign(ws, 0.02)
        assert len(looked) == 1000
        looked.clear()
        s.assign(ws, 0.02 + FULL_ROUND_S)
        assert len(looked) == 1000


def test_a_worker_whose_held_slots_free_up_is_looked_at_again() -> None:
    """An io thread abandoned by a timeout holds its slot (held); the round leaves the worker
    alone; once the worker says the slot is free (the core sets ``wants`` with ``held``, see
    core_workers) it gets the task in the next round, without waiting for a full one."""
    s = Scheduler(prefetch=0)
    w = worker("a", io=1, held={Kind.IO: 1})
    t = task(kind=Kind.IO)
    s.push(t, 0.0)
    assert s.assign([w], 0.0) == {}
    assert w.wants is False
    w.held, w.wants = {}, True  # what a HEARTBEAT or TASK_RESULTS with "held" does
    assert planned(s.assign([w], 0.01)) == {"a": [t.name]}


def test_a_round_while_the_master_is_behind_sends_what_left_the_workers() -> None:
    """While results wait unread, a round sends at most as many tasks as left the workers
    since the round before (at least BEHIND_MIN_ROUND): the tasks at workers stay as many."""
    from poolfleet.master.scheduler import BEHIND_MIN_ROUND, MAX_PER_ROUND

    s = Scheduler(prefetch=1000)
    ws = [worker(f"w{i}", cpu=2, mean_ms=0.01) for i in range(10)]  # tiny tasks: credit 1002 each
    by_id = {w.identity: w for w in ws}
    for _ in range(5000):
        s.push(task(), 0.0)

    def sent(plan: dict[bytes, list[TaskRecord]]) -> int:
        _start(plan, by_id)
        return sum(len(v) for v in plan.values())

    assert sent(s.assign(ws, 0.0)) == MAX_PER_ROUND  # not behind: a whole round
    assert sent(s.assign(ws, 0.0, behind=True)) == BEHIND_MIN_ROUND  # nothing came back
    # 300 tasks come back (as the core counts them): the next round behind sends 300, and
    # the count starts afresh
    for tid in list(ws[0].inflight)[:300]:
        ws[0].remove(tid)
        s.returned += 1
    assert sent(s.assign(ws, 0.0, behind=True)) == 300
    assert sent(s.assign(ws, 0.0, behind=True)) == BEHIND_MIN_ROUND
    assert s.more  # the round stopped with credit left: the loop comes back at once
    assert sent(s.assign(ws, 0.0)) == MAX_PER_ROUND  # caught up: whole rounds again


def test_the_in_flight_budget_bounds_the_whole_fleet_not_a_share_of_each_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round's tasks go to as few workers as their credit allows (one DISPATCH each), however
    many workers there are; the tasks at all workers together stay within INFLIGHT_BUDGET, and
    a round cut by the budget does not make the loop come back at once (tasks leaving the
    workers do)."""
    from poolfleet.master import scheduler

    monkeypatch.setattr(scheduler, "INFLIGHT_BUDGET", 2500)
    ws = [worker(f"w{i}", cpu=2, mean_ms=0.01) for i in range(1000)]  # tiny tasks: credit 1002 each
    s = Scheduler(prefetch=1000, counts=registered(ws))
    by_id = {w.identity: w for w in ws}
    for _ in range(5000):
        s.push(task(), 0.0)
    plan = s.assign(ws, 0.0)
    assert [len(v) for v in plan.values()] == [scheduler.MAX_PER_ROUND]  # one worker, one message
    _start(plan, by_id)
    plan = s.assign(ws, 0.0)
    assert len(plan) == 1 and b"w0" not in plan  # the next worker in turn
    _start(plan, by_id)
    plan = s.assign(ws, 0.0)
    assert sum(len(v) for v in plan.values()) == 500  # what the budget has left
    _start(plan, by_id)
    assert sum(len(w.inflight) for w in ws) == 2500
    assert not s.more  # nothing to come back for until tasks leave a worker
    assert s.assign(ws, 0.0) == {}
    for tid in list(ws[0].inflight)[:40]:  # 40 come back: 40 go out
        ws[0].remove(tid)
    assert sum(len(v) for v in s.assign(ws, 0.0).values()) == 40


def test_a_budget_cut_round_leaves_the_workers_it_did_not_reach_wanting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers the budget kept a round from reaching are looked at again when room comes."""
    from poolfleet.master import scheduler

    monkeypatch.setattr(scheduler, "INFLIGHT_BUDGET", 3)
    ws = [worker(f"w{i}", cpu=1) for i in range(6)]
    s = Scheduler(prefetch=0, counts=registered(ws))
    by_id = {w.identity: w for w in ws}
    for _ in range(10):
        s.push(task(), 0.0)
    plan = s.assign(ws, 0.0)
    assert sorted(planned(plan)) == ["w0", "w1", "w2"]
    _start(plan, by_id)
    assert all(w.wants for w in ws[3:])
    ws[0].remove(next(iter(ws[0].inflight)))
    plan = s.assign(ws, 0.01)  # one came back: one goes out, to a worker with a free slot
    assert [len(v) for v in plan.values()] == [1] and not s.more
    assert {w.worker_id for w in ws if w.wants} >= {"w3", "w4", "w5"} - set(planned(plan))


def test_the_serving_workers_are_found_anew_when_the_registry_changes() -> None:
    """With the registry's version, a round reuses the workers serving each (queue, kind) that
    an earlier round found; a worker that joins, leaves or starts draining changes the version,
    and the next round sees the fleet as it is (a worker that joined gets work, one that left
    gets none; one that drains gets none either way, its credit is 0)."""
    s = Scheduler(prefetch=0)
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    reg.add(worker("a", cpu=1))
    for _ in range(10):
        s.push(task(), 0.0)
    assert planned(s.assign(reg.workers.values(), 0.0, version=reg.version)).keys() == {"a"}
    reg.add(worker("b", cpu=2))
    assert planned(s.assign(reg.workers.values(), 0.01, version=reg.version)).keys() == {"b"}
    reg.add(worker("c", cpu=1))
    reg.remove(b"b")
    assert planned(s.assign(reg.workers.values(), 0.02, version=reg.version)).keys() == {"c"}
    d = worker("d", cpu=3)
    reg.add(d)
    reg.draining(d)
    reg.add(worker("e", cpu=1))
    assert planned(s.assign(reg.workers.values(), 0.03, version=reg.version)).keys() == {"e"}


def test_a_round_over_a_kept_serving_list_walks_only_the_workers_that_may_want() -> None:
    """A backlog bigger than the round, a thousand workers serving it and the registry's version
    unchanged: a round that is not a full one looks only at workers that may want (the rotation
    skips the others without counting their credit), so a finished task's worker is the one
    that gets the next task."""
    s = Scheduler(prefetch=0)
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    ws = [worker(f"w{i}", cpu=1) for i in range(1000)]
    for w in ws:
        reg.add(w)
    for _ in range(3000):
        s.push(task(), 0.0)
    plan = s.assign(reg.workers.values(), 0.0, version=reg.version)
    assert sum(len(v) for v in plan.values()) == 1000
    _start(plan, reg.workers)
    assert s.assign(reg.workers.values(), 0.0, version=reg.version) == {}
    done = plan[b"w123"][0]
    reg.workers[b"w123"].remove(done.id)
    with counting_free() as looked:
        plan = s.assign(reg.workers.values(), 0.01, version=reg.version)
    assert list(plan) == [b"w123"] and len(plan[b"w123"]) == 1
    assert looked == [b"w123"]
