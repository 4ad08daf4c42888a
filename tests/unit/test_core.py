"""Scenarios driven through the master core alone: events in, instructions out, a fake clock.

No sockets and no database: the journal is an in-memory stand-in that records what the core
staged, and the clocks are plain numbers the test moves.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from poolfleet.common import codec
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import PROTOCOL_VERSION, ErrorCode, Kind, MsgKind, Role, TaskState
from poolfleet.master import core as core_mod
from poolfleet.master.core import MasterCore, Send
from poolfleet.master.registry import Offer
from poolfleet.master.settings import MasterSettings
from poolfleet.master.worker_api import Hello

HB = 1.0
_ids = itertools.count(1)


class MemJournal:
    """What the core staged, in order; finished rows answer ``results``."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, tuple[Any, ...]]] = []
        self.finished: dict[bytes, tuple[Any, ...]] = {}

    def stage_insert(self, *a: Any) -> None:
        self.ops.append(("insert", a))

    def stage_start(self, *a: Any) -> None:
        self.ops.append(("start", a))

    def stage_requeue(self, *a: Any) -> None:
        self.ops.append(("requeue", a))

    def stage_finish(
        self, tid: bytes, state: TaskState, attempt: int, value: Any, error: Any, *rest: Any
    ) -> None:
        self.ops.append(("finish", (tid, state, attempt)))
        self.finished[tid] = (tid, "?", state.value, attempt, value, error, rest[2], rest[3], rest[0])

    def stage_task_def(self, *a: Any) -> None:
        self.ops.append(("def", a))

    def stage_hold(self, tid: bytes, state: TaskState, payload: bytes | None = None) -> None:
        self.ops.append(("hold", (tid, state.value, payload)))

    def stage_due(self, *a: Any) -> None:
        self.ops.append(("due", a))

    def stage_deps(self, *a: Any) -> None:
        self.ops.append(("deps", a))

    def stage_deps_done(self, *a: Any) -> None:
        self.ops.append(("deps_done", a))

    def existing(self, ids: Any) -> set[bytes]:
        return {i for i in ids if i in self.finished}

    def results(self, ids: Any) -> dict[bytes, tuple[Any, ...]]:
        return {i: self.finished[i] for i in ids if i in self.finished}

    def count(self, op: str, tid: bytes) -> int:
        return sum(1 for o, a in self.ops if o == op and a[0] == tid)


