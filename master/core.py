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

import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    Kind,
    MsgKind,
    Role,
    TaskState,
)
from poolfleet.master import client_api, worker_api
from poolfleet.master.registry import Offer, WorkerInfo, WorkerRegistry
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.settings import MasterSettings
from poolfleet.master.state import (
    Finish,
    Requeue,
    RetryPolicy,
    Stale,
    TaskRecord,
    on_result,
    on_worker_lost,
    start,
)

log = structlog.get_logger("pmaster")

#: A task sent to a worker and missing from what it reports holding this long after the send
#: was lost on the way (or by the worker): it is requeued, without counting as a lost attempt.
UNHELD_AFTER_INTERVALS = 2.0
#: A registered worker heard from within this many heartbeat intervals is alive: a second
#: process with its worker id is refused, not let in.
TWIN_ALIVE_INTERVALS = 2.0
#: Unstarted tasks on a worker whose slots are all busy are recalled for an idle worker after
#: waiting this long, at most once per task and once per interval.
RECALL_AFTER_S = 0.1


class JournalPort(Protocol):
    """The journal operations the core stages (and the two lookups it makes)."""

    def stage_insert(
        self,
        task_id: bytes,
        name: str,
        queue: str,
        kind: str,
        payload: bytes,
        timeout_s: float | None,
        retries: int | None,
        created_at: float,
    ) -> None: ...
    def stage_start(self, task_id: bytes, attempt: int) -> None: ...
    def stage_requeue(self, task_id: bytes, failures: int, lost: int) -> None: ...
    def stage_finish(
        self,
        task_id: bytes,
        state: TaskState,
        attempt: int,
        value: bytes | None,
        error: bytes | None,
        finished_at: float,
        expires_at: float,
        worker_id: str | None,
        duration_ms: float | None,
    ) -> None: ...
    def stage_task_def(self, name: str, kind: str, timeout_s: float | None, retries: int) -> None: ...
    def existing(self, ids: Iterable[bytes]) -> set[bytes]: ...
    def results(self, ids: Iterable[bytes]) -> dict[bytes, tuple[Any, ...]]: ...


@dataclass(frozen=True, slots=True)
class Send:
    """An instruction: send ``body`` as ``kind`` to the peer ``ident`` on the ``to`` socket."""

    to: Role
    ident: bytes
    kind: MsgKind
    body: dict[str, Any]


def _err(message: str) -> dict[str, Any]:
    return {"type": "Cancelled", "message": message, "traceback": ""}


