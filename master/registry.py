"""Connected workers, their credits and their liveness (pure logic, injected clock)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from poolfleet.common.protocol import Kind

#: Adaptive prefetch: a worker may hold about this much queued work (per slot) beyond its
#: free slots, judged by the run times it reports, so tiny tasks flow in big batches while
#: long ones stay spread over workers. Never fewer than the configured prefetch.
PREFETCH_WINDOW_MS = 50.0
#: Upper bound of the adaptive prefetch per kind.
PREFETCH_MAX = 1000
#: Run times below this count as this much (pool hand-off costs at least about so much).
MIN_TASK_MS = 0.05
#: Weight of the newest run time in the moving average.
EWMA_ALPHA = 0.1


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
    inflight: dict[bytes, Kind] = field(default_factory=dict)
    busy: dict[Kind, int] = field(default_factory=dict)
    held: dict[Kind, int] = field(default_factory=dict)
    draining: bool = False
    last_sent: float = 0.0
    mean_ms: dict[Kind, float] = field(default_factory=dict)

    def free(self, kind: Kind, prefetch: int) -> int:
        """Tasks of ``kind`` this worker may still receive (credit-based flow control)."""
        slots = self.slots.get(kind, 0)
        if slots <= 0 or self.draining:
            return 0
        used = self.busy.get(kind, 0) + self.held.get(kind, 0)
        return slots + self.prefetch(kind, prefetch) - used

    def prefetch(self, kind: Kind, minimum: int) -> int:
        """Credits beyond the slots: ``minimum``, or about PREFETCH_WINDOW_MS of work per slot."""
        mean = self.mean_ms.get(kind)
        if mean is None or minimum <= 0:
            return minimum
        window = math.ceil(self.slots.get(kind, 0) * PREFETCH_WINDOW_MS / max(mean, MIN_TASK_MS))
        return max(minimum, min(PREFETCH_MAX, window))

    def add(self, task_id: bytes, kind: Kind) -> None:
        self.inflight[task_id] = kind
        self.busy[kind] = self.busy.get(kind, 0) + 1

    def remove(self, task_id: bytes, duration_ms: float | None = None) -> None:
        """The task left the worker; a reported run time feeds the adaptive prefetch."""
        kind = self.inflight.pop(task_id, None)
        if kind is not None:
            self.busy[kind] -= 1
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
            "draining": self.draining,
            "last_heartbeat_s": round(max(0.0, now - self.last_seen), 3),
            "connected_s": round(now - self.connected_at, 3),
        }


class WorkerRegistry:
    """Workers by routing identity, with expiry after missed heartbeats."""

    def __init__(self, heartbeat_interval_s: float, liveness: int) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.workers: dict[bytes, WorkerInfo] = {}

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.liveness

    def add(self, info: WorkerInfo) -> WorkerInfo | None:
        """Register ``info``; return the previous entry under the same identity, if any."""
        old = self.workers.get(info.identity)
        self.workers[info.identity] = info
        return old

    def get(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.get(identity)

    def seen(self, identity: bytes, now: float) -> WorkerInfo | None:
        info = self.workers.get(identity)
        if info is not None:
            info.last_seen = now
        return info

    def remove(self, identity: bytes) -> WorkerInfo | None:
        return self.workers.pop(identity, None)

    def expired(self, now: float) -> list[WorkerInfo]:
        """Workers silent for longer than ``liveness`` heartbeat intervals."""
        limit = now - self.expiry_s
        return [w for w in self.workers.values() if w.last_seen < limit]

    def due_heartbeat(self, now: float) -> list[WorkerInfo]:
        """Workers the master has sent nothing to for a heartbeat interval."""
        limit = now - self.heartbeat_interval_s
        return [w for w in self.workers.values() if w.last_sent <= limit]

    def __len__(self) -> int:
        return len(self.workers)
