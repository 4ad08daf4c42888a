"""The master core: every task and worker transition, routing and credits (pure logic).

Events come in as method calls: a client's submit, result fetch or cancel; a
worker's hello, heartbeat, started notice, results, return, drain or bye; a
timer tick. Instructions go out: messages in ``out`` (send now) and
``after_commit`` (send once the journal commit that follows has succeeded), and
journal writes staged on the :class:`JournalPort`. The core has no sockets, no
database and no clock of its own: the shell (server.py) passes the monotonic
``now`` (liveness, backoff, pacing) and the wall-clock ``wall`` (timestamps and
result TTLs), so it is deterministic given its inputs.

It owns the task table, the worker registry and the scheduler; nothing else
changes them. A task's state, attempt and worker live on its record; a worker's
``inflight`` index and slot counts change only in ``_assign`` and ``_unassign``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import structlog

from poolfleet.common.ids import format_id
from poolfleet.common.protocol import Kind, MsgKind, Role, TaskState
from poolfleet.master.core_base import (
    RECALL_AFTER_S,
    TWIN_ALIVE_INTERVALS,
    UNHELD_AFTER_INTERVALS,
    CoreState,
    JournalPort,
    Send,
    _err,
    task_route,
)
from poolfleet.master.core_clients import ClientEvents
from poolfleet.master.core_live import LiveEvents
from poolfleet.master.core_schedules import ScheduleEvents
from poolfleet.master.core_workers import WorkerEvents
from poolfleet.master.registry import Offer, WorkerInfo
from poolfleet.master.state import Finish, Requeue, TaskRecord, start
from poolfleet.master.tasktable import ColdBatch

__all__ = [
    "RECALL_AFTER_S",
    "TWIN_ALIVE_INTERVALS",
    "UNHELD_AFTER_INTERVALS",
    "CoreState",
    "JournalPort",
    "MasterCore",
    "Send",
]

log = structlog.get_logger("pmaster")


#: Liveness (expiry and heartbeats due) is checked at most this often: each check looks at
#: every worker, and with a thousand of them a check on every loop turn cost the drain.
LIVENESS_CHECK_S = 0.05


def _row_fault(row: tuple[Any, ...]) -> str | None:
    """Why an open row of the journal cannot be loaded (None: it can)."""
    tid, name, queue, kind, _state, attempt, payload, timeout_s, retries, failures, lost, cat = row
    if kind not in _KINDS:
        return f"unknown kind {kind!r}"
    if not (isinstance(tid, bytes) and len(tid) == 16):
        return "bad id"
    if not (isinstance(name, str) and isinstance(queue, str) and isinstance(payload, bytes)):
        return "bad name, queue or arguments"
    ints = (attempt, failures, lost) + (() if retries is None else (retries,))
    if not all(type(v) is int and v >= 0 for v in ints):
        return "bad attempt, failures, lost or retries"
    if not all(isinstance(v, int | float) for v in (cat, 0 if timeout_s is None else timeout_s)):
        return "bad created_at or timeout_s"
    return None


_KINDS = frozenset(k.value for k in Kind)


def _waits_behind(w: WorkerInfo, kind: Kind) -> bool:
    """Whether a task of ``kind`` sent to ``w`` waits while every slot of that kind has started
    one of the others."""
    started = w.started.get(kind, 0)
    return w.busy.get(kind, 0) > started >= w.slots.get(kind, 0)


class MasterCore(LiveEvents, ScheduleEvents, ClientEvents, WorkerEvents):
    """The task table, the worker registry and the scheduler, and every transition of them:
    client events (core_clients.py), inspection and control (core_queries.py), schedules and
    rate limits (core_schedules.py), worker events
    (core_workers.py), state and task transitions (core_base.py), and here recovery and the
    timers."""

    def recover(
        self,
        rows: Iterable[tuple[Any, ...]],
        task_defs: Iterable[tuple[str, str, float | None, int]],
        final_counts: dict[str, int],
        now: float,
        hold_pending: bool,
        wall: float = 0.0,
        deps: Iterable[tuple[bytes, bytes, int]] = (),
    ) -> tuple[int, int]:
        """Load the open tasks of the journal; return (pending, at a worker).

        Tasks the journal shows at a worker wait ``grace_s`` for a worker to claim them. After
        an unclean stop (``hold_pending``) pending tasks wait as long too: a DISPATCH is sent
        before the commit that records it, so a worker may hold (or have finished) a task the
        journal still shows pending; its HELLO claims it before anyone else gets it.
        """
        for name, kind, timeout_s, retries in task_defs:
            self.task_defs[name] = Offer(Kind(kind), timeout_s, retries)
        self.final_counts = dict(final_counts)
        grace_end = now + self.settings.grace_s
        pending = out = 0
        self.invalid_rows = []
        waiting: dict[bytes, float | None] = {}
        batches: dict[tuple[Any, ...], ColdBatch] = {}
        for row in rows:
            tid, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, cat = row[
                :12
            ]
            due = row[12] if len(row) > 12 else None
            fault = _row_fault(row[:12])
            if fault is not None:
                self.invalid_rows.append((tid, fault))  # reported by the shell, left in the journal
                continue
            if state == TaskState.PENDING and not (hold_pending or attempt or failures or lost):
                # never started: kept cold, like a fresh submit (one batch per submit and lane)
                prio = row[13] if len(row) > 13 else 0
                route = task_route(name, payload)
                bkey = (name, queue, kind, route, prio, timeout_s, retries, cat)
                batch = batches.get(bkey)
                if batch is None:
                    batch = batches[bkey] = self.tasks.batch(
                        sys.intern(name),
                        sys.intern(queue),
                        Kind(kind),
                        route,
                        prio,
                        timeout_s,
                        retries,
                        cat,
                        self.scheduler.new_seq(),
                    )
                self.tasks.put_cold(tid, payload, batch)
                self.scheduler.push_cold(tid, batch)
                pending += 1
                continue
            rec = TaskRecord(
                id=tid,
                name=sys.intern(name),
                queue=sys.intern(queue),
                kind=Kind(kind),
                payload=payload,
                timeout_s=timeout_s,
                retries=retries,
                created_at=cat,
                route=task_route(name, payload),
                attempt=attempt,
                failures=failures,
                lost=lost,
                priority=row[13] if len(row) > 13 else 0,
            )
            self.tasks[tid] = rec
            if state == TaskState.WAITING:
                rec.state = TaskState.WAITING
                waiting[tid] = due
            elif state == TaskState.DELAYED and due is not None and due > wall:
                self._delay(rec, due)
            elif state not in (TaskState.PENDING, TaskState.DELAYED):
                rec.state = TaskState.DISPATCHED  # at some worker, if any still holds it
                self.orphans[tid] = rec
                out += 1
            else:
                if hold_pending:
                    rec.not_before = grace_end
                self.scheduler.push(rec, now)
                pending += 1
        self.recover_holds(waiting, deps, wall)
        if self.orphans or (hold_pending and pending):
            self.recovery_deadline = grace_end
        return pending, out

    def tick(self, now: float, wall: float, behind: bool = False) -> None:
        """Liveness, heartbeats, the end of recovery, delayed tasks due, a dispatch round,
        rebalancing and the schedules' due ticks (after the dispatch round: their tasks go out in
        the next turn, after the commit that records them). ``behind``: messages of the workers
        wait to be read (a smaller dispatch round, see Scheduler.assign)."""
        self.last_now, self.last_wall = now, wall
        if self.delayed:
            self.release_due(wall)
        if now - self._last_liveness >= LIVENESS_CHECK_S:  # each looks at every worker
            self._last_liveness = now
            self._liveness(now, wall)
        if self.recovery_deadline and now >= self.recovery_deadline:
            self.recovery_deadline = 0.0
            for rec in list(self.orphans.values()):
                if rec.cancel:
                    self._finish(
                        rec,
                        Finish(TaskState.CANCELLED, error=_err("cancelled while its worker was away")),
                        None,
                        None,
                        wall,
                    )
                else:
                    log.info(
                        "task_requeued",
                        task_id=format_id(rec.id),
                        task_name=rec.name,
                        reason="no worker reported it after restart",
                    )
                    self._requeue(rec, Requeue(now), now)
            self.orphans.clear()
        self.dispatch(now, behind)
        self._rebalance(now)
        self.fire_due(now, wall)

    def _liveness(self, now: float, wall: float) -> None:
        """Workers silent too long are gone; those the master has not written to get a heartbeat."""
        for info in self.registry.expired(now):
            log.warning(
                "worker_expired",
                worker_id=info.worker_id,
                host=info.host,
                silent_s=round(now - info.last_seen, 3),
                tasks=len(info.inflight),
            )
            self._gone(info, now, wall, "missed heartbeats")
        for info in self.registry.due_heartbeat(now):
            self._send(
                Role.WORKER,
                info.identity,
                MsgKind.HEARTBEAT,
                {"master_id": self.master_id, "heartbeat_interval_s": self.registry.tell(info)},
            )
            info.last_sent = now

    def next_timer_s(self, now: float) -> float:
        wait = self.settings.heartbeat_interval_s / 2
        due = self.scheduler.next_due_s(now)
        if due is not None:
            wait = min(wait, due)
        if self.recovery_deadline:
            wait = min(wait, max(0.0, self.recovery_deadline - now))
        due_s = self.next_due_s()
        if due_s is not None:
            wait = min(wait, due_s)
        tick = self.schedule_wait_s(now)
        if tick is not None:
            wait = min(wait, tick)
        return wait

    def dispatch(self, now: float, behind: bool = False) -> None:
        if not self.registry.workers or self.hold_dispatch:
            return
        plan = self.scheduler.assign(self.registry.workers.values(), now, behind, self.registry.version)
        held = self.deps_held
        for ident, recs in plan.items():
            info = self.registry.workers[ident]
            batch = []
            for rec in recs:
                attempt = start(rec, ident, now)
                self._assign(rec, info)
                self.journal.stage_start(rec.id, attempt)
                if held and rec.id in held:  # started: the results it needed may expire now
                    held.discard(rec.id)
                    self.journal.stage_deps_done(rec.id)
                entry: dict[str, Any] = {
                    "id": rec.id,
                    "attempt": attempt,
                    "name": rec.name,
                    "kind": rec.kind.value,
                    "payload": rec.payload,
                }
                timeout_s = rec.timeout_s
                if timeout_s is None and info.offers is not None:
                    offer = info.offers.get(rec.name)
                    timeout_s = None if offer is None else offer.timeout_s
                if timeout_s:
                    entry["timeout_s"] = timeout_s
                batch.append(entry)
            # Sent now, before this turn's commit: a worker needs no durable record to start,
            # and the commit (with the start folded into it) follows within this turn. Should
            # the master die in between, the task was never acknowledged (the client resends
            # it) or its start is not recorded (the worker's HELLO claims it after the restart,
            # see recover): at least once, as promised.
            self._send(Role.WORKER, ident, MsgKind.DISPATCH, {"tasks": batch})
            info.last_sent = now

    def _rebalance(self, now: float) -> None:
        """Unstarted tasks held by a worker whose slots are all busy go to an idle worker: the
        master asks for them back (RECALL); the worker returns those it has not started."""
        if now - self._last_rebalance < RECALL_AFTER_S:
            return
        self._last_rebalance = now
        counts = self.registry.counts
        # every task at a worker has started, or none has (a task waits behind started ones
        # only where every slot of its kind has started one): no worker to look at
        if counts.at_workers <= counts.running or not counts.running:
            return
        workers = self.registry.workers.values()
        # those where a task waits behind started ones (a slot of its own free: it starts there)
        holders = [v for v in workers if any(_waits_behind(v, k) for k in v.slots)]
        if not holders:
            return
        idle = {
            (w.identity, k): w.idle(k) for w in workers if not w.draining for k in w.slots if w.idle(k) > 0
        }
        if not idle:
            return
        for v in holders:
            refs: list[dict[str, Any]] = []
            for kind in v.slots:
                if not _waits_behind(v, kind):
                    continue
                for tid, k in v.inflight.items():
                    if k is not kind:
                        continue
                    rec = self.tasks[tid]
                    if (
                        rec.state is not TaskState.DISPATCHED
                        or rec.recalled
                        or now - rec.dispatched_at < RECALL_AFTER_S
                    ):
                        continue
                    taker = self._idle_taker(rec, v, idle)
                    if taker is None:
                        continue
                    idle[taker] -= 1
                    rec.recalled = True
                    refs.append({"id": tid, "attempt": rec.attempt})
            if refs:
                log.info("tasks_recalled", worker_id=v.worker_id, count=len(refs))
                self._send(Role.WORKER, v.identity, MsgKind.RECALL, {"tasks": refs})

    def _idle_taker(
        self, rec: TaskRecord, holder: WorkerInfo, idle: dict[tuple[bytes, Kind], int]
    ) -> tuple[bytes, Kind] | None:
        for (ident, kind), n in idle.items():
            if n <= 0 or kind is not rec.kind or ident == holder.identity:
                continue
            w = self.registry.workers[ident]
            if rec.queue in w.queues and w.offers_name(rec.name):
                return (ident, kind)
        return None
