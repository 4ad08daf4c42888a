"""The master's worker registry: liveness with injected times, heartbeats due, bookkeeping."""

from __future__ import annotations

from poolfleet.common.protocol import Kind
from poolfleet.master.registry import WorkerInfo, WorkerRegistry


def info(name: str, last_seen: float = 0.0, last_sent: float = 0.0) -> WorkerInfo:
    return WorkerInfo(
        identity=name.encode(), worker_id=name, host="h", pid=7, queues=("default",),
        slots={Kind.CPU: 2, Kind.IO: 4}, connected_at=0.0, last_seen=last_seen, last_sent=last_sent,
    )  # fmt: skip


def test_expiry_after_liveness_intervals() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=2.0, liveness=3)
    reg.add(info("a", last_seen=100.0))
    assert reg.expiry_s(reg.workers[b"a"]) == 6.0
    assert reg.expired(106.0) == []  # exactly at the limit: still alive
    assert [w.worker_id for w in reg.expired(106.001)] == ["a"]


def test_seen_refreshes_liveness() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    reg.add(info("a", last_seen=0.0))
    reg.add(info("b", last_seen=0.0))
    assert reg.seen(b"a", 5.0) is reg.get(b"a")
    assert [w.worker_id for w in reg.expired(5.5)] == ["b"]
    assert reg.seen(b"nobody", 5.0) is None


def test_heartbeat_due_after_an_interval_of_silence_from_the_master() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    reg.add(info("a", last_sent=10.0))
    reg.add(info("b", last_sent=10.6))
    assert reg.due_heartbeat(10.9) == []
    assert [w.worker_id for w in reg.due_heartbeat(11.0)] == ["a"]
    assert {w.worker_id for w in reg.due_heartbeat(11.6)} == {"a", "b"}


def test_interval_grows_in_steps_with_the_fleet_under_the_heartbeat_bound() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=0.5, liveness=3, max_heartbeats_per_s=10.0)
    sizes = {}
    for n in range(1, 13):
        reg.add(info(f"w{n}"))
        sizes[n] = reg.interval_s
    # 10 beats a second: 5 workers at 0.5 s, then whole multiples of 0.5 s
    assert sizes[1] == sizes[5] == 0.5
    assert sizes[6] == sizes[10] == 1.0
    assert sizes[11] == sizes[12] == 1.5
    assert all(n / sizes[n] <= 10.0 for n in sizes)
    unbounded = WorkerRegistry(heartbeat_interval_s=0.5, liveness=3)
    for n in range(50):
        unbounded.add(info(f"w{n}"))
    assert unbounded.interval_s == 0.5


def test_a_worker_told_a_longer_interval_expires_later_also_just_after_it_shrinks() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3, max_heartbeats_per_s=1.0)
    for name in "abc":
        reg.add(info(name, last_seen=0.0))
    a = reg.workers[b"a"]
    assert reg.tell(a) == 3.0  # three workers, one beat a second
    # b and c were never told another: the configured interval's 3 s; a: 3 x 3 s
    assert [w.worker_id for w in reg.expired(3.1)] == ["b", "c"]
    assert a not in reg.expired(9.0)
    assert a in reg.expired(9.1)
    reg.remove(b"b")
    reg.remove(b"c")
    assert reg.tell(a) == 1.0  # alone now: told the configured interval
    # it may still beat every 3 s until it has heard that: the longer one still counts
    assert a not in reg.expired(8.9)
    reg.seen(b"a", 10.0)
    assert reg.tell(a) == 1.0  # told again: only the new interval counts
    assert a not in reg.expired(12.9)
    assert a in reg.expired(13.1)


def test_workers_not_told_the_fleets_interval_get_a_heartbeat_at_the_configured_one() -> None:
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3, max_heartbeats_per_s=1.0)
    reg.add(info("a", last_sent=0.0))
    a = reg.workers[b"a"]
    assert reg.tell(a) == 1.0
    assert reg.due_heartbeat(0.9) == []
    reg.add(info("b", last_sent=0.0))  # two workers: 2 s now, and a must hear it
    reg.tell(reg.workers[b"b"])
    assert reg.due_heartbeat(1.0) == [a]
    a.last_sent = reg.workers[b"b"].last_sent = 1.0
    assert reg.tell(a) == 2.0
    assert reg.due_heartbeat(2.5) == []  # its own interval is 2 s
    assert {w.worker_id for w in reg.due_heartbeat(3.0)} == {"a", "b"}