class MasterCore:
    """The task table, the worker registry and the scheduler, and every transition of them."""

    def __init__(
        self,
        settings: MasterSettings,
        journal: JournalPort,
        master_id: str,
        rng: random.Random | None = None,
        pack: Callable[[Any], bytes] | None = None,
    ) -> None:
        from poolfleet.common import codec

        self.settings = settings
        self.journal = journal
        self.master_id = master_id
        self.rng = rng or random.Random()
        self.pack = pack or codec.pack
        self.policy = RetryPolicy(settings.backoff_base_s, settings.backoff_max_s, settings.max_lost)
        self.registry = WorkerRegistry(settings.heartbeat_interval_s, settings.liveness)
        self.scheduler = Scheduler(settings.prefetch)
        self.tasks: dict[bytes, TaskRecord] = {}
        #: tasks the journal had at a worker when the master started, until a worker claims them
        self.orphans: dict[bytes, TaskRecord] = {}
        #: the last declared defaults of every name a worker ever offered (from the journal)
        self.task_defs: dict[str, Offer] = {}
        #: identities of connected workers offering each name, oldest registration first
        self.offered: dict[str, list[bytes]] = {}
        self._conflicts_logged: set[tuple[str, frozenset[Offer]]] = set()
        self.final_counts: dict[str, int] = {}
        self.submitted_total = 0
        self.recovery_deadline = 0.0
        #: finals staged but not yet committed: requests in the same turn still see them
        self.unflushed: dict[bytes, dict[str, Any]] = {}
        self.waiters: dict[bytes, set[bytes]] = {}
        #: ids each client connection submitted that may still be open (pruned lazily)
        self.owned: dict[bytes, set[bytes]] = {}
        self._owned_total = 0
        self._checked: dict[tuple[Any, ...], client_api.Options] = {}
        self._defs_version = 0
        self._last_rebalance = 0.0
        self._now = 0.0
        self.out: list[Send] = []
        self.after_commit: list[Send] = []
        self.pushes: dict[bytes, list[dict[str, Any]]] = {}
        self.on_finished: Callable[[str, str, float | None], None] | None = None

    # -- instructions ----------------------------------------------------------
    def _send(self, to: Role, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        self.out.append(Send(to, ident, kind, body))

    def _later(self, to: Role, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        self.after_commit.append(Send(to, ident, kind, body))

    def error(self, to: Role, ident: bytes, code: str, message: str, req: Any = None) -> None:
        body: dict[str, Any] = {"code": code, "message": message}
        if type(req) is int:  # echo only a valid req: a bad one (True, "1") would make the ERROR invalid
            body["req"] = req
        self._send(to, ident, MsgKind.ERROR, body)

    def committed(self) -> tuple[list[Send], dict[bytes, list[dict[str, Any]]]]:
        """The journal commit succeeded: what waited for it may go out now."""
        self.unflushed.clear()
        sends, self.after_commit = self.after_commit, []
        pushes, self.pushes = self.pushes, {}
        return sends, pushes

    def take_out(self) -> list[Send]:
        out, self.out = self.out, []
        return out

    # -- recovery --------------------------------------------------------------
    def recover(
        self,
        rows: Iterable[tuple[Any, ...]],
        task_defs: Iterable[tuple[str, str, float | None, int]],
        final_counts: dict[str, int],
        now: float,
        hold_pending: bool,
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
        for row in rows:
            tid, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, cat = row
            rec = TaskRecord(
                id=tid,
                name=sys.intern(name),
                queue=sys.intern(queue),
                kind=Kind(kind),
                payload=payload,
                timeout_s=timeout_s,
                retries=retries,
                created_at=cat,
                attempt=attempt,
                failures=failures,
                lost=lost,
            )
            self.tasks[tid] = rec
            if state != TaskState.PENDING:
                rec.state = TaskState.DISPATCHED  # at some worker, if any still holds it
                self.orphans[tid] = rec
                out += 1
            else:
                if hold_pending:
                    rec.not_before = grace_end
                self.scheduler.push(rec, now)
                pending += 1
        if self.orphans or (hold_pending and pending):
            self.recovery_deadline = grace_end
        return pending, out

    # -- client events ---------------------------------------------------------
    def known_offer(self, name: str) -> Offer | None:
        """The defaults for a name: those of the longest-connected worker that offers it, else the
        last ones the journal recorded (None: no worker ever offered it)."""
        idents = self.offered.get(name)
        if idents:
            w = self.registry.workers.get(idents[0])
            if w is not None and w.offers is not None and name in w.offers:
                return w.offers[name]
        return self.task_defs.get(name)

    def _options(self, entry: dict[str, Any]) -> client_api.Options:
        name = entry["name"]
        key = (
            name,
            entry.get("kind"),
            entry.get("queue"),
            entry.get("timeout_s"),
            entry.get("retries"),
            self._defs_version,
        )
        hit = self._checked.get(key)
        if hit is not None and len(entry["id"]) == 16:
            return hit
        any_known = bool(self.task_defs) or bool(self.offered)
        offered = sorted(set(self.task_defs) | set(self.offered)) if any_known else []
        out = client_api.check_options(entry, self.known_offer(name), any_known, offered)
        if len(self._checked) >= 4096:  # bounded: a client may send any number of names
            self._checked.clear()
        self._checked[key] = out
        return out

    def submit(self, client: bytes, req: int, tasks: list[Any], wait: bool, now: float, wall: float) -> None:
        entries, rejected = client_api.submit_entries(tasks)
        accepted: list[bytes] = []
        fresh_ids = [e["id"] for e in entries if e["id"] not in self.tasks]
        in_journal = self.journal.existing(fresh_ids) if fresh_ids else set()
        cap = self.settings.max_unacked_per_client
        owned = self.owned.get(client)
        room = cap - (len(owned) if owned else 0)  # at most the true room: owned >= pending
        if room < len(entries):
            room = cap - self._pending_of(client)
        for entry in entries:
            tid = entry["id"]
            if tid in self.tasks or tid in in_journal or tid in self.unflushed:
                accepted.append(tid)  # idempotent resubmit: the first one stands
                continue
            try:
                kind, queue, timeout_s, retries = self._options(entry)
            except ProtocolError as exc:
                rejected.append({"id": tid, "code": exc.code, "message": exc.message})
                continue
            refusal = self._over_limit(queue, kind, room)
            if refusal is not None:
                rejected.append({"id": tid, "code": refusal.code, "message": refusal.message})
                continue
            room -= 1
            self.owned.setdefault(client, set()).add(tid)
            self._owned_total += 1
            rec = TaskRecord(
                id=tid,
                name=sys.intern(entry["name"]),  # one copy per name, not per pending task
                queue=sys.intern(queue),
                kind=kind,
                payload=entry["payload"],
                timeout_s=timeout_s,
                retries=retries,
                created_at=wall,
            )
            self.tasks[tid] = rec
            self.journal.stage_insert(tid, rec.name, queue, kind.value, rec.payload, timeout_s, retries, wall)
            self.scheduler.push(rec, now)
            self.submitted_total += 1
            accepted.append(tid)
        if wait:
            self._subscribe(client, accepted)
        for r in rejected:
            log.info(
                "task_rejected",
                task_id=format_id(r["id"]) if len(r["id"]) == 16 else r["id"].hex(),
                code=r["code"],
                reason=r["message"],
            )
        if self._owned_total > 2 * len(self.tasks) + 10_000:
            for c in list(self.owned):
                self._pending_of(c)
        # acknowledged only after the commit that holds these tasks
        self._later(
            Role.CLIENT, client, MsgKind.SUBMITTED, {"req": req, "accepted": accepted, "rejected": rejected}
        )

    def _subscribe(self, client: bytes, accepted: list[bytes]) -> None:
        """Push results to this client as they land; those already final, right away."""
        done = [t for t in accepted if t not in self.tasks]
        for tid in accepted:
            if tid in self.tasks:
                self.waiters.setdefault(tid, set()).add(client)
        for tid in done:
            if tid in self.unflushed:
                self._push(client, self.unflushed[tid])
        for row in self.journal.results([t for t in done if t not in self.unflushed]).values():
            self._push(client, client_api.row_entry(row))

    def _push(self, client: bytes, entry: dict[str, Any]) -> None:
        self.pushes.setdefault(client, []).append(entry)

    def _over_limit(self, queue: str, kind: Kind, room: int) -> ProtocolError | None:
        """Backpressure: a full queue, or a client with too many pending tasks."""
        settings = self.settings
        if self.scheduler.depth.get((queue, kind), 0) >= settings.max_queue_length:
            return ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"queue {queue!r} ({kind.value}) is full: {settings.max_queue_length} tasks pending; retry later",
            )
        if room <= 0:
            return ProtocolError(
                ErrorCode.TOO_MANY_UNACKED,
                f"this client already has {settings.max_unacked_per_client} tasks pending "
                "(max_unacked_per_client); wait until some start or finish, then submit again",
            )
        return None

    def _pending_of(self, client: bytes) -> int:
        """How many tasks of this client are PENDING; forgets its tasks that have finished."""
        owned = self.owned.get(client)
        if not owned:
            return 0
        tasks = self.tasks
        live = {t for t in owned if t in tasks}
        self._owned_total -= len(owned) - len(live)
        if live:
            self.owned[client] = live
        else:
            del self.owned[client]
        return sum(1 for t in live if tasks[t].state is TaskState.PENDING)

    def result_get(self, client: bytes, req: int, ids: list[Any], wait: bool) -> None:
        client_api.ids("RESULT_GET", ids)
        results: list[dict[str, Any]] = []
        unknown: list[bytes] = []
        finished = self.journal.results([i for i in ids if i not in self.tasks])
        for tid in ids:
            rec = self.tasks.get(tid)
            if rec is not None:
                results.append(
                    {"id": tid, "state": rec.state.value, "attempt": rec.attempt, "name": rec.name}
                )
                if wait:
                    self.waiters.setdefault(tid, set()).add(client)
            elif tid in self.unflushed:
                results.append(self.unflushed[tid])
            elif tid in finished:
                results.append(client_api.row_entry(finished[tid]))
            else:
                unknown.append(tid)
        self._send(Role.CLIENT, client, MsgKind.RESULTS, {"req": req, "results": results, "unknown": unknown})

    def cancel(self, client: bytes, req: int, ids: list[Any], now: float, wall: float) -> None:
        client_api.ids("CANCEL", ids)
        out: list[dict[str, Any]] = []
        for tid in ids:
            rec = self.tasks.get(tid)
            if rec is None and tid in self.unflushed:
                out.append({"id": tid, "outcome": "finished", "state": self.unflushed[tid]["state"]})
            elif rec is None:
                row = self.journal.results([tid]).get(tid)
                if row is None:
                    out.append({"id": tid, "outcome": "unknown"})
                else:
                    out.append({"id": tid, "outcome": "finished", "state": row[2]})
            elif rec.state is TaskState.PENDING:
                self._finish(
                    rec, Finish(TaskState.CANCELLED, error=_err("cancelled while pending")), None, None, wall
                )
                out.append({"id": tid, "outcome": "cancelled", "state": TaskState.CANCELLED.value})
                log.info("task_cancelled", task_id=format_id(tid), task_name=rec.name, state="PENDING")
            else:
                rec.cancel = True
                if rec.worker is not None:
                    self._later(
                        Role.WORKER,
                        rec.worker,
                        MsgKind.CANCEL_TASKS,
                        {"tasks": [{"id": rec.id, "attempt": rec.attempt}]},
                    )
                out.append({"id": tid, "outcome": "cancelling", "state": rec.state.value})
                log.info(
                    "task_cancel_requested", task_id=format_id(tid), task_name=rec.name, attempt=rec.attempt
                )
        self._later(Role.CLIENT, client, MsgKind.CANCEL_REPLY, {"req": req, "results": out})

    def status(self, req: int, uptime_s: float) -> dict[str, Any]:
        counts = dict(self.final_counts)
        workers = self.registry.workers.values()
        running = sum(sum(w.started.values()) for w in workers)
        at_workers = sum(len(w.inflight) for w in workers) + len(self.orphans)
        counts[TaskState.RUNNING.value] = running
        counts[TaskState.DISPATCHED.value] = at_workers - running
        counts[TaskState.PENDING.value] = len(self.tasks) - at_workers
        queues = [
            {"queue": q, "kind": k.value, "depth": n} for (q, k), n in sorted(self.scheduler.depths().items())
        ]
        return {
            "req": req,
            "master_id": self.master_id,
            "counts": counts,
            "queues": queues,
            "unserved": self.scheduler.unserved(workers),
            "workers": len(self.registry),
            "submitted_total": self.submitted_total,
            "uptime_s": round(uptime_s, 3),
        }

    def workers_reply(self, req: int, now: float) -> dict[str, Any]:
        workers = []
        for w in self.registry.workers.values():
            d = w.describe(now)
            d["conflicts"] = sorted(n for n in (w.offers or ()) if self._conflict(n))
            workers.append(d)
        conflicts = {n: self._conflict(n) for n in self.offered if self._conflict(n)}
        return {"req": req, "workers": workers, "conflicts": conflicts}

    def _conflict(self, name: str) -> dict[str, dict[str, Any]]:
        """Worker id -> declared defaults, for a name whose connected workers disagree."""
        seen: dict[str, dict[str, Any]] = {}
        variants: set[Offer] = set()
        for ident in self.offered.get(name, ()):
            w = self.registry.workers.get(ident)
            if w is not None and w.offers is not None and name in w.offers:
                seen[w.worker_id] = w.offers[name].describe()
                variants.add(w.offers[name])
        return seen if len(variants) > 1 else {}

    # -- worker events ---------------------------------------------------------
    def worker_hello(self, ident: bytes, hello: worker_api.Hello, now: float, wall: float) -> None:
        if hello.version != PROTOCOL_VERSION:
            msg = f"worker speaks protocol {hello.version}, master speaks {PROTOCOL_VERSION}"
            log.warning("worker_refused", reason=msg)
            self.error(Role.WORKER, ident, ErrorCode.BAD_VERSION, msg)
            return
        self._now = now
        other = self.registry.named(hello.worker_id)
        if other is not None and other.identity != ident:
            alive = now - other.last_seen <= TWIN_ALIVE_INTERVALS * self.settings.heartbeat_interval_s
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
            if self._claim(claimed, info, attempt):
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
                "heartbeat_interval_s": self.settings.heartbeat_interval_s,
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

    def _claim(self, rec: TaskRecord | None, info: WorkerInfo, attempt: int) -> bool:
        """A worker reports holding ``rec`` at ``attempt``: make it that worker's, if it may be."""
        if rec is None:
            return False
        if rec.state.at_worker and rec.attempt == attempt and rec.worker in (None, info.identity):
            self.orphans.pop(rec.id, None)
            if rec.id not in info.inflight:  # an orphan, or held since before this reconnect
                rec.dispatched_at = self._now
                self._assign(rec, info)
            return True
        if rec.state is TaskState.PENDING and attempt > rec.attempt and rec.id not in self.orphans:
            # sent just before an unclean stop, whose commit never recorded the dispatch
            self.scheduler.discard(rec)
            rec.state = TaskState.DISPATCHED
            rec.attempt = attempt
            rec.dispatched_at = self._now
            self.journal.stage_start(rec.id, attempt)
            self._assign(rec, info)
            return True
        return False

    def _offer(self, info: WorkerInfo, wall: float) -> None:
        if info.offers is None:
            return
        for name, offer in info.offers.items():
            self.offered.setdefault(name, []).append(info.identity)
            if self.task_defs.get(name) != offer:
                self.task_defs[name] = offer
                self.journal.stage_task_def(name, offer.kind.value, offer.timeout_s, offer.retries)
            variants = frozenset(
                w.offers[name]
                for i in self.offered[name]
                if (w := self.registry.workers.get(i)) is not None and w.offers is not None
            )
            if len(variants) > 1 and (name, variants) not in self._conflicts_logged:
                self._conflicts_logged.add((name, variants))
                log.warning("task_defaults_conflict", task_name=name, workers=self._conflict(name))
        self._defs_version += 1

    def _unoffer(self, info: WorkerInfo) -> None:
        if info.offers is None:
            return
        for name in info.offers:
            idents = self.offered.get(name)
            if idents and info.identity in idents:
                idents.remove(info.identity)
                if not idents:
                    del self.offered[name]
        self._defs_version += 1

    def worker_message(
        self, ident: bytes, kind: MsgKind, body: dict[str, Any], now: float, wall: float
    ) -> None:
        """Any worker message but HELLO; raises ProtocolError for bad requests."""
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
            held = worker_api.held(body)
            if held is not None:
                info.held = held
            self._results(ident, info, worker_api.results(body["results"]), now, wall)
        elif kind is MsgKind.STARTED:
            self._started(info, worker_api.refs("STARTED.tasks", body["tasks"]))
        elif kind is MsgKind.RETURN:
            self._returned(info, worker_api.refs("RETURN.tasks", body["tasks"]), wall)
        elif kind is MsgKind.DRAINING:
            info.draining = True
            log.info("worker_draining", worker_id=info.worker_id)
        elif kind is MsgKind.BYE:
            self._gone(info, now, wall, "worker said bye")
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind.name} is not a worker message")

    def _heartbeat(self, info: WorkerInfo, body: dict[str, Any], now: float) -> None:
        held = worker_api.held(body)
        if held is not None:
            info.held = held
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
        for tid, attempt in refs:
            rec = self.tasks.get(tid)
            if (
                rec is not None
                and rec.state is TaskState.DISPATCHED
                and rec.worker == info.identity
                and rec.attempt == attempt
            ):
                rec.state = TaskState.RUNNING
                info.started[rec.kind] = info.started.get(rec.kind, 0) + 1

    def _results(
        self, ident: bytes, info: WorkerInfo | None, entries: list[dict[str, Any]], now: float, wall: float
    ) -> None:
        acks: list[dict[str, Any]] = []
        for entry in entries:
            tid, attempt = entry["id"], entry["attempt"]
            acks.append({"id": tid, "attempt": attempt})
            rec = self.tasks.get(tid)
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
                self._claim_for_result(rec, attempt)
            mine = rec.worker == ident and rec.attempt == attempt
            offer = self._offer_of(rec, info)
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
        # the worker keeps each result until this arrives, after the commit that records it
        self._later(Role.WORKER, ident, MsgKind.ACK, {"tasks": acks})

    def _claim_for_result(self, rec: TaskRecord, attempt: int) -> None:
        if rec.state is TaskState.PENDING and attempt > rec.attempt and rec.id not in self.orphans:
            self.scheduler.discard(rec)
            rec.state = TaskState.DISPATCHED
            rec.attempt = attempt

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

    def _gone(self, info: WorkerInfo, now: float, wall: float, reason: str) -> None:
        self.registry.remove(info.identity)
        self._unoffer(info)
        tids = list(info.inflight)
        for tid in tids:
            self._lost(self.tasks[tid], now, wall, reason)
        log.info("worker_removed", worker_id=info.worker_id, reason=reason, requeued=len(tids))

    # -- task transitions ------------------------------------------------------
    def _assign(self, rec: TaskRecord, info: WorkerInfo) -> None:
        rec.worker = info.identity
        info.add(rec.id, rec.kind)
        if rec.state is TaskState.RUNNING:
            info.started[rec.kind] = info.started.get(rec.kind, 0) + 1

    def _unassign(self, rec: TaskRecord, duration_ms: float | None = None) -> None:
        if rec.worker is not None:
            info = self.registry.get(rec.worker)
            if info is not None:
                info.remove(rec.id, duration_ms, rec.state is TaskState.RUNNING)
            rec.worker = None

    def _lost(self, rec: TaskRecord, now: float, wall: float, reason: str) -> None:
        """Its worker vanished: requeue (counted toward the poison limit), or finish."""
        if rec.cancel:
            self._finish(
                rec,
                Finish(TaskState.CANCELLED, error=_err(f"cancelled; its worker was lost ({reason})")),
                None,
                None,
                wall,
            )
            return
        self._unassign(rec)
        decision = on_worker_lost(rec, self.policy, now)
        if isinstance(decision, Requeue):
            log.info(
                "task_requeued",
                task_id=format_id(rec.id),
                task_name=rec.name,
                attempt=rec.attempt,
                reason=reason,
            )
            self._requeue(rec, decision, now)
        elif isinstance(decision, Finish):
            self._finish(rec, decision, None, None, wall)

    def _requeue_unheld(self, rec: TaskRecord, now: float, reason: str) -> None:
        """The worker does not have it (never arrived, or a reconnect lost it): back to the
        queue, without counting toward the poison limit; the next dispatch is a new attempt."""
        self._unassign(rec)
        log.info(
            "task_requeued", task_id=format_id(rec.id), task_name=rec.name, attempt=rec.attempt, reason=reason
        )
        self._requeue(rec, Requeue(now, reason), now)

    def _requeue(self, rec: TaskRecord, decision: Requeue, now: float) -> None:
        self._unassign(rec)
        rec.state = TaskState.PENDING
        rec.not_before = decision.not_before
        self.journal.stage_requeue(rec.id, rec.failures, rec.lost)
        self.scheduler.push(rec, now)

    def _finish(
        self, rec: TaskRecord, decision: Finish, worker_id: str | None, duration_ms: float | None, wall: float
    ) -> None:
        """Record a final state once, and push it to the clients waiting for it."""
        if rec.state is TaskState.PENDING:
            self.scheduler.discard(rec)
        self._unassign(rec)
        rec.state = decision.state
        self.tasks.pop(rec.id, None)
        self.orphans.pop(rec.id, None)
        error_bytes = self.pack(decision.error) if decision.error is not None else None
        self.journal.stage_finish(
            rec.id,
            decision.state,
            rec.attempt,
            decision.value,
            error_bytes,
            wall,
            wall + self.settings.result_ttl_s,
            worker_id,
            duration_ms,
        )
        self.final_counts[decision.state.value] = self.final_counts.get(decision.state.value, 0) + 1
        if self.on_finished is not None:
            self.on_finished(rec.name, decision.state.value, duration_ms)
        if decision.state is not TaskState.SUCCEEDED:
            log.info(
                "task_finished",
                task_id=format_id(rec.id),
                task_name=rec.name,
                state=decision.state.value,
                attempt=rec.attempt,
                worker_id=worker_id,
                error=(decision.error or {}).get("message"),
            )
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
            self._push(client, entry)
        self.unflushed[rec.id] = entry

    # -- timers ----------------------------------------------------------------
    def tick(self, now: float, wall: float) -> None:
        """Liveness, heartbeats, the end of recovery, a dispatch round and rebalancing."""
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
            self._send(Role.WORKER, info.identity, MsgKind.HEARTBEAT, {"master_id": self.master_id})
            info.last_sent = now
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
        self.dispatch(now)
        self._rebalance(now)

    def next_timer_s(self, now: float) -> float:
        wait = self.settings.heartbeat_interval_s / 2
        due = self.scheduler.next_due_s(now)
        if due is not None:
            wait = min(wait, due)
        if self.recovery_deadline:
            wait = min(wait, max(0.0, self.recovery_deadline - now))
        return wait

    def dispatch(self, now: float) -> None:
        if not self.registry.workers:
            return
        plan = self.scheduler.assign(self.registry.workers.values(), now)
        for ident, recs in plan.items():
            info = self.registry.workers[ident]
            batch = []
            for rec in recs:
                attempt = start(rec, ident, now)
                info.add(rec.id, rec.kind)
                self.journal.stage_start(rec.id, attempt)
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
        workers = [w for w in self.registry.workers.values()]
        idle = {
            (w.identity, k): w.idle(k) for w in workers if not w.draining for k in w.slots if w.idle(k) > 0
        }
        if not idle:
            return
        for v in workers:
            refs: list[dict[str, Any]] = []
            for kind in v.slots:
                waiting = v.busy.get(kind, 0) - v.started.get(kind, 0)
                if waiting <= 0 or v.started.get(kind, 0) < v.slots.get(kind, 0):
                    continue  # nothing waits there, or a slot of its own is free for it
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

    def cmd_allowed(self, program: str) -> bool:
        """Whether some connected worker with cmd slots allows ``program`` (None: not known)."""
        for w in self.registry.workers.values():
            if w.slots.get(Kind.CMD, 0) > 0 and (w.allow_cmd is None or program in w.allow_cmd):
                return True
        return False
