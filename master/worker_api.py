"""Messages on the workers socket: registration, heartbeats, results, drain and bye."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import structlog

from poolfleet.common import messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import PROTOCOL_VERSION, ErrorCode, Kind, MsgKind, Role, TaskState
from poolfleet.master.client_api import MAX_RETRIES
from poolfleet.master.registry import WorkerInfo
from poolfleet.master.state import Requeue, Stale, on_result

if TYPE_CHECKING:
    from poolfleet.master.server import Master

log = structlog.get_logger("pmaster")


class WorkerApi:
    """Handles worker messages for a :class:`Master`."""

    def __init__(self, master: Master) -> None:
        self.m = master

    def handle(self, ident: bytes, kind: MsgKind, body: dict[str, Any], now: float) -> None:
        """Apply one decoded message from a worker; raises ProtocolError for bad requests."""
        if kind is MsgKind.HELLO:
            self.hello(ident, body, now)
            return
        info = self.m.registry.seen(ident, now)
        if info is None:
            if kind is MsgKind.TASK_RESULTS:
                # e.g. buffered results right after a master restart: fencing decides
                ghost = WorkerInfo(ident, ident.decode(errors="replace"), "?", 0, (), {}, now, now)
                self.results(ghost, body, now)
            self.m.reply_error(
                self.m.worker_sock, ident, ErrorCode.NOT_REGISTERED, "unknown worker: send HELLO first"
            )
            return
        if kind is MsgKind.HEARTBEAT:
            self.set_held(info, body)
        elif kind is MsgKind.TASK_RESULTS:
            self.set_held(info, body)
            self.results(info, body, now)
        elif kind is MsgKind.RETURN:
            self.returned(info, body, now)
        elif kind is MsgKind.DRAINING:
            info.draining = True
            log.info("worker_draining", worker_id=info.worker_id)
        elif kind is MsgKind.BYE:
            self.gone(info, now, "worker said bye")
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind.name} is not a worker message")

    def hello(self, ident: bytes, body: dict[str, Any], now: float) -> None:
        if body["version"] != PROTOCOL_VERSION:
            msg = f"worker speaks protocol {body['version']}, master speaks {PROTOCOL_VERSION}"
            log.warning("worker_refused", reason=msg)
            self.m.reply_error(self.m.worker_sock, ident, ErrorCode.BAD_VERSION, msg)
            return
        if body["role"] != Role.WORKER:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "HELLO on the worker socket must have role 'worker'")
        slots: dict[Kind, int] = {}
        for k, n in (body.get("slots") or {}).items():
            if k not in Kind.__members__.values() or not isinstance(n, int) or n < 0:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"HELLO: bad slots entry {k!r}")
            slots[Kind(k)] = n
        queues = tuple(q for q in (body.get("queues") or ["default"]) if isinstance(q, str))
        info = WorkerInfo(
            identity=ident,
            worker_id=str(body.get("worker_id") or ident.hex()),
            host=str(body.get("host") or "?"),
            pid=int(body.get("pid") or 0),
            queues=queues,
            slots=slots,
            connected_at=now,
            last_seen=now,
        )
        self.learn_task_defs(body.get("tasks") or {})
        holding = messages.check_entries("HELLO.holding", body.get("holding") or [], messages.TASK_REF)
        held_ids = {h["id"]: h["attempt"] for h in holding}
        old = self.m.registry.add(info)
        if old is not None:
            # Reconnected under the same identity: whatever it no longer holds is lost.
            for tid in list(old.inflight):
                rec = self.m.tasks.get(tid)
                if rec is not None and held_ids.get(tid) == rec.attempt:
                    continue
                if rec is not None:
                    self.m._lost(rec, now, "worker reconnected without it")
        stale: list[dict[str, Any]] = []
        for tid, attempt in held_ids.items():
            rec = self.m.tasks.get(tid)
            if rec is not None and rec.state is TaskState.RUNNING and rec.attempt == attempt:
                rec.worker = ident
                self.m.orphans.pop(tid, None)
                info.add(tid, rec.kind)
                if rec.cancel:
                    stale.append({"id": tid, "attempt": attempt})
            else:
                stale.append({"id": tid, "attempt": attempt})
        self.m._send(
            self.m.worker_sock,
            ident,
            MsgKind.WELCOME,
            {
                "version": PROTOCOL_VERSION,
                "master_id": self.m.master_id,
                "heartbeat_interval_s": self.m.settings.heartbeat_interval_s,
                "liveness": self.m.settings.liveness,
            },
        )
        info.last_sent = now
        if stale:
            self.m._send(self.m.worker_sock, ident, MsgKind.CANCEL_TASKS, {"tasks": stale})
        log.info(
            "worker_registered",
            worker_id=info.worker_id,
            host=info.host,
            pid=info.pid,
            queues=list(queues),
            slots={k.value: n for k, n in slots.items()},
            adopted=len(held_ids) - len(stale),
            reconnected=old is not None,
        )

    def learn_task_defs(self, defs: dict[str, Any]) -> None:
        for name, spec in defs.items():
            if not isinstance(name, str) or not isinstance(spec, dict):
                continue
            try:
                kind = Kind(spec.get("kind", "cpu"))
            except ValueError:
                continue
            timeout = spec.get("timeout_s")
            timeout_s = (
                float(timeout) if isinstance(timeout, int | float) and 0 < timeout < math.inf else None
            )
            retries = spec.get("retries", 0)
            retries = retries if isinstance(retries, int) and 0 <= retries <= MAX_RETRIES else 0
            entry = (kind, timeout_s, retries)
            if self.m.task_defs.get(name) != entry:
                self.m.task_defs[name] = entry
                self.m.journal.stage_task_def(name, kind.value, timeout_s, retries)

    @staticmethod
    def set_held(info: WorkerInfo, body: dict[str, Any]) -> None:
        held = body.get("held")
        if isinstance(held, dict):
            info.held = {
                Kind(k): n
                for k, n in held.items()
                if k in Kind.__members__.values() and isinstance(n, int) and n >= 0
            }

    def results(self, info: WorkerInfo, body: dict[str, Any], now: float) -> None:
        for entry in messages.check_entries("TASK_RESULTS.results", body["results"], messages.TASK_RESULT):
            tid = entry["id"]
            rec = self.m.tasks.get(tid)
            # a late result of an older attempt must not free the slot of the current one
            if rec is None or rec.worker != info.identity or rec.attempt == entry["attempt"]:
                info.remove(tid, entry.get("duration_ms"))
            try:
                state = TaskState(entry["state"])
            except ValueError:
                log.warning("result_rejected", worker_id=info.worker_id, reason="bad state")
                continue
            if rec is None or not state.final:
                log.info(
                    "result_dropped",
                    task_id=format_id(tid),
                    worker_id=info.worker_id,
                    reason="unknown or finished task",
                )
                continue
            decision = on_result(
                rec,
                entry["attempt"],
                state,
                entry.get("value"),
                entry.get("error"),
                bool(entry.get("lost")),
                self.m.policy,
                now,
                self.m.rng,
            )
            if isinstance(decision, Stale):
                log.info(
                    "result_dropped",
                    task_id=format_id(tid),
                    attempt=entry["attempt"],
                    worker_id=info.worker_id,
                    reason=decision.reason,
                )
                continue
            self.m.orphans.pop(tid, None)
            if isinstance(decision, Requeue):
                log.info(
                    "task_retried",
                    task_id=format_id(tid),
                    task_name=rec.name,
                    attempt=rec.attempt,
                    delay_s=round(decision.not_before - now, 3),
                    error=(entry.get("error") or {}).get("message"),
                )
                self.m._requeue(rec, decision, now)
            else:
                duration = entry.get("duration_ms")  # a float: a 64-bit int would overflow SQLite
                self.m.finish(
                    rec, decision, info.worker_id, None if duration is None else float(duration), now
                )

    def returned(self, info: WorkerInfo, body: dict[str, Any], now: float) -> None:
        for ref in messages.check_entries("RETURN.tasks", body["tasks"], messages.TASK_REF):
            tid = ref["id"]
            info.remove(tid)
            rec = self.m.tasks.get(tid)
            if rec is None or rec.state is not TaskState.RUNNING or rec.attempt != ref["attempt"]:
                continue
            rec.state = TaskState.PENDING
            rec.worker = None
            rec.attempt -= 1  # never started: the attempt did not happen
            self.m.journal.stage_requeue(tid, rec.failures, rec.lost)
            self.m.scheduler.push_front(rec)
        log.info("tasks_returned", worker_id=info.worker_id, count=len(body["tasks"]))

    def gone(self, info: WorkerInfo, now: float, reason: str) -> None:
        self.m.registry.remove(info.identity)
        for tid in list(info.inflight):
            rec = self.m.tasks.get(tid)
            if rec is not None and rec.worker == info.identity:
                self.m._lost(rec, now, reason)
        log.info("worker_removed", worker_id=info.worker_id, reason=reason, requeued=len(info.inflight))
