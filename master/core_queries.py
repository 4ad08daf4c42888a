"""The master core's inspection and control requests: find tasks (TASKS), resolve id prefixes
(RESOLVE), inspect one task (TASK_SHOW), run final tasks again (TASK_RETRY), pause and resume a
queue (QUEUE_CONTROL); and the per-attempt history they show.

Open tasks come from the task table in memory, finished ones from the journal. A listing is
newest first (ids are time-ordered) and paged by id: each request reads at most
``SCAN_WINDOW`` journal rows, so the loop stays responsive at any journal size; the reply's
``next`` cursor tells the client where to go on.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable
from typing import Any, Protocol, cast

import structlog

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import FINAL_STATES, OPEN_STATES, ErrorCode, MsgKind, Role, TaskState
from poolfleet.master import client_api
from poolfleet.master.core_base import JournalPort, Send
from poolfleet.master.core_clients import ClientEvents
from poolfleet.master.core_workers import WorkerEvents
from poolfleet.master.state import Requeue, TaskRecord

log = structlog.get_logger("pmaster")

#: Journal rows one TASKS request reads at most (a filtered listing may need several requests).
SCAN_WINDOW = 5000
#: Tasks in one TASKS reply at most; the default when a request gives no limit.
MAX_LIST = 1000
DEFAULT_LIST = 50
#: Prefixes in one RESOLVE request, and tasks in one TASK_RETRY request, at most.
MAX_IDS = 1000
HEX = re.compile(r"^[0-9a-f]{1,32}$")

#: Outcome words of earlier attempts, by the reason of the requeue that ended them.
_ATTEMPT_OUTCOMES = {"retry": "FAILED (retried)", "": "not reported by any worker after a master restart"}


def id_floor(since: float) -> bytes:
    """The smallest task id made at or after the Unix time ``since`` (the id's 48-bit ms)."""
    ms = max(0, int(since * 1000))
    return min(ms, (1 << 48) - 1).to_bytes(6, "big") + bytes(10)


def prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """The lowest and highest 16-byte ids that start with these hex digits."""
    return bytes.fromhex(prefix.ljust(32, "0")), bytes.fromhex(prefix.ljust(32, "f"))


def worker_id_of(ident: bytes) -> str:
    """A worker's id from its routing identity (``<worker id>/<session>``)."""
    return ident.rpartition(b"/")[0].decode(errors="replace") or ident.decode(errors="replace")


#: The bytes every task reference starts with (fixext 16 of code REF_EXT); a payload without
#: them holds none.
REF_MARK = bytes((0xD8, codec.REF_EXT))
#: Open states of tasks that are not at a worker.
_NOT_AT_WORKERS = frozenset((TaskState.PENDING, TaskState.WAITING, TaskState.DELAYED))


class Filters:
    """A TASKS request's filters."""

    def __init__(self, body: dict[str, Any]) -> None:
        states = body.get("states") or []
        if not all(isinstance(s, str) and s in TaskState.__members__ for s in states):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"TASKS: states must be among {', '.join(TaskState.__members__)}"
            )
        self.states: frozenset[str] = frozenset(states)
        self.name: str | None = body.get("name")
        self.queue: str | None = body.get("queue")
        self.worker: str | None = body.get("worker")
        since = body.get("since")
        self.floor: bytes | None = None if since is None else id_floor(float(since))
        before = body.get("before")
        if before is not None and len(before) != messages.ID_BYTES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "TASKS: before must be a 16-byte id")
        self.before: bytes | None = before
        limit = body.get("limit")
        self.limit = DEFAULT_LIST if limit is None else limit
        if not 1 <= self.limit <= MAX_LIST:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"TASKS: limit must be between 1 and {MAX_LIST}")

    @property
    def only_state(self) -> bool:
        """No filter but the state: an index scan gives exactly the rows wanted."""
        return self.name is None and self.queue is None and self.worker is None

    def in_range(self, tid: bytes, floor: bytes | None) -> bool:
        return (self.before is None or tid < self.before) and (floor is None or tid >= floor)

    def match(self, name: str, queue: str, state: str, worker_id: str | None) -> bool:
        return (
            (not self.states or state in self.states)
            and (self.name is None or name == self.name)
            and (self.queue is None or queue == self.queue)
            and (self.worker is None or worker_id == self.worker)
        )


