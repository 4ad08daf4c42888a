"""The master core's state and its task transitions (pure logic; see core.py).

``CoreState`` holds the task table, the worker registry and the scheduler, and
every transition of a task: assign to a worker and back, requeue, lose, finish.
The event handlers (core_clients.py, core_workers.py) and the timers (core.py)
call these, and nothing outside the core changes the state they keep.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from poolfleet.common import codec
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import (
    CHUNK_TASK_NAMES,
    ErrorCode,
    MsgKind,
    Role,
    TaskState,
)
from poolfleet.common.shipping import SHIPPED_PREFIX, SHIPPED_ROUTE
from poolfleet.master import client_api, worker_api  # noqa: F401 - re-exported for the mixins
from poolfleet.master.codestore import CodeStore
from poolfleet.master.registry import Offer, WorkerInfo, WorkerRegistry
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.settings import MasterSettings
from poolfleet.master.state import (
    Finish,
    Requeue,
    RetryPolicy,
    TaskRecord,
    on_worker_lost,
    requeue,
)
from poolfleet.master.tasktable import TaskTable

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
        priority: int = 0,
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
    def stage_hold(self, task_id: bytes, state: TaskState, payload: bytes | None = None) -> None: ...
    def stage_due(self, task_id: bytes, due_at: float) -> None: ...
    def stage_deps(self, task_id: bytes, deps: list[tuple[bytes, bool]]) -> None: ...
    def stage_deps_done(self, task_id: bytes) -> None: ...
    def stage_code(
        self, digest: bytes, blob: bytes, python: str, cloudpickle: str, shipped_by: str, stored_at: float
    ) -> None: ...
    def stage_shipped_by(self, task_id: bytes, shipped_by: str) -> None: ...
    def load_code(self, digest: bytes) -> tuple[bytes, str, str, str] | None: ...
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


def task_route(name: str, payload: bytes) -> str:
    """The name a worker must offer to run this task: a chunk's function, else its own; for a
    shipped function (or a chunk of one), the name every worker that runs shipped code offers."""
    if name in CHUNK_TASK_NAMES:
        target = codec.first_arg(payload)
        if isinstance(target, str):
            return SHIPPED_ROUTE if target.startswith(SHIPPED_PREFIX) else sys.intern(target)
    # interned: a name decoded from a SUBMIT is a new string per task (80 bytes each)
    return SHIPPED_ROUTE if name.startswith(SHIPPED_PREFIX) else sys.intern(name)


class CoreState:
    """The core's state, its instructions out, and the task transitions."""

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
        self.registry = WorkerRegistry(
            settings.heartbeat_interval_s, settings.liveness, settings.max_heartbeats_per_s
        )
        #: open tasks by id (tasks just submitted kept cold until looked at: tasktable.py)
        self.tasks = TaskTable()
        self.scheduler = Scheduler(settings.prefetch, self.registry.counts, self.tasks)
        #: shipped functions by hash (codestore.py)
        self.code = CodeStore(
            settings.max_code_bytes, settings.code_cache_bytes, getattr(journal, "load_code", lambda d: None)
        )
        #: tasks the journal had at a worker when the master started, until a worker claims them
        self.orphans: dict[bytes, TaskRecord] = {}
        #: the last declared defaults of every name a worker ever offered (from the journal)
        self.task_defs: dict[str, Offer] = {}
        #: identities of connected workers offering each name, oldest registration first
        #: task name -> identities of the connected workers offering it, in connection order
        self.offered: dict[str, dict[bytes, None]] = {}
        #: task name -> how many connected workers offer it with each set of defaults
        self.offer_variants: dict[str, dict[Offer, int]] = {}
        self._conflicts_logged: set[tuple[str, frozenset[Offer]]] = set()
        self.final_counts: dict[str, int] = {}
        #: (id, why) of the open rows of the journal that recovery could not load
        self.invalid_rows: list[tuple[bytes, str]] = []
        self.submitted_total = 0
        self.recovery_deadline = 0.0
        #: finals staged but not yet committed: requests in the same turn still see them
        self.unflushed: dict[bytes, dict[str, Any]] = {}
        self.waiters: dict[bytes, set[bytes]] = {}
        # tasks held back (core_waits.py): WAITING ones by id, the tasks waiting on each open
        # task, DELAYED ones in a heap of (due wall time, id), and the tasks whose dependency
        # rows the journal keeps until they start
        self.waits: dict[bytes, Any] = {}
        self.dependents: dict[bytes, list[bytes]] = {}
        self.delayed: list[tuple[float, bytes]] = []
        self.delayed_n = 0
        self.deps_held: set[bytes] = set()
        self.last_wall = 0.0
        self.last_now = 0.0
        self._cascade: list[tuple[bytes, Finish]] = []
        self._cascading = False
        #: ids each client connection submitted that may still be open (pruned lazily; a list:
        #: 8 bytes per pending task where a set took 40)
        self.owned: dict[bytes, list[bytes]] = {}
        self._owned_total = 0
        self._checked: dict[tuple[Any, ...], client_api.Options] = {}
        self._defs_version = 0
        self._last_rebalance = 0.0
        self._last_liveness = -1e9
        #: tasks submitted since the last commit: withdrawn if that commit fails
        self.fresh: list[bytes] = []
        #: no dispatch while the journal cannot be written (see commit_failed)
        self.hold_dispatch = False
        self.out: list[Send] = []
        self.after_commit: list[Send] = []
        self.pushes: dict[bytes, list[dict[str, Any]]] = {}
        self.acks: dict[bytes, list[dict[str, Any]]] = {}
        self.on_finished: Callable[[str, str, float | None], None] | None = None

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
        self.fresh = []
        self.hold_dispatch = False
        sends, self.after_commit = self.after_commit, []
        if self.acks:
            sends += [
                Send(Role.WORKER, ident, MsgKind.ACK, {"tasks": refs}) for ident, refs in self.acks.items()
            ]
            self.acks = {}
        return sends, self.take_pushes()

    def take_pushes(self, before_commit: bool = False) -> dict[bytes, list[dict[str, Any]]]:
        """Results to push to the clients waiting for them, by client. They need not wait for the
        commit that records them: the worker keeps each result until its ACK, which does wait
        for that commit, so a result a client saw before a crash is sent again, not lost.
        ``before_commit``: except the results of tasks submitted since the last commit (one
        that fails withdraws them, and their client must not have seen them end)."""
        pushes, self.pushes = self.pushes, {}
        if before_commit and self.fresh and pushes:
            fresh = set(self.fresh)
            for client, entries in list(pushes.items()):
                held = [e for e in entries if e["id"] in fresh]
                if held:
                    self.pushes[client] = held
                    rest = [e for e in entries if e["id"] not in fresh]
                    if rest:
                        pushes[client] = rest
                    else:
                        del pushes[client]
        return pushes

    def commit_failed(self, message: str) -> set[bytes]:
        """The journal commit failed: its writes stay staged for the next one, and what waited
        for it (acknowledgements, result ACKs to workers) waits too, except the submits
        since the last good commit: those tasks are withdrawn and their submits answered with
        an error (never acknowledged). No dispatch until a commit succeeds. Returns the ids
        withdrawn, whose staged inserts the journal must forget."""
        withdrawn: set[bytes] = set()
        for tid in self.fresh:
            rec = self.tasks.pop(tid, None)
            if rec is None:
                continue  # finished in the same turn (cancelled while pending): its row is new too
            withdrawn.add(tid)
            if rec.state is TaskState.PENDING:
                self.scheduler.discard(rec)
            elif rec.worker is not None:  # dispatched in this turn: the worker lets it go
                self._send(
                    Role.WORKER,
                    rec.worker,
                    MsgKind.CANCEL_TASKS,
                    {"tasks": [{"id": tid, "attempt": rec.attempt}]},
                )
                self._unassign(rec)
            rec.state = TaskState.CANCELLED  # the scheduler skips it (never recorded)
            self.waiters.pop(tid, None)
            self.submitted_total -= 1
        self.fresh = []
        kept: list[Send] = []
        for s in self.after_commit:
            if s.to is Role.CLIENT and s.kind in (MsgKind.SUBMITTED, MsgKind.TASK_RETRY_REPLY):
                self.error(Role.CLIENT, s.ident, ErrorCode.JOURNAL_UNAVAILABLE, message, s.body.get("req"))
            else:
                kept.append(s)
        self.after_commit = kept
        self.hold_dispatch = True
        return withdrawn

    def take_out(self) -> list[Send]:
        out, self.out = self.out, []
        return out

    def known_offer(self, name: str) -> Offer | None:
        """The defaults for a name: those of the longest-connected worker that offers it, else the
        last ones the journal recorded (None: no worker ever offered it)."""
        idents = self.offered.get(name)
        if idents:
            w = self.registry.workers.get(next(iter(idents)))
            if w is not None and w.offers is not None and name in w.offers:
                return w.offers[name]
        return self.task_defs.get(name)

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

    def _push(self, client: bytes, entry: dict[str, Any]) -> None:
        self.pushes.setdefault(client, []).append(entry)

    def _unoffer(self, info: WorkerInfo) -> None:
        if info.offers is None:
            return
        for name, offer in info.offers.items():
            idents = self.offered.get(name)
            if idents and info.identity in idents:
                del idents[info.identity]
                if not idents:
                    del self.offered[name]
                variants = self.offer_variants.get(name)
                if variants is not None and offer in variants:
                    variants[offer] -= 1
                    if variants[offer] <= 0:
                        del variants[offer]
                    if not variants:
                        del self.offer_variants[name]
        self._defs_version += 1

    def _gone(self, info: WorkerInfo, now: float, wall: float, reason: str) -> None:
        self.registry.remove(info.identity)
        self._unoffer(info)
        tids = list(info.inflight)
        for tid in tids:
            self._lost(self.tasks[tid], now, wall, reason)
        log.info("worker_removed", worker_id=info.worker_id, reason=reason, requeued=len(tids))

    def _assign(self, rec: TaskRecord, info: WorkerInfo) -> None:
        rec.worker = info.identity
        info.add(rec.id, rec.kind)
        if rec.state is TaskState.RUNNING:
            info.start(rec.kind)

    def _unassign(self, rec: TaskRecord, duration_ms: float | None = None) -> None:
        if rec.worker is not None:
            info = self.registry.get(rec.worker)
            if info is not None:
                info.remove(rec.id, duration_ms, rec.state is TaskState.RUNNING)
                self.scheduler.returned += 1
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
        requeue(rec, decision)
        self.journal.stage_requeue(rec.id, rec.failures, rec.lost)
        self.scheduler.push(rec, now)

    def _finish(
        self, rec: TaskRecord, decision: Finish, worker_id: str | None, duration_ms: float | None, wall: float
    ) -> None:
        """Record a final state once, and push it to the clients waiting for it."""
        if rec.state is TaskState.PENDING:
            self.scheduler.discard(rec)
        elif rec.state is TaskState.WAITING:
            self.waits.pop(rec.id, None)
        elif rec.state is TaskState.DELAYED:
            self.delayed_n -= 1
        if self.deps_held and rec.id in self.deps_held:
            self.deps_held.discard(rec.id)
            self.journal.stage_deps_done(rec.id)
        self._unassign(rec)
        rec.state = decision.state
        dict.pop(self.tasks, rec.id, None)  # a record, never cold
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
        if self.dependents and rec.id in self.dependents:
            self._settle(rec.id, decision, wall)

    def _settle(self, tid: bytes, decision: Finish, wall: float) -> None:
        """The tasks waiting on ``tid`` learn its outcome (core_waits.py)."""
        raise NotImplementedError
