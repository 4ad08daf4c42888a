"""Connected workers, their credits and their liveness (pure logic, injected clock)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from poolfleet.common.protocol import Kind


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

    def free(self, kind: Kind, prefetch: int) -> int:
        """Tasks of ``kind`` this worker may still receive (credit-based flow control)."""
        slots = self.slots.get(kind, 0)
        if slots <= 0 or self.draining:
            return 0
        used = self.busy.get(kind, 0) + self.held.get(kind, 0)
        return slots + prefetch - used

    def add(self, task_id: bytes, kind: Kind) -> None:
        self.inflight[task_id] = kind
        self.busy[kind] = self.busy.get(kind, 0) + 1

    def remove(self, task_id: bytes) -> None:
        kind = self.inflight.pop(task_id, None)
        if kind is not None:
            self.busy[kind] -= 1

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