class QueryJournal(JournalPort, Protocol):
    """The journal reads and writes of these requests (journal.py)."""

    def stage_attempt(
        self,
        task_id: bytes,
        attempt: int,
        worker_id: str | None,
        started_at: float | None,
        ended_at: float | None,
        outcome: str,
    ) -> None: ...
    def list_window(
        self, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]: ...
    def list_finished(
        self, state: str, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]: ...
    def ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]: ...
    def task_row(self, task_id: bytes) -> tuple[Any, ...] | None: ...
    def attempts_of(self, task_id: bytes) -> list[tuple[Any, ...]]: ...
    def stage_queue_paused(self, queue: str, paused: bool) -> None: ...


class QueryEvents(ClientEvents, WorkerEvents):
    """What an operator asks of the master: find, inspect, retry, pause (first among the
    core's bases: it also keeps the attempts of tasks that leave a worker unfinished)."""

    @property
    def qjournal(self) -> QueryJournal:
        return cast(QueryJournal, self.journal)

    #: (task id, worker identity) of the last task that left a worker, for its attempt row
    _left: tuple[bytes, bytes] | None = None

    @property
    def _wall_offset(self) -> float:
        """The wall clock minus the monotonic one, as of the last event that carried both."""
        return self.last_wall - self.last_now

    # -- keeping the attempts -------------------------------------------------------
    def _unassign(self, rec: TaskRecord, duration_ms: float | None = None) -> None:
        if rec.worker is not None:
            self._left = (rec.id, rec.worker)
        super()._unassign(rec, duration_ms)

    def _requeue(self, rec: TaskRecord, decision: Requeue, now: float) -> None:
        """An attempt ended without finishing the task: keep it in the journal's attempts."""
        stage = getattr(self.journal, "stage_attempt", None)  # a test's journal may keep no history
        if rec.attempt > 0 and stage is not None:
            left = self._left
            ident = left[1] if left is not None and left[0] == rec.id else None
            worker_id = None
            if ident is not None:
                info = self.registry.get(ident)
                worker_id = info.worker_id if info is not None else worker_id_of(ident)
            started = rec.dispatched_at + self._wall_offset if rec.dispatched_at else None
            outcome = _ATTEMPT_OUTCOMES.get(decision.reason, decision.reason)
            stage(rec.id, rec.attempt, worker_id, started, now + self._wall_offset, outcome)
        self._left = None
        super()._requeue(rec, decision, now)

    def status(self, req: int, uptime_s: float) -> dict[str, Any]:
        out: dict[str, Any] = super().status(req, uptime_s)
        out["paused"] = sorted(self.scheduler.paused)
        return out

    # -- TASKS ---------------------------------------------------------------------------
    def tasks_list(self, req: int, body: dict[str, Any]) -> dict[str, Any]:
        f = Filters(body)
        final_states = sorted(f.states & FINAL_STATES) if f.states else None
        finished: list[dict[str, Any]] = []
        floor = f.floor  # the page may only hold ids at or above every unfinished scan
        exhausted = True
        if final_states is None:
            window = f.limit if f.only_state else SCAN_WINDOW  # unfiltered: a page is enough
            rows, done = self.qjournal.list_window(f.before, f.floor, window)
            finished = self._finished_entries(rows, f)
            if not done:
                exhausted = False
                floor = rows[-1][0]
        else:
            window = f.limit if f.only_state else SCAN_WINDOW
            for state in final_states:
                rows, done = self.qjournal.list_finished(state, f.before, f.floor, window)
                finished += self._finished_entries(rows, f)
                if not done:
                    exhausted = False
                    floor = rows[-1][0] if floor is None else max(floor, rows[-1][0])
        finished = [e for e in finished if floor is None or e["id"] >= floor]
        open_states = f.states & OPEN_STATES if f.states else OPEN_STATES
        page = heapq.nlargest(
            f.limit,
            [*finished, *self._open_entries(f, floor, open_states)],
            key=lambda e: e["id"],
        )
        reply: dict[str, Any] = {"req": req, "tasks": page}
        if len(page) == f.limit:
            reply["next"] = page[-1]["id"]
        elif not exhausted and floor is not None:
            reply["next"] = floor
        return reply

    def _finished_entries(self, rows: list[tuple[Any, ...]], f: Filters) -> list[dict[str, Any]]:
        out = []
        for tid, name, queue, kind, state, attempt, worker_id, created_at, finished_at, duration_ms in rows:
            if state in OPEN_STATES:
                final = self.unflushed.get(tid)
                if final is None:
                    continue  # open: the task table has it
                state, attempt, worker_id = final["state"], final["attempt"], final.get("worker_id")
                duration_ms = final.get("duration_ms")
            if not f.match(name, queue, state, worker_id):
                continue
            e: dict[str, Any] = {
                "id": tid,
                "name": name,
                "queue": queue,
                "kind": kind,
                "state": state,
                "attempt": attempt,
                "created_at": created_at,
            }
            if worker_id:
                e["worker_id"] = worker_id
            if finished_at is not None:
                e["finished_at"] = finished_at
            if duration_ms is not None:
                e["duration_ms"] = duration_ms
            out.append(e)
        return out

    def _open_entries(self, f: Filters, floor: bytes | None, states: Iterable[str]) -> list[dict[str, Any]]:
        states = frozenset(states)
        if not states:
            return []
        recs: Iterable[TaskRecord]
        out = []
        if not states & _NOT_AT_WORKERS or f.worker is not None:  # only tasks at workers
            recs = [self.tasks[t] for w in self.registry.workers.values() for t in w.inflight]
            recs = [*recs, *self.orphans.values()]
        else:
            recs = dict.values(self.tasks)  # the records; the cold tasks stay cold:
            pending = TaskState.PENDING.value
            if pending in states:
                for tid, b in self.tasks.cold_items():
                    if f.in_range(tid, floor) and f.match(b.name, b.queue, pending, None):
                        out.append(
                            {
                                "id": tid,
                                "name": b.name,
                                "queue": b.queue,
                                "kind": b.kind.value,
                                "state": pending,
                                "attempt": 0,
                                "created_at": b.created_at,
                            }
                        )
        for rec in recs:
            if not f.in_range(rec.id, floor) or rec.state.value not in states:
                continue
            worker_id = self._worker_id(rec)
            if not f.match(rec.name, rec.queue, rec.state.value, worker_id):
                continue
            e: dict[str, Any] = {
                "id": rec.id,
                "name": rec.name,
                "queue": rec.queue,
                "kind": rec.kind.value,
                "state": rec.state.value,
                "attempt": rec.attempt,
                "created_at": rec.created_at,
            }
            if worker_id:
                e["worker_id"] = worker_id
            out.append(e)
        return out

    def _worker_id(self, rec: TaskRecord) -> str | None:
        if rec.worker is None:
            return None
        info = self.registry.get(rec.worker)
        return info.worker_id if info is not None else worker_id_of(rec.worker)

    # -- RESOLVE ---------------------------------------------------------------------------
    def resolve(self, req: int, prefixes: list[Any]) -> dict[str, Any]:
        if len(prefixes) > MAX_IDS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"RESOLVE: at most {MAX_IDS} prefixes")
        out = []
        for p in prefixes:
            text = p.replace("-", "").lower() if isinstance(p, str) else ""
            if not HEX.match(text):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"RESOLVE: {p!r} is not 1 to 32 hex digits")
            low, high = prefix_range(text)
            found = set(self.qjournal.ids_between(low, high, 2))
            if len(found) < 2 and len(self.tasks) < 100_000:  # submitted in this very turn
                found.update(t for t in self.tasks if low <= t <= high)
            entry: dict[str, Any] = {"prefix": p, "matches": min(2, len(found))}
            if len(found) == 1:
                entry["id"] = next(iter(found))
            out.append(entry)
        return {"req": req, "ids": out}

    # -- TASK_SHOW ---------------------------------------------------------------------------
    def task_show(self, req: int, tid: Any) -> dict[str, Any]:
        client_api.ids("TASK_SHOW", [tid])
        rec = self.tasks.get(tid)
        earlier = [
            {"attempt": a, "worker_id": w, "started_at": s, "ended_at": e, "outcome": o}
            for a, w, s, e, o in self.qjournal.attempts_of(tid)
        ]
        if rec is not None:
            doc = self._show_open(rec)
        else:
            row = self.qjournal.task_row(tid)
            if row is None:
                return {"req": req}
            doc = self._show_row(row)
        last = doc.pop("_last", None)
        doc["attempts"] = [a for a in earlier if last is None or a["attempt"] != last["attempt"]]
        if last is not None:
            doc["attempts"].append(last)
        return {"req": req, "task": doc}

    def _show_open(self, rec: TaskRecord) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": rec.id,
            "name": rec.name,
            "queue": rec.queue,
            "kind": rec.kind.value,
            "state": rec.state.value,
            "attempt": rec.attempt,
            "options": _options(rec.timeout_s, rec.retries, rec.priority),
            "failures": rec.failures,
            "lost": rec.lost,
            "created_at": rec.created_at,
            "payload": rec.payload,
        }
        if rec.cancel:
            doc["cancel_requested"] = True
        worker_id = self._worker_id(rec)
        if worker_id:
            doc["worker_id"] = worker_id
        if rec.state.at_worker:
            doc["_last"] = {
                "attempt": rec.attempt,
                "worker_id": worker_id,
                "started_at": rec.dispatched_at + self._wall_offset if rec.dispatched_at else None,
                "ended_at": None,
                "outcome": rec.state.value,
            }
        return doc

    def _show_row(self, row: tuple[Any, ...]) -> dict[str, Any]:
        (tid, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, created_at) = (
            row[:12]
        )
        finished_at, expires_at, value, error, worker_id, duration_ms = row[12:18]
        priority = row[18] if len(row) > 18 else 0
        final = self.unflushed.get(tid)
        if final is not None and state in OPEN_STATES:  # finished in this loop turn
            state, attempt = final["state"], final["attempt"]
            value, worker_id, duration_ms = (
                final.get("value"),
                final.get("worker_id"),
                final.get("duration_ms"),
            )
            error = final.get("error")
        elif error is not None:
            error = client_api.row_entry((tid, name, state, attempt, None, error, None, None, None))["error"]
        doc: dict[str, Any] = {
            "id": tid,
            "name": name,
            "queue": queue,
            "kind": kind,
            "state": state,
            "attempt": attempt,
            "options": _options(timeout_s, None if retries < 0 else retries, priority),
            "failures": failures,
            "lost": lost,
            "created_at": created_at,
        }
        for key, v in (
            ("payload", payload),
            ("value", value),
            ("error", error),
            ("worker_id", worker_id),
            ("finished_at", finished_at),
            ("expires_at", expires_at),
            ("duration_ms", duration_ms),
        ):
            if v is not None:
                doc[key] = v
        if attempt > 0 and state not in OPEN_STATES:
            started = finished_at - duration_ms / 1000 if finished_at and duration_ms is not None else None
            doc["_last"] = {
                "attempt": attempt,
                "worker_id": worker_id,
                "started_at": started,
                "ended_at": finished_at,
                "outcome": state,
            }
        return doc

    # -- TASK_RETRY --------------------------------------------------------------------------
    def task_retry(self, client: bytes, req: int, tasks: list[Any], now: float, wall: float) -> None:
        """Submit each final, unsucceeded task again as a new task (the client's ``new_id``),
        with the same name, queue, kind, options and arguments; the reply follows the commit."""
        if len(tasks) > MAX_IDS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"TASK_RETRY: at most {MAX_IDS} tasks")
        refs = messages.check_entries("TASK_RETRY.tasks", tasks, messages.RETRY_REF)
        results: list[dict[str, Any]] = []
        entries: list[dict[str, Any]] = []
        for ref in refs:
            tid, new_id = ref["id"], ref["new_id"]
            if len(new_id) != messages.ID_BYTES:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "TASK_RETRY.tasks: new_id must be 16 bytes")
            res: dict[str, Any] = {"id": tid}
            results.append(res)
            rec = self.tasks.get(tid)
            row = None if rec is not None or tid in self.unflushed else self.qjournal.task_row(tid)
            if rec is not None or tid in self.unflushed or (row is not None and row[4] in OPEN_STATES):
                res.update(outcome="refused", message="the task has not finished yet; cancel it first")
                res["state"] = (
                    rec.state.value if rec is not None else self.unflushed.get(tid, {}).get("state")
                )
                continue
            if row is None:
                res.update(outcome="unknown", message="no such task (never submitted, or its result expired)")
                continue
            state, payload = row[4], row[6]
            res["state"] = state
            if state == TaskState.SUCCEEDED:
                res.update(
                    outcome="refused",
                    message="the task succeeded; only a failed, timed out or cancelled task can be retried",
                )
                continue
            if payload is None:
                res.update(outcome="refused", message="the journal no longer holds its arguments")
                continue
            entries.append(_retry_entry(new_id, row))
            res["new_id"] = new_id
        if entries:
            super().submit(client, req, entries, False, now, wall)
            submitted = self.after_commit.pop()  # the SUBMITTED it queued: answered here instead
            assert submitted.kind is MsgKind.SUBMITTED
            refused = {r["id"]: r for r in submitted.body["rejected"]}
            for res in results:
                r = refused.get(res.get("new_id", b""))
                if r is not None:
                    res.update(outcome="refused", code=r["code"], message=r["message"])
                    res.pop("new_id")
                elif "new_id" in res:
                    res["outcome"] = "retried"
                    log.info(
                        "task_retried_as_new", task_id=format_id(res["id"]), new_id=format_id(res["new_id"])
                    )
        self._later(Role.CLIENT, client, MsgKind.TASK_RETRY_REPLY, {"req": req, "results": results})

    # -- QUEUE_CONTROL -----------------------------------------------------------------------
    def queue_control(self, client: bytes, req: int, queue: str, action: str) -> None:
        """Pause a queue (its pending tasks stay, none is dispatched; running ones finish) or
        resume it; kept in the journal across restarts."""
        if not client_api.QUEUE_NAME.match(queue):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad queue name {queue!r}")
        if action not in ("pause", "resume"):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "QUEUE_CONTROL: action must be pause or resume")
        paused = self.scheduler.paused
        pause = action == "pause"
        changed = (queue in paused) != pause
        if changed:
            if pause:
                paused.add(queue)
            else:
                paused.discard(queue)
                self.scheduler.look_at_all()
            self.qjournal.stage_queue_paused(queue, pause)
            log.info("queue_paused" if pause else "queue_resumed", queue=queue)
        pending = sum(n for (q, _k), n in self.scheduler.depths().items() if q == queue)
        self._later(
            Role.CLIENT,
            client,
            MsgKind.QUEUE_CONTROL_REPLY,
            {"req": req, "queue": queue, "paused": pause, "changed": changed, "pending": pending},
        )


