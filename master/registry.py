"""Connected workers, their credits and their liveness (pure logic, injected clock)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from poolfleet.common.protocol import Kind
from poolfleet.common.shipping import SHIPPED_ROUTE


@dataclass(frozen=True, slots=True)
class Offer:
    """A task name a worker offers, with the defaults its module declares."""

    kind: Kind
    timeout_s: float | None = None
    retries: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "retries": self.retries}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        return out


#: Adaptive prefetch: a worker may hold about this much queued work (per slot) beyond its
#: free slots, judged by the run times it reports, so tiny tasks flow in big batches while
#: long ones stay spread over workers. Tasks shorter than this get at least the configured
#: prefetch; tasks of unknown length, and tasks of seconds, get none (an idle worker that
#: joins later must find them still pending).
PREFETCH_WINDOW_MS = 50.0
#: Upper bound of the adaptive prefetch per kind.
PREFETCH_MAX = 1000
#: Tasks at workers across the whole fleet, at most (a dispatch round sends no more than what
#: is left of it): a thousand workers of tiny tasks would otherwise each earn the full adaptive
#: prefetch and hold the whole of a million pending tasks in flight, in ZeroMQ queues and in
#: the master's memory, doing nothing sooner.
INFLIGHT_BUDGET = 100_000
#: Run times below this count as this much (pool hand-off costs at least about so much).
MIN_TASK_MS = 0.05
#: Weight of the newest run time in the moving average.
EWMA_ALPHA = 0.1


@dataclass(slots=True)
class FleetCounts:
    """The tasks at the registered workers, all together: what STATUS reports without a sum
    over every worker (kept by WorkerInfo.add, start and remove, and the registry)."""

    at_workers: int = 0
    running: int = 0


@dataclass(slots=True)
class WorkerInfo:
    """What the master knows of one connected worker."""

    identity: bytes
    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    slots: dict[Kind, int]
    connected_at: float
    last_seen: float
    #: task names this worker runs, with their declared defaults; None: a worker that did not
    #: say (it is offered every name and must answer an unknown one with a FAILED result)
    offers: dict[str, Offer] | None = None
    session: str = ""
    allow_cmd: frozenset[str] | None = None  # None: the worker did not say
    allow_cmd_env: frozenset[str] = frozenset()
    python: str | None = None  # a worker that runs shipped code: its Python major.minor
    cloudpickle: str | None = None
    #: tasks sent to this worker and not finished, by id: an index kept by the core together
    #: with each task's own state and worker (the facts), never changed anywhere else
    inflight: dict[bytes, Kind] = field(default_factory=dict)
    busy: dict[Kind, int] = field(default_factory=dict)
    held: dict[Kind, int] = field(default_factory=dict)
    draining: bool = False
    last_sent: float = 0.0
    mean_ms: dict[Kind, float] = field(default_factory=dict)
    #: of the busy tasks, those a slot has started (the worker said so)
    started: dict[Kind, int] = field(default_factory=dict)
    #: it may have credit a dispatch round has not used: set whenever a task leaves it or its
    #: held slots change, cleared by a round that left it none (see Scheduler.assign)
    wants: bool = True
    #: the registry's counts while it holds this worker (None: not registered)
    counts: FleetCounts | None = None
    #: the heartbeat interval the master last told it, and the one before (its beats may still
    #: come that far apart until it has heard the new one); 0: not told yet
    beat_s: float = 0.0
    beat_before_s: float = 0.0

    def offers_name(self, name: str) -> bool:
        if name == SHIPPED_ROUTE:  # never assumed: a worker runs shipped code only if it says so
            return self.offers is not None and name in self.offers
        return self.offers is None or name in self.offers

    def idle(self, kind: Kind) -> int:
        """Slots of ``kind`` with nothing sent to them."""
        return self.slots.get(kind, 0) - self.busy.get(kind, 0) - self.held.get(kind, 0)

    def free(self, kind: Kind, prefetch: int) -> int:
        """Tasks of ``kind`` this worker may still receive (credit-based flow control)."""
        slots = self.slots.get(kind, 0)
        if slots <= 0 or self.draining:
            return 0
        used = self.busy.get(kind, 0) + self.held.get(kind, 0)
        return slots + self.prefetch(kind, prefetch) - used

    def prefetch(self, kind: Kind, minimum: int) -> int:
        """Credits beyond the slots: about PREFETCH_WINDOW_MS of work per slot.

        None (0) while run times are unknown or when ``minimum`` is 0 (prefetch off); at least
        ``minimum`` for tasks shorter than the window; none for tasks longer than the slots
        can get through in the window (seconds).
        """
        mean = self.mean_ms.get(kind)
        if mean is None or minimum <= 0:
            return 0
        window = min(
            PREFETCH_MAX, math.floor(self.slots.get(kind, 0) * PREFETCH_WINDOW_MS / max(mean, MIN_TASK_MS))
        )
        return max(minimum, window) if mean < PREFETCH_WINDOW_MS else window

    def add(self, task_id: bytes, kind: Kind) -> None:
        self.inflight[task_id] = kind
        self.busy[kind] = self.busy.get(kind, 0) + 1
        if self.counts is not None:
            self.counts.at_workers += 1

    def start(self, kind: Kind) -> None:
        """A slot started one of the busy tasks (the worker said so)."""
        self.started[kind] = self.started.get(kind, 0) + 1
        if self.counts is not None:
            self.counts.running += 1

    def remove(self, task_id: bytes, duration_ms: float | None = None, started: bool = False) -> None:
        """The task left the worker; a reported run time feeds the adaptive prefetch."""
        kind = self.inflight.pop(task_id, None)
        if kind is not None:
            self.wants = True
            self.busy[kind] -= 1
            counts = self.counts
            if counts is not None:
                counts.at_workers -= 1
            if started:
                self.started[kind] -= 1
                if counts is not None:
                    counts.running -= 1
            if isinstance(duration_ms, int | float) and 0.0 <= duration_ms < 1e9:  # not NaN
                mean = self.mean_ms.get(kind)
                self.mean_ms[kind] = duration_ms if mean is None else mean + EWMA_ALPHA * (duration_ms - mean)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "queues": list(self.queues),
            "slots": {k.value: n for k, n in self.slots.items()},
            "busy": {k.value: self.busy.get(k, 0) for k in self.slots},
            "held": {k.value: n for k, n in self.held.items() if n},
            "started": {k.value: self.started.get(k, 0) for k in self.slots},
            "draining": self.draining,
            "last_heartbeat_s": round(max(0.0, now - self.last_seen), 3),
            "heartbeat_interval_s": self.beat_s,
            "connected_s": round(now - self.connected_at, 3),
            "offers": sorted(self.offers) if self.offers is not None else None,
        }


class WorkerRegistry:
    """Workers by routing identity, with expiry after missed heartbeats."""

    def __init__(self, heartbeat_interval_s: float, liveness: int, max_heartbeats_per_s: float = 0.0) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.max_heartbeats_per_s = max_heartbeats_per_s
        self.workers: dict[bytes, WorkerInfo] = {}
        self.by_worker_id: dict[str, bytes] = {}
        self.counts = FleetCounts()
        #: changes whenever a worker joins, is replaced, leaves or starts draining: what the
        #: scheduler keeps of who serves which queue holds while it stays
        self.version = 0

    @property
    def interval_s(self) -> float:
        """The heartbeat interval for a fleet of this size: the configured one, or a whole
        multiple of it that keeps all the workers' heartbeats together under
        ``max_heartbeats_per_s`` (a thousand workers beating each second cost the master about
        7 % of a core, both ways; a hundred, under 1 %). Steps, not a smooth curve: the
        workers are told only when it changes."""
        base = float(self.heartbeat_interval_s)
        if self.max_heartbeats_per_s <= 0:
            return base
        return base * max(1, math.ceil(len(self.workers) / (self.max_heartbeats_per_s * base)))

    def tell(self, info: WorkerInfo) -> float:
        """The interval to tell ``info`` (in WELCOME and in the master's HEARTBEAT)."""
        interval = self.interval_s
        info.beat_before_s, info.beat_s = info.beat_s or interval, interval
        return interval

    def beat_s(self, info: WorkerInfo) -> float:
        """The longest interval ``info`` may be beating at: the last told or the one before."""
        return max(info.beat_s, info.beat_before_s) or self.heartbeat_interval_s

    def expiry_s(self, info: WorkerInfo) -> float:
        """Silence after which ``info`` is expired: ``liveness`` of its intervals."""
        return self.beat_s(info) * self.liveness

    def add(self, info: WorkerInfo) -> WorkerInfo | None:
        """Register ``info``; return the previous entry under the same identity, if any."""
        old = self.workers.get(info.identity)
        if old is not None:
            self._count(old, -1)
        self.workers[info.identity] = info
        self.by_worker_id[info.worker_id] = info.identity
        self._count(info, 1)
        self.version += 1
        return old

    def draining(self, info: WorkerInfo) -> None:
        """``info`` takes no more tasks (it said DRAINING)."""
        info.draining = True
        self.version += 1

    def _count(self, info: WorkerInfo, sign: int) -> None:
        """Take ``info``'s tasks into the fleet's counts (1) or out of them (-1)."""
        self.counts.at_workers += sign * len(info.inflight)
        self.counts.running += sign * sum(info.started.values())
        info.counts = self.counts if sign > 0 else None

    def named(self, worker_id: str) -> WorkerInfo | None:
        """The registered worker of this worker id (one process at a time)."""
        ident = self.by_worker_id.get(worker_id)
        return None if ident is None else self.workers.get(ident)

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def seen(self, identity: bytes, now: float) -> WorkerInfo | None:
        info = self.workers.get(identity)
        if info is not None:
            info.last_seen = now
        return info

    def remove(self, identity: bytes) -> WorkerInfo | None:
        info = self.workers.pop(identity, None)
        if info is not None:
            self._count(info, -1)
            self.version += 1
            if self.by_worker_id.get(info.worker_id) == identity:
                del self.by_worker_id[info.worker_id]
        return info

    def expired(self, now: float) -> list[WorkerInfo]:
        """Workers silent for longer than ``liveness`` of their heartbeat intervals."""
        limit = now - self.heartbeat_interval_s * self.liveness  # the shortest: most are not
        return [
            w for w in self.workers.values() if w.last_seen < limit and now - w.last_seen > self.expiry_s(w)
        ]

    def due_heartbeat(self, now: float) -> list[WorkerInfo]:
        """Workers the master has sent nothing to for their heartbeat interval, or that have
        not been told the interval of the fleet's size as it is now."""
        limit = now - self.heartbeat_interval_s
        interval = self.interval_s
        return [
            w
            for w in self.workers.values()
            if w.last_sent <= limit and (w.beat_s != interval or now - w.last_sent >= interval)
        ]

    def __len__(self) -> int:
        return len(self.workers)