def test_add_returns_the_entry_it_replaces() -> None:
    reg = WorkerRegistry(1.0, 3)
    first = info("a")
    assert reg.add(first) is None
    assert reg.add(info("a")) is first
    assert len(reg) == 1
    assert reg.remove(b"a") is not None
    assert reg.remove(b"a") is None
    assert len(reg) == 0


def test_inflight_bookkeeping_drives_credits() -> None:
    w = info("a")
    w.mean_ms = {Kind.CPU: 1.0, Kind.IO: 1.0}  # short tasks: the prefetch applies
    w.add(b"t1", Kind.CPU)
    w.add(b"t2", Kind.CPU)
    w.add(b"t3", Kind.IO)
    assert w.free(Kind.CPU, 1) == 2 + 100 - 2  # 2 slots x 50 ms window / 1 ms tasks
    w.remove(b"t1")
    w.remove(b"t1")  # twice: no double count
    w.remove(b"unknown")
    assert w.busy == {Kind.CPU: 1, Kind.IO: 1}
    w.mean_ms = {}  # run times unknown: no prefetch
    assert w.free(Kind.CPU, 1) == 2 - 1
    w.held = {Kind.IO: 2}
    assert w.free(Kind.IO, 0) == 4 - 1 - 2


def test_describe_reports_every_field() -> None:
    w = info("a", last_seen=8.0)
    w.add(b"t1", Kind.IO)
    w.held = {Kind.IO: 1, Kind.CPU: 0}
    d = w.describe(10.0)
    assert d == {
        "worker_id": "a",
        "host": "h",
        "pid": 7,
        "queues": ["default"],
        "slots": {"cpu": 2, "io": 4},
        "busy": {"cpu": 0, "io": 1},
        "held": {"io": 1},
        "started": {"cpu": 0, "io": 0},
        "draining": False,
        "last_heartbeat_s": 2.0,
        "heartbeat_interval_s": 0.0,
        "connected_s": 10.0,
        "offers": None,
    }


def test_fleet_counts_follow_every_change_of_the_registered_workers() -> None:
    """The registry's counts (what STATUS reports as DISPATCHED and RUNNING) equal the sums over
    the registered workers after any mix of sends, starts, finishes, reconnects and removals;
    a worker no longer registered (replaced, removed) counts no more, whatever happens to it."""
    import random

    rng = random.Random(7)
    reg = WorkerRegistry(heartbeat_interval_s=1.0, liveness=3)
    names = [f"w{i}" for i in range(5)]
    gone: list[WorkerInfo] = []
    started: set[tuple[int, bytes]] = set()  # (the WorkerInfo's id(), task id)
    n = 0
    for _ in range(3000):
        op = rng.random()
        name = rng.choice(names)
        w = reg.get(name.encode())
        if w is None or op < 0.02:  # registers, or the same identity reconnects (replaced)
            new = info(name)
            if w is not None and rng.random() < 0.5:  # it still holds some: they move over
                for tid in list(w.inflight)[:2]:
                    new.add(tid, w.inflight[tid])
                    if (id(w), tid) in started:  # what the core's _assign does for a RUNNING task
                        new.start(w.inflight[tid])
                        started.add((id(new), tid))
            reg.add(new)
            if w is not None:
                gone.append(w)
        elif op < 0.04:
            gone.append(reg.remove(w.identity) or w)
        elif op < 0.5:
            n += 1
            w.add(n.to_bytes(16, "big"), rng.choice((Kind.CPU, Kind.IO)))
        elif op < 0.7 and w.inflight:
            tid = rng.choice(list(w.inflight))
            if (id(w), tid) not in started:
                started.add((id(w), tid))
                w.start(w.inflight[tid])
        elif w.inflight:
            tid = rng.choice(list(w.inflight))
            w.remove(tid, 1.0, started=(id(w), tid) in started)
            started.discard((id(w), tid))
        if gone and rng.random() < 0.1:  # a replaced or removed worker's task ends all the same
            old = rng.choice(gone)
            if old.inflight:
                tid = next(iter(old.inflight))
                old.remove(tid, None, started=(id(old), tid) in started)
                started.discard((id(old), tid))
        workers = list(reg.workers.values())
        assert reg.counts.at_workers == sum(len(x.inflight) for x in workers)
        assert reg.counts.running == sum(sum(x.started.values()) for x in workers)
    assert reg.counts.at_workers > 0 and reg.counts.running > 0