def _options(timeout_s: float | None, retries: int | None, priority: int = 0) -> dict[str, Any]:
    """The options the client gave (absent ones are each worker's declared defaults; a
    priority only when not the default 0)."""
    out: dict[str, Any] = {}
    if timeout_s is not None:
        out["timeout_s"] = timeout_s
    if retries is not None:
        out["retries"] = retries
    if priority:
        out["priority"] = priority
    return out


__all__ = ["SCAN_WINDOW", "QueryEvents", "Send", "id_floor", "prefix_range"]


def _retry_entry(new_id: bytes, row: tuple[Any, ...]) -> dict[str, Any]:
    """The SUBMIT entry that runs a journal row (columns: SHOW_COLUMNS) again as ``new_id``."""
    name, queue, kind, payload, timeout_s, retries = row[1], row[2], row[3], row[6], row[7], row[8]
    entry: dict[str, Any] = {"id": new_id, "name": name, "payload": payload, "kind": kind, "queue": queue}
    if timeout_s is not None:
        entry["timeout_s"] = timeout_s
    if retries >= 0:
        entry["retries"] = retries
    if REF_MARK in payload:  # it may hold task references: the submit scans it for them
        entry["refs"] = True
    if len(row) > 18 and row[18]:
        entry["priority"] = row[18]
    return entry
