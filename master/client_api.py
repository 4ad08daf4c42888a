"""Requests on the clients socket: submit, results, cancel, status, workers."""

from __future__ import annotations

import math
import re
import sys
from typing import TYPE_CHECKING, Any

import structlog

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import (
    CMD_TASK_NAME,
    PROTOCOL_VERSION,
    ErrorCode,
    Kind,
    MsgKind,
    TaskState,
)
from poolfleet.master.state import Finish, TaskRecord

if TYPE_CHECKING:
    from poolfleet.master.server import Master

log = structlog.get_logger("pmaster")

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
MAX_RETRIES = 100
#: Tasks in one SUBMIT message. The master handles a message in one piece (15-20 us a task on
#: a busy two-core host), and every other peer waits behind it: 2,000 keeps that under ~40 ms.
MAX_SUBMIT_TASKS = 2000


class ClientApi:
    """Handles client messages for a :class:`Master`; results reach waiters through it."""

    def __init__(self, master: Master) -> None:
        self.m = master
        self.waiters: dict[bytes, set[bytes]] = {}
        # Ids of the tasks each client connection submitted that may still be open; finished
        # ones are pruned lazily (see _pending_of), so the common path costs nothing.
        self.owned: dict[bytes, set[bytes]] = {}
        self._owned_total = 0
        # Checked task options, by everything the check depends on: the tasks of a batch
        # mostly share name and options, so most entries skip the regexes and enum lookups.
        self._checked: dict[tuple[Any, ...], tuple[Kind, str, float | None, int]] = {}

    def handle(self, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        if kind is MsgKind.HELLO:
            self._hello(ident, body)
        elif kind is MsgKind.HEARTBEAT:
            self.m._send(self.m.client_sock, ident, MsgKind.HEARTBEAT, {"master_id": self.m.master_id})
        elif kind is MsgKind.SUBMIT:
            self._submit(ident, body)
        elif kind is MsgKind.RESULT_GET:
            self._result_get(ident, body)
        elif kind is MsgKind.CANCEL:
            self._cancel(ident, body)
        elif kind is MsgKind.STATUS:
            self.m._send(self.m.client_sock, ident, MsgKind.STATUS_REPLY, self.status(body["req"]))
        elif kind is MsgKind.WORKERS:
            now = self.m.clock()
            workers = [w.describe(now) for w in self.m.registry.workers.values()]
            self.m._send(
                self.m.client_sock, ident, MsgKind.WORKERS_REPLY, {"req": body["req"], "workers": workers}
            )
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind.name} is not a client request")

    def _hello(self, ident: bytes, body: dict[str, Any]) -> None:
        if body["version"] != PROTOCOL_VERSION:
            msg = f"client speaks protocol {body['version']}, master speaks {PROTOCOL_VERSION}"
            log.warning("client_refused", reason=msg)
            self.m.reply_error(self.m.client_sock, ident, ErrorCode.BAD_VERSION, msg)
            return
        self.m._send(
            self.m.client_sock,
            ident,
            MsgKind.WELCOME,
            {"version": PROTOCOL_VERSION, "master_id": self.m.master_id},
        )

    # -- submit ----------------------------------------------------------------
    def _validate(self, entry: dict[str, Any]) -> tuple[Kind, str, float | None, int]:
        """Fill in the task's defaults; raise ProtocolError naming what is wrong."""
        if len(entry["id"]) != 16:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "task id must be 16 bytes")
        name = entry["name"]
        key = (
            name,
            entry.get("kind"),
            entry.get("queue"),
            entry.get("timeout_s"),
            entry.get("retries"),
            self.m.task_defs.get(name),
            not self.m.task_defs,
        )
        hit = self._checked.get(key)
        if hit is not None:
            return hit
        out = self._check_options(entry)
        if len(self._checked) >= 4096:  # bounded: a client may send any number of names
            self._checked.clear()
        self._checked[key] = out
        return out

    def _check_options(self, entry: dict[str, Any]) -> tuple[Kind, str, float | None, int]:
        name = entry["name"]
        if not TASK_NAME.match(name):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"task name {name!r} must look like module:function")
        known = self.m.task_defs.get(name)
        if name == CMD_TASK_NAME:
            known = (Kind.CMD, None, 0)
        if known is None and self.m.task_defs:
            modules = sorted({n.split(":")[0] for n in self.m.task_defs})
            raise ProtocolError(
                ErrorCode.UNKNOWN_TASK,
                f"unknown task {name!r}: no worker offers it (workers load modules: "
                f"{', '.join(modules[:10])}); start a worker with --tasks {name.split(':')[0]}",
            )
        kind_text = entry.get("kind") or (known[0].value if known else Kind.CPU.value)
        try:
            kind = Kind(kind_text)
        except ValueError:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND, f"unknown kind {kind_text!r}: use cpu, io or cmd"
            ) from None
        if (kind is Kind.CMD) != (name == CMD_TASK_NAME):
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND, f"kind cmd is only for {CMD_TASK_NAME}, not for {name!r}"
            )
        queue = entry.get("queue") or "default"
        if not QUEUE_NAME.match(queue):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad queue name {queue!r}")
        timeout_s = entry.get("timeout_s")
        if timeout_s is None and known:
            timeout_s = known[1]
        if timeout_s is not None:
            timeout_s = float(timeout_s)  # the journal stores a REAL, never a 64-bit overflow
            if not (math.isfinite(timeout_s) and timeout_s > 0):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "timeout_s must be a positive, finite number")
        retries = entry.get("retries")
        if retries is None:
            retries = known[2] if known else 0
        if not 0 <= retries <= MAX_RETRIES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"retries must be between 0 and {MAX_RETRIES}")
        return kind, queue, timeout_s, retries

    def _submit(self, ident: bytes, body: dict[str, Any]) -> None:
        m = self.m
        now = m.clock()
        req = body["req"]
        if len(body["tasks"]) > MAX_SUBMIT_TASKS:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"SUBMIT carries {len(body['tasks'])} tasks, more than {MAX_SUBMIT_TASKS} in one message; "
                "split the batch (nothing of this one was submitted)",
            )
        wait = bool(body.get("wait"))
        accepted: list[bytes] = []
        rejected: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        for i, raw in enumerate(body["tasks"]):
            try:
                entries.append(messages.check_at("SUBMIT.tasks", i, raw, messages.SUBMIT_TASK))
            except ProtocolError as exc:
                tid = raw.get("id") if isinstance(raw, dict) else None
                rejected.append(
                    {"id": tid if isinstance(tid, bytes) else b"", "code": exc.code, "message": exc.message}
                )
        fresh_ids = [e["id"] for e in entries if e["id"] not in m.tasks]
        in_journal = m.journal.existing(fresh_ids) if fresh_ids else set()
        cap = m.settings.max_unacked_per_client
        owned = self.owned.get(ident)
        room = cap - (len(owned) if owned else 0)  # at most the true room: owned >= pending
        if room < len(entries):
            room = cap - self._pending_of(ident)
        for entry in entries:
            tid = entry["id"]
            if tid in m.tasks or tid in in_journal or tid in m.unflushed:
                accepted.append(tid)  # idempotent resubmit: the first one stands
                continue
            try:
                kind, queue, timeout_s, retries = self._validate(entry)
            except ProtocolError as exc:
                rejected.append({"id": tid, "code": exc.code, "message": exc.message})
                continue
            refusal = self._over_limit(queue, kind, room)
            if refusal is not None:
                rejected.append({"id": tid, "code": refusal.code, "message": refusal.message})
                continue
            room -= 1
            self.owned.setdefault(ident, set()).add(tid)
            self._owned_total += 1
            rec = TaskRecord(
                id=tid,
                name=sys.intern(entry["name"]),  # one copy per name, not per pending task
                queue=sys.intern(queue),
                kind=kind,
                payload=entry["payload"],
                timeout_s=timeout_s,
                retries=retries,
                created_at=now,
            )
            m.tasks[tid] = rec
            m.journal.stage_insert(tid, rec.name, queue, kind.value, rec.payload, timeout_s, retries, now)
            m.scheduler.push(rec, now)
            m.submitted_total += 1
            accepted.append(tid)
        if wait:
            self._subscribe(ident, accepted)
        for r in rejected:
            log.info(
                "task_rejected",
                task_id=format_id(r["id"]) if len(r["id"]) == 16 else r["id"].hex(),
                code=r["code"],
                reason=r["message"],
            )
        if self._owned_total > 2 * len(m.tasks) + 10_000:
            for client in list(self.owned):
                self._pending_of(client)
        # acknowledged only after the commit that holds these tasks
        m.later(
            m.client_sock, ident, MsgKind.SUBMITTED, {"req": req, "accepted": accepted, "rejected": rejected}
        )

    def _subscribe(self, ident: bytes, accepted: list[bytes]) -> None:
        """Push results to this client as they land; those already final, right away."""
        m = self.m
        done = [t for t in accepted if t not in m.tasks]
        for tid in accepted:
            if tid in m.tasks:
                self.waiters.setdefault(tid, set()).add(ident)
        for tid in done:
            if tid in m.unflushed:
                m.push_result(ident, m.unflushed[tid])
        for row in m.journal.results([t for t in done if t not in m.unflushed]).values():
            m.push_result(ident, _row_entry(row))

    def _over_limit(self, queue: str, kind: Kind, room: int) -> ProtocolError | None:
        """Backpressure: a full queue, or a client with too many pending tasks."""
        settings = self.m.settings
        if self.m.scheduler.depth.get((queue, kind), 0) >= settings.max_queue_length:
            return ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"queue {queue!r} ({kind.value}) is full: {settings.max_queue_length} tasks pending; "
                "retry later",
            )
        if room <= 0:
            return ProtocolError(
                ErrorCode.TOO_MANY_UNACKED,
                f"this client already has {settings.max_unacked_per_client} tasks pending "
                "(max_unacked_per_client); wait until some start or finish, then submit again",
            )
        return None

    def _pending_of(self, ident: bytes) -> int:
        """How many tasks of this client are PENDING; forgets its tasks that have finished."""
        owned = self.owned.get(ident)
        if not owned:
            return 0
        tasks = self.m.tasks
        live = {t for t in owned if t in tasks}
        self._owned_total -= len(owned) - len(live)
        if live:
            self.owned[ident] = live
        else:
            del self.owned[ident]
        return sum(1 for t in live if tasks[t].state is TaskState.PENDING)

    # -- results ---------------------------------------------------------------
    def _result_get(self, ident: bytes, body: dict[str, Any]) -> None:
        m = self.m
        ids = [i for i in body["ids"] if isinstance(i, bytes) and len(i) == 16]
        if len(ids) != len(body["ids"]):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "RESULT_GET: ids must be 16-byte binaries")
        wait = bool(body.get("wait"))
        results: list[dict[str, Any]] = []
        unknown: list[bytes] = []
        finished = m.journal.results([i for i in ids if i not in m.tasks])
        for tid in ids:
            rec = m.tasks.get(tid)
            if rec is not None:
                results.append(
                    {"id": tid, "state": rec.state.value, "attempt": rec.attempt, "name": rec.name}
                )
                if wait:
                    self.waiters.setdefault(tid, set()).add(ident)
            elif tid in m.unflushed:
                results.append(m.unflushed[tid])
            elif tid in finished:
                results.append(_row_entry(finished[tid]))
            else:
                unknown.append(tid)
        m._send(
            m.client_sock,
            ident,
            MsgKind.RESULTS,
            {"req": body["req"], "results": results, "unknown": unknown},
        )

    def task_finished(
        self, rec: TaskRecord, decision: Finish, worker_id: str | None, duration_ms: float | None
    ) -> dict[str, Any]:
        """Push the final result to waiting clients; return it as a result entry."""
        entry: dict[str, Any] = {
            "id": rec.id,
            "state": decision.state.value,
            "attempt": rec.attempt,
            "name": rec.name,
        }
        if decision.value is not None:
            entry["value"] = decision.value
        if decision.error is not None:
            entry["error"] = decision.error
        if worker_id:
            entry["worker_id"] = worker_id
        if duration_ms is not None:
            entry["duration_ms"] = duration_ms
        for client in self.waiters.pop(rec.id, ()):
            self.m.push_result(client, entry)
        return entry

    # -- cancel ----------------------------------------------------------------
    def _cancel(self, ident: bytes, body: dict[str, Any]) -> None:
        m = self.m
        now = m.clock()
        out: list[dict[str, Any]] = []
        if not all(isinstance(t, bytes) and len(t) == 16 for t in body["ids"]):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "CANCEL: ids must be 16-byte binaries")
        for tid in body["ids"]:
            rec = m.tasks.get(tid)
            if rec is None and tid in m.unflushed:
                out.append({"id": tid, "outcome": "finished", "state": m.unflushed[tid]["state"]})
            elif rec is None:
                row = m.journal.results([tid]).get(tid)
                if row is None:
                    out.append({"id": tid, "outcome": "unknown"})
                else:
                    out.append({"id": tid, "outcome": "finished", "state": row[2]})
            elif rec.state is TaskState.PENDING:
                err = {"type": "Cancelled", "message": "cancelled while pending", "traceback": ""}
                m.finish(rec, Finish(TaskState.CANCELLED, error=err), None, None, now)
                out.append({"id": tid, "outcome": "cancelled", "state": TaskState.CANCELLED.value})
                log.info("task_cancelled", task_id=format_id(tid), task_name=rec.name, state="PENDING")
            else:
                m.send_cancel(rec)
                out.append({"id": tid, "outcome": "cancelling", "state": rec.state.value})
                log.info(
                    "task_cancel_requested", task_id=format_id(tid), task_name=rec.name, attempt=rec.attempt
                )
        m.later(m.client_sock, ident, MsgKind.CANCEL_REPLY, {"req": body["req"], "results": out})

    # -- status ----------------------------------------------------------------
    def status(self, req: int) -> dict[str, Any]:
        m = self.m
        counts = dict(m.final_counts)
        running = sum(len(w.inflight) for w in m.registry.workers.values()) + len(m.orphans)
        counts[TaskState.RUNNING.value] = running
        counts[TaskState.PENDING.value] = len(m.tasks) - running
        queues = [
            {"queue": q, "kind": k.value, "depth": n} for (q, k), n in sorted(m.scheduler.depths().items())
        ]
        return {
            "req": req,
            "master_id": m.master_id,
            "counts": counts,
            "queues": queues,
            "workers": len(m.registry),
            "submitted_total": m.submitted_total,
            "uptime_s": round(m.clock() - m.started_at, 3),
        }


def _row_entry(row: tuple[Any, ...]) -> dict[str, Any]:
    tid, name, state, attempt, value, error, worker_id, duration_ms, _finished = row
    entry: dict[str, Any] = {"id": tid, "state": state, "attempt": attempt, "name": name}
    if value is not None:
        entry["value"] = value
    if error is not None:
        entry["error"] = codec.unpack(error)
    if worker_id:
        entry["worker_id"] = worker_id
    if duration_ms is not None:
        entry["duration_ms"] = duration_ms
    return entry
