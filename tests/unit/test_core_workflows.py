"""Schedules, priorities and fleet-wide rate limits driven through the master core alone: a
fake monotonic clock and a fake wall clock, an in-memory journal, no sockets."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest

from poolfleet.common import codec
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import PROTOCOL_VERSION, Kind, MsgKind, Role
from poolfleet.master.core import MasterCore, Send
from poolfleet.master.ratelimit import guard_s
from poolfleet.master.registry import Offer
from poolfleet.master.schedule import run_id, tick_of
from poolfleet.master.settings import MasterSettings
from poolfleet.master.worker_api import Hello

_ids = itertools.count(1)
WALL0 = 1_700_000_000.0


class Journal:
    """What the core staged, by table: tasks inserted, schedule rows, limits."""

    def __init__(self) -> None:
        self.inserted: list[tuple[Any, ...]] = []
        self.schedules: dict[str, tuple[Any, ...]] = {}
        self.limits: dict[str, tuple[int, float]] = {}
        self.finished: dict[bytes, tuple[Any, ...]] = {}

    def stage_insert(self, *a: Any) -> None:
        self.inserted.append(a)

    def stage_schedule(self, row: tuple[Any, ...]) -> None:
        self.schedules[row[0]] = row

    def stage_schedule_removed(self, name: str) -> None:
        self.schedules.pop(name, None)

    def stage_limit(self, name: str, count: int, period_s: float) -> None:
        self.limits[name] = (count, period_s)

    def stage_limit_removed(self, name: str) -> None:
        self.limits.pop(name, None)

    def existing(self, ids: Any) -> set[bytes]:
        return {i for i in ids if i in self.finished}

    def results(self, ids: Any) -> dict[bytes, tuple[Any, ...]]:
        return {i: self.finished[i] for i in ids if i in self.finished}

    def __getattr__(self, name: str) -> Any:  # the other stagings: nothing to look at here
        if name.startswith("stage_"):
            return lambda *a: None
        raise AttributeError(name)


class Core:
    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = journal or Journal()
        settings = MasterSettings(data_dir=Path("unused"), heartbeat_interval_s=1.0, liveness=3)
        self.core = MasterCore(settings, self.journal, "m1", rng=random.Random(3))  # type: ignore[arg-type]
        self.now, self.wall = 100.0, WALL0
        self.sent: list[Send] = []

    def step(self, dt: float = 0.0) -> None:
        self.now += dt
        self.wall += dt
        self.core.tick(self.now, self.wall)
        self.flush()

    def flush(self) -> None:
        self.sent += self.core.take_out()
        self.sent += self.core.committed()[0]

    def hello(self, ident: bytes, names: tuple[str, ...] = ("m:f",), cpu: int = 1) -> None:
        h = Hello(
            version=PROTOCOL_VERSION, worker_id=ident.decode(), host="h", pid=1, session="s",
            queues=("default",), slots={Kind.CPU: cpu}, offers={n: Offer(Kind.CPU) for n in names},
            holding=[], allow_cmd=None,
        )  # fmt: skip
        self.core.worker_hello(ident, h, self.now, self.wall)
        self.flush()

    def submit(self, name: str = "m:f", **opts: Any) -> bytes:
        tid = next(_ids).to_bytes(16, "big")
        self.core.submit(
            b"c", 1, [{"id": tid, "name": name, "payload": b"\x90", **opts}], False, self.now, self.wall
        )
        self.flush()
        return tid

    def dispatched(self, ident: bytes) -> list[bytes]:
        return [
            t["id"]
            for s in self.sent
            if s.ident == ident and s.kind is MsgKind.DISPATCH
            for t in s.body["tasks"]
        ]

    def finish(self, ident: bytes, tid: bytes) -> None:
        entry = {
            "id": tid,
            "attempt": self.core.tasks[tid].attempt,
            "state": "SUCCEEDED",
            "value": codec.pack(1),
        }
        self.core.worker_message(ident, MsgKind.TASK_RESULTS, {"results": [entry]}, self.now, self.wall)
        self.flush()

    def control(self, kind: MsgKind, **body: Any) -> dict[str, Any]:
        handler = self.core.schedule_control if kind is MsgKind.SCHEDULE_CONTROL else self.core.limit_control
        handler(b"op", 7, {"req": 7, **body}, self.wall if kind is MsgKind.SCHEDULE_CONTROL else self.now)
        self.flush()
        (reply,) = [s.body for s in self.sent if s.ident == b"op" and s.to is Role.CLIENT][-1:]
        return reply


# -- priorities ----------------------------------------------------------------------------
def test_a_higher_priority_submitted_last_goes_first_then_fifo_by_priority() -> None:
    c = Core()
    c.hello(b"w", cpu=1)
    busy = c.submit()
    c.step()
    assert c.dispatched(b"w") == [busy]  # the one slot is busy (and prefetch is full)
    backlog = [c.submit() for _ in range(3)]
    mid = c.submit(priority=5)
    urgent = c.submit(priority=10)
    low = c.submit(priority=-1)
    order = []
    running = busy
    for _ in range(6):
        c.finish(b"w", running)
        c.step()
        running = c.dispatched(b"w")[-1]
        order.append(running)
    assert order[:2] == [urgent, mid] and order[2:5] == backlog and order[5] == low


def test_a_priority_outside_the_range_is_refused_at_submit() -> None:
    c = Core()
    c.hello(b"w")
    tid = c.submit(priority=101)
    reply = [s.body for s in c.sent if s.kind is MsgKind.SUBMITTED][-1]
    assert (
        reply["accepted"] == [] and "priority must be between -100 and 100" in reply["rejected"][0]["message"]
    )
    assert tid not in c.core.tasks


# -- rate limits -----------------------------------------------------------------------------
def test_a_rate_limit_holds_a_name_back_without_blocking_others_or_spinning() -> None:
    c = Core()
    c.hello(b"w1", names=("m:f", "m:g"), cpu=50)
    c.hello(b"w2", names=("m:f", "m:g"), cpu=50)
    reply = c.control(MsgKind.LIMIT_CONTROL, action="set", name="m:f", count=5, period_s=1.0)
    assert reply["changed"] and c.journal.limits == {"m:f": (5, 1.0)}
    limited = [c.submit("m:f") for _ in range(12)]
    free = [c.submit("m:g") for _ in range(12)]
    c.step()
    sent = c.dispatched(b"w1") + c.dispatched(b"w2")
    assert sorted(t for t in sent if t in limited) == sorted(limited[:5])  # five, across both
    assert sorted(t for t in sent if t in free) == sorted(free)  # the other name is not held up
    wait = c.core.next_timer_s(c.now)
    assert 0 < wait <= 0.5  # the loop sleeps (no spin) ...
    c.step(0.5)
    assert len(c.dispatched(b"w1") + c.dispatched(b"w2")) == 17  # ... nothing new within the window
    c.step(1.0 + guard_s(1.0) - 0.5 + 1e-6)
    assert len(c.dispatched(b"w1") + c.dispatched(b"w2")) == 22  # the window let five more go
    assert c.control(MsgKind.LIMIT_CONTROL, action="list")["limits"][0]["in_window"] == 5
    c.control(MsgKind.LIMIT_CONTROL, action="remove", name="m:f")
    c.step()
    assert len(c.dispatched(b"w1") + c.dispatched(b"w2")) == 24 and c.journal.limits == {}


def test_a_limit_waiting_with_no_worker_left_does_not_wake_the_loop() -> None:
    c = Core()
    c.hello(b"w", cpu=50)
    c.control(MsgKind.LIMIT_CONTROL, action="set", name="m:f", count=1, period_s=1.0)
    c.submit()
    c.submit()
    c.step()
    assert len(c.dispatched(b"w")) == 1
    c.core.worker_message(b"w", MsgKind.BYE, {}, c.now, c.wall)  # the last worker leaves
    c.step(5.0)
    assert c.core.next_timer_s(c.now) > 0.1  # a stale "may start at" does not make it spin


# -- schedules ---------------------------------------------------------------------------------
def add(c: Core, **doc: Any) -> dict[str, Any]:
    schedule = {"name": "beat", "task": "m:f", "payload": codec.pack_call((), {}), **doc}
    return c.control(MsgKind.SCHEDULE_CONTROL, action="add", schedule=schedule)


def test_a_schedule_fires_once_per_tick_after_the_dispatch_round_and_its_task_runs() -> None:
    c = Core()
    c.hello(b"w", cpu=4)
    reply = add(c, every_s=1.0, options={"priority": 3})
    (doc,) = reply["schedules"]
    assert reply["changed"] and doc["next_tick"] == math.floor(WALL0) + 1
    c.step(0.5)
    assert c.journal.inserted == []
    c.step(0.6)  # past the tick: fired, recorded in the same commit, not yet dispatched
    ((tid, name, *_rest, prio),) = c.journal.inserted
    assert tid == run_id("beat", WALL0 + 1) and name == "m:f" and prio == 3
    assert c.journal.schedules["beat"][9] == WALL0 + 1  # the horizon: the tick is settled
    assert c.dispatched(b"w") == [] and c.core.next_timer_s(c.now) == 0.0
    c.step()
    assert c.dispatched(b"w") == [tid]
    for _ in range(3):  # a slow loop turn of 2.5 s: the ticks due run once, as the latest
        c.step(2.5)
    ticks = [tick_of(r[0]) for r in c.journal.inserted]
    assert ticks == [WALL0 + 1, WALL0 + 3, WALL0 + 6, WALL0 + 8]
    listed = c.control(MsgKind.SCHEDULE_CONTROL, action="list")["schedules"][0]
    assert listed["last_task"] == c.journal.inserted[-1][0] and listed["last_state"] in (
        "PENDING",
        "DISPATCHED",
    )


def test_a_missed_tick_runs_once_after_a_restart_or_is_skipped() -> None:
    first = Core()
    add(first, every_s=60.0)
    add(first, name="quiet", every_s=60.0, catchup="skip")
    rows = list(first.journal.schedules.values())
    for catchup, expect in (("run-once", 1), ("skip", 0)):
        again = Core()  # the master was down for ten minutes
        again.wall = WALL0 + 600
        row = next(r for r in rows if r[7] == catchup)
        again.core.recover_schedules([row], [], again.wall)
        again.step()
        assert len(again.journal.inserted) == expect
        if expect:
            assert tick_of(again.journal.inserted[0][0]) == math.floor((WALL0 + 600) / 60) * 60
        (doc,) = again.control(MsgKind.SCHEDULE_CONTROL, action="list")["schedules"]
        assert doc["next_tick"] == (math.floor((WALL0 + 600) / 60) + 1) * 60


def test_the_tick_missed_is_the_one_due_at_the_restart_even_if_the_first_turn_comes_later() -> None:
    first = Core()
    add(first, every_s=1.0)
    (row,) = first.journal.schedules.values()
    again = Core()
    again.wall = WALL0 + 10.9
    again.core.recover_schedules([row], [], again.wall)
    again.step(0.3)  # the first turn comes after the next tick: both run, once each
    assert [tick_of(r[0]) for r in again.journal.inserted] == [WALL0 + 10, WALL0 + 11]


def test_a_fired_tick_never_fires_again_after_a_restart() -> None:
    c = Core()
    add(c, every_s=1.0)
    c.step(1.2)
    (row,) = c.journal.schedules.values()  # committed with the fired tick
    again = Core()
    again.wall = c.wall + 0.1  # restarted within the same second
    again.core.recover_schedules([row], [], again.wall)
    again.step()
    assert again.journal.inserted == []
    again.step(1.0)
    assert [tick_of(r[0]) for r in again.journal.inserted] == [WALL0 + 2]


def test_pause_resume_remove_and_refusals() -> None:
    c = Core()
    c.hello(b"w")
    add(c, every_s=1.0)
    assert add(c, every_s=1.0)["changed"] is False  # the same add again (a resend): no change
    with pytest.raises(ProtocolError, match="exists already; remove it first"):
        add(c, every_s=2.0)  # the shell answers ERROR with the code and message
    with pytest.raises(ProtocolError, match="bad cron expression"):
        add(c, name="other", cron="every day")
    with pytest.raises(ProtocolError, match="unknown task 'm:nope'"):
        add(c, name="other", task="m:nope", every_s=1.0)
    with pytest.raises(ProtocolError, match="no schedule named 'nope'"):
        c.control(MsgKind.SCHEDULE_CONTROL, action="pause", name="nope")
    assert c.control(MsgKind.SCHEDULE_CONTROL, action="pause", name="beat")["changed"]
    c.step(5.0)
    assert c.journal.inserted == []
    c.control(MsgKind.SCHEDULE_CONTROL, action="resume", name="beat")
    c.step(0.0)
    assert c.journal.inserted == []  # ticks that fell while paused do not run
    c.step(1.0)
    assert len(c.journal.inserted) == 1
    c.control(MsgKind.SCHEDULE_CONTROL, action="remove", name="beat")
    c.step(3.0)
    assert len(c.journal.inserted) == 1 and c.journal.schedules == {}