class Sim:
    """A core with a fake monotonic clock ``now`` and a wall clock ``wall`` set apart."""

    def __init__(self, **settings: Any) -> None:
        self.journal = MemJournal()
        self.settings = MasterSettings(
            data_dir=Path("unused"), heartbeat_interval_s=HB, liveness=3, **settings
        )
        self.core = MasterCore(self.settings, self.journal, "m1", rng=random.Random(7))
        self.now = 100.0
        self.wall = 1_700_000_000.0
        self.sent: list[Send] = []

    # -- driving ------------------------------------------------------------------
    def step(self, dt: float = 0.0) -> None:
        self.now += dt
        self.wall += dt
        self.core.tick(self.now, self.wall)
        self.flush()

    def flush(self) -> None:
        """The shell's end of a turn: sends now, commit, then what waited for the commit."""
        self.sent += self.core.take_out()
        sends, pushes = self.core.committed()
        self.sent += sends
        for client, entries in pushes.items():
            self.sent.append(Send(Role.CLIENT, client, MsgKind.RESULTS, {"results": entries}))

    def hello(
        self,
        ident: bytes,
        worker_id: str | None = None,
        offers: dict[str, Offer] | None = None,
        cpu: int = 2,
        holding: list[tuple[bytes, int]] | None = None,
        pid: int = 1,
        session: str = "s",
        queues: tuple[str, ...] = ("default",),
    ) -> None:
        h = Hello(
            version=PROTOCOL_VERSION,
            worker_id=worker_id or ident.decode(),
            host="h",
            pid=pid,
            session=session,
            queues=queues,
            slots={Kind.CPU: cpu},
            offers={"m:f": Offer(Kind.CPU)} if offers is None else offers,
            holding=holding or [],
            allow_cmd=None,
        )
        self.core.worker_hello(ident, h, self.now, self.wall)
        self.flush()

    def submit(self, n: int = 1, name: str = "m:f", client: bytes = b"c", **opts: Any) -> list[bytes]:
        ids = [next(_ids).to_bytes(16, "big") for _ in range(n)]
        tasks = [{"id": i, "name": name, "payload": b"\x90", **opts} for i in ids]
        self.core.submit(client, 1, tasks, True, self.now, self.wall)
        self.flush()
        return ids

    def worker(self, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        self.core.worker_message(ident, kind, body, self.now, self.wall)
        self.flush()

    def result(self, ident: bytes, tid: bytes, attempt: int, state: str = "SUCCEEDED", **extra: Any) -> None:
        entry = {"id": tid, "attempt": attempt, "state": state, "value": codec.pack(1), **extra}
        self.worker(ident, MsgKind.TASK_RESULTS, {"results": [entry]})

    # -- reading --------------------------------------------------------------
    def to(self, ident: bytes, kind: MsgKind) -> list[dict[str, Any]]:
        return [s.body for s in self.sent if s.ident == ident and s.kind is kind]

    def dispatched(self, ident: bytes) -> list[tuple[bytes, int]]:
        return [(t["id"], t["attempt"]) for b in self.to(ident, MsgKind.DISPATCH) for t in b["tasks"]]

    def state(self, tid: bytes) -> str:
        rec = self.core.tasks.get(tid)
        return rec.state.value if rec is not None else self.journal.finished[tid][2]


# -- routing -----------------------------------------------------------------------
def test_a_task_goes_only_to_a_worker_that_offers_its_name() -> None:
    s = Sim()
    s.hello(b"wa", offers={"moda:fa": Offer(Kind.CPU)}, cpu=4)
    s.hello(b"wb", offers={"modb:fb": Offer(Kind.CPU)}, cpu=4)
    fa, fb = s.submit(3, "moda:fa"), s.submit(3, "modb:fb")
    s.step()
    assert sorted(t for t, _ in s.dispatched(b"wa")) == sorted(fa)
    assert sorted(t for t, _ in s.dispatched(b"wb")) == sorted(fb)


def test_a_name_no_connected_worker_offers_waits_and_goes_to_one_that_joins() -> None:
    s = Sim()
    s.hello(b"wa", offers={"moda:fa": Offer(Kind.CPU)})
    s.hello(b"wb", offers={"modb:fb": Offer(Kind.CPU)})
    s.worker(b"wb", MsgKind.BYE, {})  # modb:fb is known (offered once) but nobody offers it now
    (tid,) = s.submit(1, "modb:fb")
    s.step()
    assert s.state(tid) == "PENDING" and s.dispatched(b"wa") == []
    status = s.core.status(1, 0.0)
    assert status["unserved"] == [{"name": "modb:fb", "queue": "default", "kind": "cpu", "pending": 1}]
    s.hello(b"wc", offers={"modb:fb": Offer(Kind.CPU)})
    s.step()
    assert s.dispatched(b"wc") == [(tid, 1)]
    assert s.core.status(2, 0.0)["unserved"] == []


def test_a_name_never_offered_is_refused_at_submit_with_the_closest_names() -> None:
    s = Sim()
    s.hello(b"wa", offers={"mytasks:square": Offer(Kind.CPU)})
    (tid,) = s.submit(1, "mytasks:sqaure")
    (reply,) = s.to(b"c", MsgKind.SUBMITTED)
    assert reply["accepted"] == []
    assert reply["rejected"][0]["code"] == ErrorCode.UNKNOWN_TASK
    assert "did you mean mytasks:square?" in reply["rejected"][0]["message"]
    assert tid not in s.core.tasks


def test_fifo_within_a_queue_across_names() -> None:
    s = Sim()
    s.hello(b"w", offers={"m:a": Offer(Kind.CPU), "m:b": Offer(Kind.CPU)}, cpu=1)
    order = [s.submit(1, n)[0] for n in ("m:b", "m:a", "m:b", "m:a")]
    for tid in order:
        s.step()
        got = s.dispatched(b"w")[-1]
        assert got == (tid, 1)
        s.result(b"w", tid, 1)


# -- defaults ----------------------------------------------------------------------
def test_no_hello_changes_what_another_worker_runs() -> None:
    s = Sim()
    s.hello(b"wa", offers={"m:f": Offer(Kind.CPU)}, cpu=1)
    s.hello(b"wb", offers={"m:f": Offer(Kind.CPU, timeout_s=0.001, retries=5)}, cpu=1)
    s.submit(3)
    s.step()
    to_a, to_b = s.to(b"wa", MsgKind.DISPATCH)[0]["tasks"], s.to(b"wb", MsgKind.DISPATCH)[0]["tasks"]
    assert "timeout_s" not in to_a[0]  # wa declared none: its task has none
    assert to_b[0]["timeout_s"] == 0.001  # wb's own declaration applies to what wb runs
    conflicts = s.core.workers_reply(1, s.now)["conflicts"]
    assert conflicts == {
        "m:f": {"wa": {"kind": "cpu", "retries": 0}, "wb": {"kind": "cpu", "retries": 5, "timeout_s": 0.001}}
    }
    # a failure on wa is final (wa declares no retries); on wb it is retried (wb declares 5)
    s.result(b"wa", to_a[0]["id"], 1, state="FAILED", error={"type": "E", "message": "x", "traceback": ""})
    s.result(b"wb", to_b[0]["id"], 1, state="FAILED", error={"type": "E", "message": "x", "traceback": ""})
    assert s.state(to_a[0]["id"]) == "FAILED"
    assert s.state(to_b[0]["id"]) == "PENDING"
    # the client's own option wins over every worker's
    (explicit,) = s.submit(1, timeout_s=7.0)
    s.step()
    sent = [
        t
        for w in (b"wa", b"wb")
        for m in s.to(w, MsgKind.DISPATCH)
        for t in m["tasks"]
        if t["id"] == explicit
    ]
    assert sent and all(t["timeout_s"] == 7.0 for t in sent)


# -- no hoarding ---------------------------------------------------------------------
def test_tasks_of_unknown_length_fill_free_slots_only_and_a_joining_worker_gets_the_rest() -> None:
    s = Sim()
    s.hello(b"wa", cpu=2)
    s.submit(10)
    s.step()
    assert len(s.dispatched(b"wa")) == 2
    s.hello(b"wb", cpu=2)  # joins a moment later: it gets work in the same loop turn
    s.step()
    assert len(s.dispatched(b"wb")) == 2


def test_unstarted_tasks_of_a_busy_worker_are_recalled_for_an_idle_one() -> None:
    s = Sim()
    s.hello(b"wa", cpu=1)
    s.core.registry.get(b"wa").mean_ms[Kind.CPU] = 1.0  # short so far: wa gets a prefetch
    ids = s.submit(4)
    s.step()
    sent = s.dispatched(b"wa")
    assert len(sent) == 4
    s.worker(b"wa", MsgKind.STARTED, {"tasks": [{"id": sent[0][0], "attempt": 1}]})
    assert s.state(sent[0][0]) == "RUNNING" and s.state(sent[1][0]) == "DISPATCHED"
    s.hello(b"wb", cpu=2)
    s.step(core_mod.RECALL_AFTER_S * 2)
    (recall,) = s.to(b"wa", MsgKind.RECALL)
    asked = [(r["id"], r["attempt"]) for r in recall["tasks"]]
    assert len(asked) == 2 and sent[0] not in asked  # never a task that started
    s.worker(b"wa", MsgKind.RETURN, {"tasks": [{"id": t, "attempt": a} for t, a in asked]})
    s.step()
    assert sorted(s.dispatched(b"wb")) == sorted((t, 1) for t, _ in asked)  # not a new attempt
    assert ids


def test_started_notice_moves_dispatched_to_running_and_status_counts_them_apart() -> None:
    s = Sim()
    s.hello(b"w", cpu=2)
    a, _b = s.submit(2)
    s.step()
    s.worker(b"w", MsgKind.STARTED, {"tasks": [{"id": a, "attempt": 1}]})
    counts = s.core.status(1, 0.0)["counts"]
    assert (counts["RUNNING"], counts["DISPATCHED"], counts["PENDING"]) == (1, 1, 0)
    assert s.core.workers_reply(1, s.now)["workers"][0]["started"] == {"cpu": 1}


# -- lost workers, returns, cancels, stale results ----------------------------------
def test_worker_lost_requeues_its_tasks_and_counts_the_loss() -> None:
    s = Sim()
    s.hello(b"wa")
    (tid,) = s.submit(1)
    s.step()
    s.step(HB * 3 + 0.01)  # silent for liveness intervals
    assert b"wa" not in s.core.registry.workers
    rec = s.core.tasks[tid]
    assert (rec.state, rec.lost, rec.worker) == (TaskState.PENDING, 1, None)
    s.hello(b"wb")
    s.step()
    assert s.dispatched(b"wb") == [(tid, 2)]


def test_a_task_returned_unstarted_goes_to_the_front_without_using_an_attempt() -> None:
    s = Sim()
    s.hello(b"wa", cpu=1)
    first, _second = s.submit(2)
    s.step()
    assert s.dispatched(b"wa") == [(first, 1)]
    s.worker(b"wa", MsgKind.DRAINING, {})
    s.worker(b"wa", MsgKind.RETURN, {"tasks": [{"id": first, "attempt": 1}]})
    s.hello(b"wb", cpu=1)
    s.step()
    assert s.dispatched(b"wb") == [(first, 1)]  # ahead of second, and still attempt 1
    assert s.core.tasks[first].lost == 0


def test_cancel_racing_a_result_records_one_outcome() -> None:
    s = Sim()
    s.hello(b"w")
    (tid,) = s.submit(1)
    s.step()
    s.core.cancel(b"c", 2, [tid], s.now, s.wall)
    s.result(b"w", tid, 1)  # the result was on its way when the cancel went out
    s.flush()
    assert s.to(b"w", MsgKind.CANCEL_TASKS) == [{"tasks": [{"id": tid, "attempt": 1}]}]
    assert s.journal.count("finish", tid) == 1 and s.state(tid) == "SUCCEEDED"
    s.result(b"w", tid, 1, state="CANCELLED", error={"type": "Cancelled", "message": "", "traceback": ""})
    assert s.journal.count("finish", tid) == 1  # the late CANCELLED changes nothing
    assert s.to(b"w", MsgKind.ACK)[-1] == {"tasks": [{"id": tid, "attempt": 1}]}  # but is acknowledged


def test_a_started_task_is_announced_to_the_clients_waiting_for_it_only() -> None:
    s = Sim()
    s.hello(b"w", cpu=2)
    (a,) = s.submit(1, client=b"c1")
    ids = [next(_ids).to_bytes(16, "big")]
    s.core.submit(b"c2", 1, [{"id": ids[0], "name": "m:f", "payload": b"\x90"}], False, s.now, s.wall)
    s.step()
    s.core.result_get(b"c3", 2, [a], True)  # a late follower subscribes too
    s.worker(b"w", MsgKind.STARTED, {"tasks": [{"id": a, "attempt": 1}, {"id": ids[0], "attempt": 1}]})
    notice = {"tasks": [{"id": a, "attempt": 1}]}
    assert s.to(b"c1", MsgKind.TASKS_STARTED) == [notice] == s.to(b"c3", MsgKind.TASKS_STARTED)
    assert s.to(b"c2", MsgKind.TASKS_STARTED) == []  # submitted without wait: nothing pushed
    s.worker(b"w", MsgKind.STARTED, {"tasks": [{"id": a, "attempt": 1}]})  # said again: no news
    assert len(s.to(b"c1", MsgKind.TASKS_STARTED)) == 1


def test_a_cancel_unless_started_leaves_a_running_task_alone_and_says_so() -> None:
    s = Sim()
    s.hello(b"w", cpu=2)
    running, dispatched = s.submit(2)
    (pending,) = s.submit(1)
    s.step()
    s.worker(b"w", MsgKind.STARTED, {"tasks": [{"id": running, "attempt": 1}]})
    assert s.state(pending) == "PENDING" and s.state(dispatched) == "DISPATCHED"
    s.core.cancel(b"c", 5, [running, dispatched, pending], s.now, s.wall, if_not_started=True)
    s.flush()
    (reply,) = s.to(b"c", MsgKind.CANCEL_REPLY)
    assert [r["outcome"] for r in reply["results"]] == ["running", "cancelling", "cancelled"]
    soft = {"id": dispatched, "attempt": 1, "if_not_started": True}  # the worker decides
    assert s.to(b"w", MsgKind.CANCEL_TASKS) == [{"tasks": [soft]}]
    assert s.state(running) == "RUNNING" and not s.core.tasks[running].cancel
    # the worker had started it: it says so, and the cancel is withdrawn
    s.worker(b"w", MsgKind.STARTED, {"tasks": [{"id": dispatched, "attempt": 1}]})
    assert s.state(dispatched) == "RUNNING" and not s.core.tasks[dispatched].cancel
    assert s.to(b"c", MsgKind.TASKS_STARTED)[-1] == {"tasks": [{"id": dispatched, "attempt": 1}]}
    s.core.cancel(b"c", 6, [running], s.now, s.wall)  # a plain CANCEL (Client.kill) stops it
    s.flush()
    assert s.to(b"c", MsgKind.CANCEL_REPLY)[-1]["results"][0]["outcome"] == "cancelling"
    assert s.to(b"w", MsgKind.CANCEL_TASKS)[-1] == {"tasks": [{"id": running, "attempt": 1}]}


def test_a_stale_attempts_result_is_dropped_and_acknowledged() -> None:
    s = Sim()
    s.hello(b"wa")
    (tid,) = s.submit(1)
    s.step()
    s.step(HB * 3 + 0.01)  # wa expires; the task goes back
    s.hello(b"wb")
    s.step()
    assert s.dispatched(b"wb") == [(tid, 2)]
    s.result(b"wa", tid, 1)  # wa was only slow: its attempt 1 is stale
    assert s.state(tid) == "DISPATCHED" and s.journal.count("finish", tid) == 0
    assert {"tasks": [{"id": tid, "attempt": 1}]} in s.to(b"wa", MsgKind.ACK)
    s.result(b"wb", tid, 2)
    assert s.state(tid) == "SUCCEEDED"


def test_a_duplicate_result_after_a_lost_ack_is_acknowledged_not_recorded_twice() -> None:
    s = Sim()
    s.hello(b"w")
    (tid,) = s.submit(1)
    s.step()
    s.result(b"w", tid, 1)
    s.result(b"w", tid, 1)  # sent again: the first ACK was lost with the connection
    assert s.journal.count("finish", tid) == 1
    assert len(s.to(b"w", MsgKind.ACK)) == 2


def test_results_are_acknowledged_only_after_the_commit() -> None:
    s = Sim()
    s.hello(b"w")
    (tid,) = s.submit(1)
    s.step()
    s.core.worker_message(
        b"w",
        MsgKind.TASK_RESULTS,
        {"results": [{"id": tid, "attempt": 1, "state": "SUCCEEDED"}]},
        s.now,
        s.wall,
    )
    assert all(x.kind is not MsgKind.ACK for x in s.core.take_out())  # nothing before the commit
    sends, _ = s.core.committed()
    assert [x.kind for x in sends] == [MsgKind.ACK]


def test_results_are_pushed_before_the_commit_except_those_of_tasks_submitted_since() -> None:
    """A result goes to its waiting client in the turn it arrives, before the commit that
    records it (the worker keeps it until the ACK, which waits for the commit); the result of
    a task submitted since the last commit waits for the commit, which may withdraw it."""
    s = Sim()
    s.hello(b"w")
    (tid,) = s.submit(1)
    s.step()
    s.core.worker_message(
        b"w", MsgKind.TASK_RESULTS, {"results": [{"id": tid, "attempt": 1, "state": "SUCCEEDED"}]},
        s.now, s.wall,
    )  # fmt: skip
    early = s.core.take_pushes(before_commit=True)
    assert [e["id"] for e in early[b"c"]] == [tid]
    sends, later = s.core.committed()
    assert later == {} and [x.kind for x in sends] == [MsgKind.ACK]
    # a task cancelled in the turn of its submit: its CANCELLED result waits for the commit
    (fresh,) = [next(_ids).to_bytes(16, "big")]
    s.core.submit(b"c", 2, [{"id": fresh, "name": "m:f", "payload": b"\x90", "queue": "nobody"}], True,
                  s.now, s.wall)  # fmt: skip
    s.core.cancel(b"c", 3, [fresh], s.now, s.wall)
    assert s.core.take_pushes(before_commit=True) == {}
    _, later = s.core.committed()
    assert [(e["id"], e["state"]) for e in later[b"c"]] == [(fresh, "CANCELLED")]


# -- reconciliation ----------------------------------------------------------------
def test_a_dispatch_the_worker_never_got_is_requeued_without_counting_a_loss() -> None:
    s = Sim()
    s.hello(b"wa", cpu=1)
    (tid,) = s.submit(1)
    s.step()
    s.worker(b"wa", MsgKind.HEARTBEAT, {"holding": []})  # right after the send: too early to judge
    assert s.state(tid) == "DISPATCHED"
    s.now += core_mod.UNHELD_AFTER_INTERVALS * HB + 0.01
    s.worker(b"wa", MsgKind.HEARTBEAT, {"holding": []})
    rec = s.core.tasks[tid]
    assert (rec.state, rec.lost, rec.failures) == (TaskState.PENDING, 0, 0)
    s.step()
    assert s.dispatched(b"wa")[-1] == (tid, 2)  # a new attempt: fencing drops a late old result
    s.now += core_mod.UNHELD_AFTER_INTERVALS * HB + 0.01
    s.worker(b"wa", MsgKind.HEARTBEAT, {"holding": [{"id": tid, "attempt": 2}]})
    assert s.state(tid) == "DISPATCHED"  # held: left alone


# -- twins and reconnects ----------------------------------------------------------
def test_a_second_live_process_with_the_same_worker_id_is_refused_and_harms_no_task() -> None:
    s = Sim()
    s.hello(b"w1/s1", worker_id="w1", pid=10, session="s1")
    ids = s.submit(2)
    s.step()
    s.hello(b"w1/s2", worker_id="w1", pid=20, session="s2")
    (err,) = s.to(b"w1/s2", MsgKind.ERROR)
    assert (
        err["code"] == ErrorCode.DUPLICATE_WORKER
        and "pid 10" in err["message"]
        and "pid 20" in err["message"]
    )
    assert s.dispatched(b"w1/s2") == []
    for tid in ids:
        rec = s.core.tasks[tid]
        assert (rec.state, rec.worker, rec.lost) == (TaskState.DISPATCHED, b"w1/s1", 0)


def test_a_restarted_worker_replaces_its_silent_predecessor() -> None:
    s = Sim()
    s.hello(b"w1/s1", worker_id="w1", pid=10, session="s1")
    (tid,) = s.submit(1)
    s.step()
    s.now += HB * core_mod.TWIN_ALIVE_INTERVALS + 0.01  # the old process went quiet (it died)
    s.hello(b"w1/s2", worker_id="w1", pid=20, session="s2")
    assert s.to(b"w1/s2", MsgKind.WELCOME) and b"w1/s1" not in s.core.registry.workers
    s.step()
    assert s.dispatched(b"w1/s2") == [(tid, 2)]  # its task went back and on to the new process


def test_a_reconnect_of_the_same_process_keeps_what_it_holds() -> None:
    s = Sim()
    s.hello(b"w/s", worker_id="w", cpu=2)
    a, b = s.submit(2)
    s.step()
    s.hello(b"w/s", worker_id="w", cpu=2, holding=[(a, 1)])  # b never arrived
    assert s.core.tasks[a].worker == b"w/s" and a in s.core.registry.get(b"w/s").inflight
    rec_b = s.core.tasks[b]
    assert rec_b.lost == 0  # requeued without counting against it
    s.step()
    assert (b, 2) in s.dispatched(b"w/s")


# -- restart of the master -----------------------------------------------------------
def _row(tid: bytes, state: str, attempt: int) -> tuple[Any, ...]:
    return (tid, "m:f", "default", "cpu", state, attempt, b"\x90", None, None, 0, 0, 1.0)


def test_after_a_restart_a_worker_claims_what_it_holds_and_the_rest_is_requeued() -> None:
    s = Sim()
    held, gone, pend = (next(_ids).to_bytes(16, "big") for _ in range(3))
    rows = [_row(held, "DISPATCHED", 1), _row(gone, "RUNNING", 2), _row(pend, "PENDING", 0)]
    s.core.recover(rows, [("m:f", "cpu", None, 0)], {}, s.now, hold_pending=False)
    s.hello(b"w", holding=[(held, 1)], cpu=4)
    assert s.core.tasks[held].worker == b"w" and s.state(held) == "DISPATCHED"
    s.step()
    assert (pend, 1) in s.dispatched(b"w") and all(t != gone for t, _ in s.dispatched(b"w"))
    while s.now < 100.0 + s.settings.grace_s:  # nobody claims `gone` within the grace
        s.worker(b"w", MsgKind.HEARTBEAT, {})
        s.step(0.5)
    assert (gone, 3) in s.dispatched(b"w")  # so it runs again


def test_after_an_unclean_stop_pending_tasks_wait_for_the_worker_that_may_hold_them() -> None:
    # A DISPATCH leaves before the commit that records it: after a kill the journal may show
    # PENDING for a task a worker holds, or has even finished. It must not run again.
    s = Sim()
    tid = next(_ids).to_bytes(16, "big")
    s.core.recover([_row(tid, "PENDING", 0)], [("m:f", "cpu", None, 0)], {}, s.now, hold_pending=True)
    s.hello(b"other", cpu=4)
    s.step()
    assert s.dispatched(b"other") == []  # held back for the grace period
    s.core.worker_message(
        b"w",
        MsgKind.TASK_RESULTS,
        {"results": [{"id": tid, "attempt": 1, "state": "SUCCEEDED"}]},
        s.now,
        s.wall,
    )
    s.flush()  # the result from the worker that ran it, before that worker's HELLO
    assert s.state(tid) == "SUCCEEDED" and s.journal.count("finish", tid) == 1
    s.step(s.settings.grace_s)
    assert s.dispatched(b"other") == []


def test_after_a_clean_restart_never_started_tasks_wait_cold_in_their_order() -> None:
    s = Sim()
    a, b, c = (next(_ids).to_bytes(16, "big") for _ in range(3))
    retried = (*_row(b, "PENDING", 1)[:9], 1, 0, 1.0)  # failed once: keeps its record
    s.core.recover([_row(a, "PENDING", 0), retried, _row(c, "PENDING", 0)], [("m:f", "cpu", None, 0)], {}, s.now, hold_pending=False)  # fmt: skip
    assert set(s.core.tasks.cold) == {a, c} and dict.__contains__(s.core.tasks, b)
    assert s.core.status(1, 0.0)["counts"]["PENDING"] == 3
    s.hello(b"w", cpu=4)
    s.step()
    assert s.dispatched(b"w") == [(a, 1), (b, 2), (c, 1)]
    assert not s.core.tasks.cold


# -- cold tasks ----------------------------------------------------------------------
def test_submitted_tasks_wait_cold_and_a_lookup_or_a_cancel_sees_them() -> None:
    s = Sim()
    ids = s.submit(5)
    assert set(s.core.tasks.cold) == set(ids)  # queued without a record each
    assert s.core.status(1, 0.0)["counts"]["PENDING"] == 5
    assert s.state(ids[0]) == "PENDING"  # a look-up makes its record
    assert ids[0] not in s.core.tasks.cold
    s.core.cancel(b"c", 2, [ids[2]], s.now, s.wall)
    s.flush()
    assert s.state(ids[2]) == "CANCELLED"
    assert s.core.status(2, 0.0)["counts"]["PENDING"] == 4
    s.hello(b"w", cpu=8)
    s.step()
    assert s.dispatched(b"w") == [(t, 1) for t in (ids[0], ids[1], ids[3], ids[4])]
    assert not s.core.tasks.cold


def test_a_submit_of_one_task_makes_its_record_and_keeps_the_fifo_order_with_batches() -> None:
    s = Sim()
    first = s.submit(2)
    (one,) = s.submit(1)
    last = s.submit(2)
    assert set(s.core.tasks.cold) == {*first, *last}  # a batch of one would cost more
    assert dict.__contains__(s.core.tasks, one)
    assert s.core.status(1, 0.0)["counts"]["PENDING"] == 5
    s.hello(b"w", cpu=8)
    s.step()
    assert s.dispatched(b"w") == [(t, 1) for t in (*first, one, *last)]


# -- clocks --------------------------------------------------------------------------
def test_a_wall_clock_step_expires_no_worker() -> None:
    s = Sim()
    s.hello(b"w")
    s.wall += 3600.0  # the wall clock jumps an hour; the monotonic one moves on normally
    for _ in range(10):
        s.step(0.25)
        s.worker(b"w", MsgKind.HEARTBEAT, {})
    assert b"w" in s.core.registry.workers
    s.wall -= 7200.0  # and back, two hours
    s.step(0.25)
    assert b"w" in s.core.registry.workers


@pytest.mark.parametrize("code", [ErrorCode.DUPLICATE_WORKER])
def test_the_error_codes_the_core_sends_are_documented(code: ErrorCode) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    assert f"| `{code.value}` |" in doc


def test_a_chunk_of_calls_goes_to_a_worker_that_offers_the_function_it_calls() -> None:
    chunk = "poolfleet.worker.builtins:map_chunk"
    s = Sim()
    s.hello(b"wa", offers={"moda:fa": Offer(Kind.CPU), chunk: Offer(Kind.CPU)}, cpu=4)
    s.hello(b"wb", offers={"modb:fb": Offer(Kind.CPU), chunk: Offer(Kind.CPU)}, cpu=4)
    ids = [next(_ids).to_bytes(16, "big") for _ in range(4)]
    payloads = [codec.pack_call(["moda:fa", [1, 2, 3]], {}), codec.pack_call(["modb:fb", [4]], {})]
    tasks = [{"id": i, "name": chunk, "payload": payloads[n % 2]} for n, i in enumerate(ids)]
    s.core.submit(b"c", 1, tasks, False, s.now, s.wall)
    s.step()
    assert sorted(t for t, _ in s.dispatched(b"wa")) == sorted(ids[0::2])
    assert sorted(t for t, _ in s.dispatched(b"wb")) == sorted(ids[1::2])
    bad = next(_ids).to_bytes(16, "big")
    s.core.submit(
        b"c",
        2,
        [{"id": bad, "name": chunk, "payload": codec.pack_call(["modz:nope", []], {})}],
        False,
        s.now,
        s.wall,
    )
    s.flush()
    rejected = s.to(b"c", MsgKind.SUBMITTED)[-1]["rejected"]
    assert [r["code"] for r in rejected] == [ErrorCode.UNKNOWN_TASK]


# -- tasks that wait: dependencies and due times (core_waits.py) ---------------------------------
def _refs_payload(*args: Any) -> bytes:
    return codec.pack_call(list(args), {}, [])


def _dispatched_payload(s: Sim, ident: bytes, tid: bytes) -> Any:
    (entry,) = [t for b in s.to(ident, MsgKind.DISPATCH) for t in b["tasks"] if t["id"] == tid]
    return codec.unpack(entry["payload"])


def _live(s: Sim, ident: bytes, seconds: float) -> None:
    """Let ``seconds`` pass on the fake clocks, the worker ``ident`` sending heartbeats."""
    while seconds > 0:
        step = min(0.5, seconds)
        s.step(step)
        s.worker(ident, MsgKind.HEARTBEAT, {})
        seconds -= step


def _pushed(s: Sim, tid: bytes) -> dict[str, Any]:
    found = [e for b in s.to(b"c", MsgKind.RESULTS) for e in b["results"] if e["id"] == tid]
    assert found, f"no result pushed for {tid.hex()}"
    return found[-1]


def test_a_chain_waits_and_each_task_gets_the_result_before_it() -> None:
    s = Sim()
    s.hello(b"w", cpu=4)
    (a,) = s.submit()
    (b,) = s.submit(payload=_refs_payload(codec.TaskRef(a), 1), refs=True)
    (c,) = s.submit(payload=_refs_payload([{"x": codec.TaskRef(b)}]), refs=True)
    s.step()
    assert s.dispatched(b"w") == [(a, 1)]
    assert (s.state(b), s.state(c)) == ("WAITING", "WAITING")
    counts = s.core.status(1, 0.0)["counts"]
    assert (counts["WAITING"], counts["PENDING"], counts["DISPATCHED"]) == (2, 0, 1)
    s.result(b"w", a, 1, value=codec.pack([5, "five"]))
    s.step()
    assert s.state(b) == "DISPATCHED" and s.state(c) == "WAITING"
    assert _dispatched_payload(s, b"w", b) == [[[5, "five"], 1], {}]
    assert ("hold", (b, "PENDING", s.core.tasks[b].payload)) in s.journal.ops
    assert s.journal.count("deps_done", b) == 1  # started: its dependency rows go
    s.result(b"w", b, 1, value=codec.pack(7))
    s.step()
    assert _dispatched_payload(s, b"w", c) == [[[{"x": 7}]], {}]


def test_a_failed_dependency_fails_the_chain_at_once_naming_it() -> None:
    s = Sim()
    s.hello(b"w", cpu=4)
    (a,) = s.submit()
    (b,) = s.submit(payload=_refs_payload(codec.TaskRef(a)), refs=True)
    (c,) = s.submit(after=[b])
    s.step()
    s.result(b"w", a, 1, state="FAILED", error={"type": "ValueError", "message": "bad", "traceback": ""})
    assert (s.state(b), s.state(c)) == ("FAILED", "FAILED")
    eb, ec = _pushed(s, b), _pushed(s, c)
    assert eb["error"]["type"] == "DependencyFailed" and eb["attempt"] == 0
    assert eb["error"]["dependency"] == format_id(a) and eb["error"]["dependency_state"] == "FAILED"
    assert format_id(a) in eb["error"]["message"] and "ValueError: bad" in eb["error"]["message"]
    assert ec["error"]["dependency"] == format_id(b)
    assert all(t in (a,) for t, _ in s.dispatched(b"w"))
    assert s.core.dependents == {} and s.core.waits == {}


def test_cancelling_a_task_cancels_what_waits_on_it() -> None:
    s = Sim()
    (a,) = s.submit()  # no worker: it stays PENDING
    (b,) = s.submit(after=[a])
    (c,) = s.submit(payload=_refs_payload(codec.TaskRef(b)), refs=True)
    s.core.cancel(b"c", 2, [a], s.now, s.wall)
    s.flush()
    assert [s.state(t) for t in (a, b, c)] == ["CANCELLED"] * 3
    assert _pushed(s, c)["error"]["dependency_state"] == "CANCELLED"
    (d,) = s.submit()
    (e,) = s.submit(after=[d])
    s.core.cancel(b"c", 3, [e], s.now, s.wall)  # a waiting task itself
    s.flush()
    assert (s.state(d), s.state(e)) == ("PENDING", "CANCELLED")
    assert s.core.status(4, 0.0)["counts"]["WAITING"] == 0


def test_a_long_chain_fails_without_recursion() -> None:
    s = Sim()
    (first,) = s.submit()
    prev, chain = first, []
    for _ in range(3000):
        (prev,) = s.submit(after=[prev])
        chain.append(prev)
    s.core.cancel(b"c", 2, [first], s.now, s.wall)
    s.flush()
    assert s.state(chain[-1]) == "CANCELLED" and not s.core.waits


def test_dependencies_the_master_does_not_know_or_cannot_take_are_refused_at_submit() -> None:
    s = Sim()
    unknown = b"\x42" * 16
    for opts in (
        {"after": [unknown]},
        {"payload": _refs_payload(codec.TaskRef(unknown)), "refs": True},
        {"after": [b"short"]},
        {"payload": b"\xd4\x05\x00", "refs": True},  # an extension type that is not a reference
        {"delay_s": -1},
        {"eta": float("inf")},
    ):
        (tid,) = s.submit(**opts)
        reply = s.to(b"c", MsgKind.SUBMITTED)[-1]
        assert reply["accepted"] == [] and tid not in s.core.tasks, opts
    codes = [r["rejected"][0]["code"] for r in s.to(b"c", MsgKind.SUBMITTED)]
    assert codes[:2] == [ErrorCode.UNKNOWN_ID] * 2 and set(codes[2:]) == {ErrorCode.BAD_REQUEST}
    assert "does not know" in s.to(b"c", MsgKind.SUBMITTED)[0]["rejected"][0]["message"]
    me = next(_ids).to_bytes(16, "big")
    s.core.submit(
        b"c", 9, [{"id": me, "name": "m:f", "payload": b"\x90", "after": [me]}], True, s.now, s.wall
    )
    s.flush()
    assert "itself" in s.to(b"c", MsgKind.SUBMITTED)[-1]["rejected"][0]["message"]


def test_dependencies_already_finished_are_taken_from_the_journal() -> None:
    s = Sim()
    s.hello(b"w", cpu=4)
    ok, bad = s.submit(2)
    s.step()
    s.result(b"w", ok, 1, value=codec.pack("v"))
    s.result(b"w", bad, 1, state="TIMED_OUT", error={"type": "Timeout", "message": "slow", "traceback": ""})
    (d,) = s.submit(payload=_refs_payload(codec.TaskRef(ok)), refs=True)
    s.step()
    assert _dispatched_payload(s, b"w", d) == [["v"], {}]
    (f,) = s.submit(after=[ok, bad])
    assert s.state(f) == "FAILED" and _pushed(s, f)["error"]["dependency_state"] == "TIMED_OUT"


def test_a_delayed_task_is_dispatched_at_its_time_not_before() -> None:
    s = Sim()
    s.hello(b"w", cpu=4)
    (t,) = s.submit(delay_s=10)
    (past,) = s.submit(eta=s.wall - 5)
    (both,) = s.submit(delay_s=1, eta=s.wall + 20)  # the later of the two
    s.step()
    assert s.dispatched(b"w") == [(past, 1)]
    assert s.state(t) == "DELAYED" and s.core.status(1, 0.0)["counts"]["DELAYED"] == 2
    assert ("due", (t, s.wall + 10 - 0.0)) in s.journal.ops
    assert 0 < s.core.next_timer_s(s.now) <= 10
    _live(s, b"w", 9.9)
    assert (t, 1) not in s.dispatched(b"w")
    _live(s, b"w", 0.2)
    assert (t, 1) in s.dispatched(b"w") and s.state(both) == "DELAYED"
    _live(s, b"w", 10)
    assert (both, 1) in s.dispatched(b"w")
    counts = s.core.status(2, 0.0)["counts"]
    assert (counts["DELAYED"], counts["PENDING"]) == (0, 0)


def test_a_waiting_task_with_a_due_time_waits_for_both() -> None:
    s = Sim()
    s.hello(b"w", cpu=4)
    (a,) = s.submit(delay_s=5)
    (b,) = s.submit(after=[a], delay_s=2)
    _live(s, b"w", 2.5)
    assert s.state(b) == "WAITING"  # its time has come, its dependency has not run
    _live(s, b"w", 3)
    s.result(b"w", a, 1)
    s.step()
    assert (b, 1) in s.dispatched(b"w")
    (c,) = s.submit(after=[b], delay_s=30)
    s.result(b"w", b, 1)
    s.step()
    assert s.state(c) == "DELAYED"


def test_recovery_holds_waiting_and_delayed_tasks_again() -> None:
    s = Sim()
    dep, waiting, late, due, done = (next(_ids).to_bytes(16, "big") for _ in range(5))
    s.journal.finished[done] = (done, "m:f", "SUCCEEDED", 1, codec.pack(3), None, "w", 1.0, 1.0)
    payload = _refs_payload(codec.TaskRef(dep), codec.TaskRef(done))
    rows = [
        _row(dep, "PENDING", 0),
        (*_row(waiting, "WAITING", 0)[:6], payload, *_row(waiting, "WAITING", 0)[7:], None),
        (*_row(late, "DELAYED", 0), s.wall + 50),
        (*_row(due, "DELAYED", 0), s.wall - 1),
    ]
    deps = [(waiting, dep, 1), (waiting, done, 1)]
    s.core.recover(rows, [("m:f", "cpu", None, 0)], {}, s.now, hold_pending=False, wall=s.wall, deps=deps)
    assert [s.state(t) for t in (waiting, late, due)] == ["WAITING", "DELAYED", "PENDING"]
    s.hello(b"w", cpu=4)
    s.step()
    assert {t for t, _ in s.dispatched(b"w")} == {dep, due}
    s.result(b"w", dep, 1, value=codec.pack(4))
    s.step()
    assert _dispatched_payload(s, b"w", waiting) == [[4, 3], {}]
    _live(s, b"w", 50)
    assert (late, 1) in s.dispatched(b"w")


# -- a journal that cannot be written ---------------------------------------------------------
def test_a_failed_commit_refuses_its_submits_holds_acks_and_dispatch() -> None:
    s = Sim()
    s.hello(b"w", cpu=2)
    (old,) = s.submit(1)
    s.step()
    assert s.dispatched(b"w") == [(old, 1)]
    # one turn: a submit, a dispatch of it, and a result of the older task; then the commit fails
    ids = [next(_ids).to_bytes(16, "big") for _ in range(1)]
    s.core.submit(b"c2", 9, [{"id": ids[0], "name": "m:f", "payload": b"\x90"}], True, s.now, s.wall)
    s.core.tick(s.now, s.wall)
    s.core.worker_message(
        b"w",
        MsgKind.TASK_RESULTS,
        {"results": [{"id": old, "attempt": 1, "state": "SUCCEEDED", "value": codec.pack(1)}]},
        s.now,
        s.wall,
    )
    s.sent += s.core.take_out()
    assert (ids[0], 1) in s.dispatched(b"w")  # sent before the commit, as always
    withdrawn = s.core.commit_failed("disk full")
    s.sent += s.core.take_out()
    assert withdrawn == {ids[0]} and ids[0] not in s.core.tasks
    assert s.core.hold_dispatch
    (err,) = s.to(b"c2", MsgKind.ERROR)
    assert err == {"code": ErrorCode.JOURNAL_UNAVAILABLE, "message": "disk full", "req": 9}
    assert s.to(b"c2", MsgKind.SUBMITTED) == []
    assert s.to(b"w", MsgKind.CANCEL_TASKS) == [{"tasks": [{"id": ids[0], "attempt": 1}]}]
    assert s.to(b"w", MsgKind.ACK) == []  # the result is not acknowledged: the worker keeps it
    s.submit(1)  # a new turn's submit; flush() here stands for a commit that succeeds
    assert s.to(b"w", MsgKind.ACK) == [{"tasks": [{"id": old, "attempt": 1}]}]
    assert not s.core.hold_dispatch


def test_a_round_while_the_master_is_behind_replaces_only_what_came_back() -> None:
    """A tick told the master is behind with the workers' messages sends as many tasks as
    left the workers since the round before (the tasks at workers stay as many), while a
    tick that is not behind fills the worker's whole credit."""
    s = Sim()
    s.hello(b"w", cpu=2)
    ids = s.submit(1500) + s.submit(1500)
    s.step()
    for tid, attempt in s.dispatched(b"w"):  # two, on the slots: run times unknown yet
        s.result(b"w", tid, attempt, duration_ms=0.01)
    s.step()  # tiny tasks: the worker's prefetch opens, a whole round goes out
    out = s.dispatched(b"w")
    assert len(out) == 2 + 1000
    for tid, attempt in out[2:302]:
        s.result(b"w", tid, attempt, duration_ms=0.01)
    credit = s.core.registry.workers[b"w"].free(Kind.CPU, s.settings.prefetch)
    assert credit == 302
    s.now += 0.01
    s.core.tick(s.now, s.wall, behind=True)
    s.flush()
    assert len(s.dispatched(b"w")) == 1002 + 300  # what came back, not the credit
    s.step(0.01)
    assert len(s.dispatched(b"w")) == 1002 + 302  # not behind: the rest of the credit
    assert s.state(ids[-1]) == "PENDING"


def test_an_attempt_that_ends_unfinished_is_kept_with_wall_clock_times() -> None:
    """A failed attempt retried is staged as an attempt row whose start and end are wall-clock
    times (the monotonic time of its dispatch moved by the last event's clock offset)."""
    s = Sim()
    rows: list[tuple[Any, ...]] = []
    s.journal.stage_attempt = lambda *a: rows.append(a)  # type: ignore[attr-defined]
    s.hello(b"wa")
    (tid,) = s.submit(retries=1)
    s.step()
    assert s.dispatched(b"wa") == [(tid, 1)]
    dispatched_wall = s.wall
    s.now += 2.5
    s.wall += 2.5
    s.result(b"wa", tid, 1, state="FAILED", error={"type": "E", "message": "m", "traceback": ""})
    assert len(rows) == 1
    task_id, attempt, worker_id, started, ended, _outcome = rows[0]
    assert (task_id, attempt, worker_id) == (tid, 1, "wa")
    assert started == pytest.approx(dispatched_wall) and ended == pytest.approx(dispatched_wall + 2.5)


def test_a_heartbeat_makes_a_worker_a_dispatch_candidate_only_when_its_held_slots_change() -> None:
    """A round that left a worker no credit leaves it out of the next rounds (``wants``) until
    something changes for it: a heartbeat saying the same held slots is not such a change (a
    thousand workers heartbeating each second would make every round look at all of them); one
    saying different held slots is."""
    s = Sim()
    s.hello(b"wa", cpu=2)
    s.submit(3)
    s.step()
    info = s.core.registry.workers[b"wa"]
    assert len(s.dispatched(b"wa")) == 2 and info.wants is False  # no credit left
    s.worker(b"wa", MsgKind.HEARTBEAT, {"held": {}})
    assert info.wants is False
    s.worker(b"wa", MsgKind.HEARTBEAT, {"held": {"cpu": 1}})
    assert info.wants is True and info.held == {Kind.CPU: 1}


def test_a_bigger_fleet_is_told_a_longer_heartbeat_interval_and_expires_by_it() -> None:
    """At most max_heartbeats_per_s heartbeats a second from the whole fleet: the WELCOME of
    the worker that makes the fleet too big for the configured interval tells a whole multiple
    of it; the master's next HEARTBEAT tells the others, and each is expired by what it was
    told, not by the configured interval."""
    s = Sim(max_heartbeats_per_s=2.0)
    s.hello(b"wa")
    s.hello(b"wb")
    assert [b["heartbeat_interval_s"] for b in s.to(b"wa", MsgKind.WELCOME)] == [HB]
    assert [b["heartbeat_interval_s"] for b in s.to(b"wb", MsgKind.WELCOME)] == [HB]
    s.hello(b"wc")  # three workers, two beats a second: every 2 s
    assert [b["heartbeat_interval_s"] for b in s.to(b"wc", MsgKind.WELCOME)] == [2 * HB]
    s.step(0.5)  # not an interval yet since the WELCOME: nothing to say
    assert s.to(b"wa", MsgKind.HEARTBEAT) == []
    s.step(HB)  # wa and wb were told 1 s: they hear the new interval at their next beat
    assert [b["heartbeat_interval_s"] for b in s.to(b"wa", MsgKind.HEARTBEAT)] == [2 * HB]
    assert [b["heartbeat_interval_s"] for b in s.to(b"wb", MsgKind.HEARTBEAT)] == [2 * HB]
    assert s.to(b"wc", MsgKind.HEARTBEAT) == []  # told 2 s at its WELCOME, 1.5 s ago
    # silent since their WELCOME: 3 configured intervals pass, not 3 of theirs
    s.step(3 * HB - 1.5 + 0.1)
    assert set(s.core.registry.workers) == {b"wa", b"wb", b"wc"}
    for ident in (b"wa", b"wb"):
        s.worker(ident, MsgKind.HEARTBEAT, {"held": {}})
    s.step(3 * 2 * HB - 3 * HB + 0.1)  # wc: 6.1 s of silence, more than 3 x 2 s
    assert set(s.core.registry.workers) == {b"wa", b"wb"}
