"""The master core's worker events: hello, heartbeat, started, results, return, drain, bye."""

from __future__ import annotations

from typing import Any

import structlog

from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import PROTOCOL_VERSION, ErrorCode, MsgKind, Role, TaskState
from poolfleet.master import worker_api
from poolfleet.master.core_base import TWIN_ALIVE_INTERVALS, UNHELD_AFTER_INTERVALS, CoreState, _err
from poolfleet.master.registry import Offer, WorkerInfo
from poolfleet.master.state import Finish, Requeue, Stale, TaskRecord, on_result

log = structlog.get_logger("pmaster")


class WorkerEvents(CoreState):
    """What a worker tells the master."""

    def worker_hello(self, ident: bytes, hello: worker_api.Hello, now: float, wall: float) -> None:
        if hello.version != PROTOCOL_VERSION:
            msg = f"worker speaks protocol {hello.version}, master speaks {PROTOCOL_VERSION}"
            log.warning("worker_refused", reason=msg)
            self.error(Role.WORKER, ident, ErrorCode.BAD_VERSION, msg)
            return
        other = self.registry.named(hello.worker_id)
        if other is not None and other.identity != ident:
            alive = now - other.last_seen <= TWIN_ALIVE_INTERVALS * self.registry.beat_s(other)
            if alive:
                msg = (
                    f"worker id {hello.worker_id!r} is in use by another live pworker (pid {other.pid} on "
                    f"host {other.host}); give this one (pid {hello.pid} on {hello.host}) its own --worker-id"
                )
                log.warning(
                    "worker_id_clash",
                    worker_id=hello.worker_id,
                    pid=hello.pid,
                    host=hello.host,
                    registered_pid=other.pid,
                    registered_host=other.host,
                )
                self.error(Role.WORKER, ident, ErrorCode.DUPLICATE_WORKER, msg)
                return
            self._gone(other, now, wall, "replaced by a new process with the same worker id")
        info = WorkerInfo(
            identity=ident,
            worker_id=hello.worker_id,
            host=hello.host,
            pid=hello.pid,
            queues=hello.queues,
            slots=hello.slots,
            connected_at=now,
            last_seen=now,
            offers=hello.offers,
            session=hello.session,
            allow_cmd=hello.allow_cmd,
            allow_cmd_env=hello.allow_cmd_env,
            python=hello.python,
            cloudpickle=hello.cloudpickle,
        )
        held = dict(hello.holding)
        old = self.registry.get(ident)
        if old is not None:
            # the same process again (a reconnect): what it no longer holds never reached it
            # or was lost on the way; it goes back to the queue without counting against it
            self._unoffer(old)
            info.mean_ms = dict(old.mean_ms)
            for tid in list(old.inflight):
                rec = self.tasks[tid]
                if held.get(tid) != rec.attempt:
                    self._requeue_unheld(rec, now, "worker reconnected without it")
        self.registry.add(info)
        self._offer(info, wall)
        stale: list[dict[str, Any]] = []
        adopted = 0
        for tid, attempt in hello.holding:
            claimed = self.tasks.get(tid)
            if self._claim(claimed, info, attempt, now):
                adopted += 1
                if claimed is not None and claimed.cancel:
                    stale.append({"id": tid, "attempt": attempt})
            else:
                stale.append({"id": tid, "attempt": attempt})
        self._send(
            Role.WORKER,
            ident,
            MsgKind.WELCOME,
            {
                "version": PROTOCOL_VERSION,
                "master_id": self.master_id,
                "heartbeat_interval_s": self.registry.tell(info),
                "liveness": self.settings.liveness,
            },
        )
        info.last_sent = now
        if stale:
            self._send(Role.WORKER, ident, MsgKind.CANCEL_TASKS, {"tasks": stale})
        log.info(
            "worker_registered",
            worker_id=info.worker_id,
            host=info.host,
            pid=info.pid,
            session=info.session,
            queues=list(info.queues),
            slots={k.value: n for k, n in info.slots.items()},
            offers=None if info.offers is None else len(info.offers),
            adopted=adopted,
            reconnected=old is not None,
        )

    def _claim(self, rec: TaskRecord | None, info: WorkerInfo, attempt: int, now: float) -> bool:
        """A worker reports holding ``rec`` at ``attempt``: make it that worker's, if it may be."""
        if rec is None:
            return False
        if rec.state.at_worker and rec.attempt == attempt and rec.worker in (None, info.identity):
            self.orphans.pop(rec.id, None)
            if rec.id not in info.inflight:  # an orphan, or held since before this reconnect
                rec.dispatched_at = now
                self._assign(rec, info)
            return True
        if self._unrecorded_dispatch(rec, attempt, now):
            self.journal.stage_start(rec.id, attempt)
            self._assign(rec, info)
            return True
        return False

    def _unrecorded_dispatch(self, rec: TaskRecord, attempt: int, now: float) -> bool:
        """A worker holds (or finished) ``rec`` at an attempt the journal never recorded: it was
        sent just before an unclean stop, whose commit never came. It is that dispatch again."""
        if rec.state is not TaskState.PENDING or attempt <= rec.attempt:
            return False
        self.scheduler.discard(rec)
        rec.state = TaskState.DISPATCHED
        rec.attempt = attempt
        rec.dispatched_at = now
        return True

    def _offer(self, info: WorkerInfo, wall: float) -> None:
        if info.offers is None:
            return
        for name, offer in info.offers.items():
            idents = self.offered.setdefault(name, {})
            if info.identity in idents:
                continue  # counted already
            idents[info.identity] = None
            counts = self.offer_variants.setdefault(name, {})
            counts[offer] = counts.get(offer, 0) + 1
            if self.task_defs.get(name) != offer:
                self.task_defs[name] = offer
                self.journal.stage_task_def(name, offer.kind.value, offer.timeout_s, offer.retries)
            # a count per set of defaults: a thousand workers saying HELLO cost a scan of all
            # the others each before
            variants = frozenset(counts)
            if len(variants) > 1 and (name, variants) not in self._conflicts_logged:
                self._conflicts_logged.add((name, variants))
                log.warning("task_defaults_conflict", task_name=name, workers=self._conflict(name))
        self._defs_version += 1

    def worker_message(
        self, ident: bytes, kind: MsgKind, body: dict[str, Any], now: float, wall: float
    ) -> None:
        """Any worker message but HELLO; raises ProtocolError for bad requests."""
        self.last_now, self.last_wall = now, wall
        info = self.registry.seen(ident, now)
        if info is None:
            if kind is MsgKind.TASK_RESULTS:
                # e.g. buffered results right after a master restart: fencing decides
                self._results(ident, None, worker_api.results(body["results"]), now, wall)
            self.error(Role.WORKER, ident, ErrorCode.NOT_REGISTERED, "unknown worker: send HELLO first")
            return
        if kind is MsgKind.HEARTBEAT:
            self._heartbeat(info, body, now)
        elif kind is MsgKind.TASK_RESULTS:
            self._held(info, body)
            self._results(ident, info, worker_api.results(body["results"]), now, wall)
        elif kind is MsgKind.STARTED:
            self._started(info, worker_api.refs("STARTED.tasks", body["tasks"]))
        elif kind is MsgKind.RETURN:
            self._returned(info, worker_api.refs("RETURN.tasks", body["tasks"]), wall)
        elif kind is MsgKind.DRAINING:
            self.registry.draining(info)
            log.info("worker_draining", worker_id=info.worker_id)
        elif kind is MsgKind.BYE:
            self._gone(info, now, wall, "worker said bye")
        elif kind is MsgKind.CODE_FETCH:
            self._send(Role.WORKER, ident, MsgKind.CODE_BLOBS, self.code.fetch(info, body["hashes"]))
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind.name} is not a worker message")

    @staticmethod
    def _held(info: WorkerInfo, body: dict[str, Any]) -> None:
        """The slots the worker says are held (abandoned io threads); a change makes the next
        dispatch round look at it (``wants``). A thousand workers that say the same each second
        do not each become a candidate of every round."""
        held = worker_api.held(body)
        if held is not None and held != info.held:
            info.held = held
            info.wants = True

    def _heartbeat(self, info: WorkerInfo, body: dict[str, Any], now: float) -> None:
        self._held(info, body)
        holding = worker_api.holding(body, "HEARTBEAT.holding")
        if holding is None:
            return
        # reconciliation: a task sent a while ago that the worker does not hold never arrived
        limit = now - UNHELD_AFTER_INTERVALS * self.settings.heartbeat_interval_s
        for tid in list(info.inflight):
            rec = self.tasks[tid]
            if (tid, rec.attempt) not in holding and rec.dispatched_at < limit:
                self._requeue_unheld(rec, now, "its worker does not hold it")

    def _started(self, info: WorkerInfo, refs: list[worker_api.Ref]) -> None:
        notices: dict[bytes, list[dict[str, Any]]] = {}
        for tid, attempt in refs:
            rec = self.tasks.record_of(tid)  # a worker never holds a cold task
            if (
                rec is not None
                and rec.state is TaskState.DISPATCHED
                and rec.worker == info.identity
                and rec.attempt == attempt
            ):
                rec.state = TaskState.RUNNING
                info.start(rec.kind)
                if rec.cancel_unless_started:  # it started first: the task goes on
                    rec.cancel = rec.cancel_unless_started = False
                for client in self.waiters.get(tid, ()):
                    notices.setdefault(client, []).append({"id": tid, "attempt": attempt})
        # RUNNING is not journaled: the notice goes out now, ahead of any result (which waits
        # for a commit)
        for client, tasks in notices.items():
            self._send(Role.CLIENT, client, MsgKind.TASKS_STARTED, {"tasks": tasks})

    def _results(
        self, ident: bytes, info: WorkerInfo | None, entries: list[dict[str, Any]], now: float, wall: float
    ) -> None:
        acks: list[dict[str, Any]] = []
        claimed = 0
        for entry in entries:
            tid, attempt = entry["id"], entry["attempt"]
            acks.append({"id": tid, "attempt": attempt})
            rec = self.tasks.record_of(tid)  # a worker never holds a cold task
            try:
                state = TaskState(entry["state"])
            except ValueError:
                log.warning("result_rejected", worker_id=ident.decode(errors="replace"), reason="bad state")
                continue
            if rec is None or not state.final:
                log.info(
                    "result_dropped",
                    task_id=format_id(tid),
                    worker_id=ident.decode(errors="replace"),
                    reason="unknown or finished task",
                )
                continue
            if info is None and not (rec.state.at_worker and rec.worker is not None):
                # a worker not (yet) registered again: claim what only it can have
                claimed += self._unrecorded_dispatch(rec, attempt, now)
            mine = rec.worker == ident and rec.attempt == attempt
            # the declared retries matter only to a failure (of a task whose client set none)
            offer = self._offer_of(rec, info) if state is TaskState.FAILED and rec.retries is None else None
            duration = entry.get("duration_ms")  # a float: a 64-bit int would overflow SQLite
            duration_ms = None if duration is None else float(duration)
            decision = on_result(
                rec,
                attempt,
                state,
                entry.get("value"),
                entry.get("error"),
                bool(entry.get("lost")),
                self.policy,
                now,
                self.rng,
                None if offer is None else offer.retries,
            )
            if isinstance(decision, Stale):
                log.info(
                    "result_dropped",
                    task_id=format_id(tid),
                    attempt=attempt,
                    worker_id=ident.decode(errors="replace"),
                    reason=decision.reason,
                )
                continue
            if mine:
                self._unassign(rec, duration_ms)
            self.orphans.pop(tid, None)
            if isinstance(decision, Requeue):
                log.info(
                    "task_retried",
                    task_id=format_id(tid),
                    task_name=rec.name,
                    attempt=rec.attempt,
                    delay_s=round(decision.not_before - now, 3),
                    error=(entry.get("error") or {}).get("message"),
                )
                self._requeue(rec, decision, now)
            else:
                worker_id = info.worker_id if info is not None else ident.decode(errors="replace")
                self._finish(rec, decision, worker_id, duration_ms, wall)
        if claimed:
            log.info(
                "results_claimed",
                worker_id=ident.decode(errors="replace"),
                tasks=claimed,
                reason="dispatched before an unclean stop, the start not recorded",
            )
        # the worker keeps each result until this arrives, after the commit that records it
        # (one ACK per worker and commit, however many TASK_RESULTS it sent in the turn)
        self.acks.setdefault(ident, []).extend(acks)

    def _offer_of(self, rec: TaskRecord, info: WorkerInfo | None) -> Offer | None:
        if info is not None and info.offers is not None and rec.name in info.offers:
            return info.offers[rec.name]
        return self.known_offer(rec.name)

    def _returned(self, info: WorkerInfo, refs: list[worker_api.Ref], wall: float) -> None:
        """The worker hands back tasks it never started (a drain, or a recall)."""
        for tid, attempt in refs:
            rec = self.tasks.get(tid)
            if (
                rec is None
                or rec.worker != info.identity
                or rec.attempt != attempt
                or not rec.state.at_worker
            ):
                continue
            self._unassign(rec)
            if rec.cancel:
                self._finish(
                    rec,
                    Finish(TaskState.CANCELLED, error=_err("cancelled before it started")),
                    None,
                    None,
                    wall,
                )
                continue
            rec.state = TaskState.PENDING
            rec.attempt -= 1  # never started: the attempt did not happen
            self.journal.stage_requeue(tid, rec.failures, rec.lost)
            self.scheduler.push_front(rec)
        log.info("tasks_returned", worker_id=info.worker_id, count=len(refs))
