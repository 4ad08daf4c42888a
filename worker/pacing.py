"""Which tiny cpu tasks share one process-pool call (pure logic, no pools).

A pool call costs tens of microseconds in hand-offs between threads and
processes, more than a tiny task itself. Tasks whose measured run time is
tiny travel to a pool child together, as one *chunk* of about
``CHUNK_TARGET_MS`` of work; the child reports the start of the chunk once,
runs its tasks one after the other and returns their outcomes together.

What keeps the guarantees of single calls:

- only tasks without a timeout are chunked (a timeout kills the child, and
  with it every task of the chunk), and never when children are recycled
  after ``max_tasks_per_child`` (a chunk counts as one task there);
- a task is chunked only after a run of its name has been measured, so a new
  or slow task runs alone;
- when a child dies under a chunk, the jobs of the chunk run again, each
  alone (``Job.solo``): the death is then pinned on the task that causes it,
  and the others are not blamed for it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol, TypeVar

#: A chunk holds about this much work (its results come back together).
CHUNK_TARGET_MS = 4.0
#: Never more tasks than this in one chunk.
CHUNK_MAX = 256
#: Only names whose mean run time is below this are chunked.
TINY_MS = 0.5
#: A task in a chunk costs at least this much (unpacking, bookkeeping).
FLOOR_MS = 0.01
#: Weight of the newest run time in the moving average.
EWMA_ALPHA = 0.2


class ChunkJob(Protocol):
    """What the pacer needs to know of a job."""

    name: str
    timeout_s: float | None
    done: bool
    solo: bool


J = TypeVar("J", bound=ChunkJob)


class Chunk:
    """Jobs sharing one pool call: the call's slot is free once every job has left it."""

    __slots__ = ("left",)

    def __init__(self, size: int) -> None:
        self.left = size

    def release(self) -> bool:
        """One job left the pool call; True when it was the last."""
        self.left -= 1
        return self.left <= 0


class Pacer:
    """Run-time averages per task name, and the chunk decision."""

    def __init__(self, enabled: bool, slots: int) -> None:
        self.enabled = enabled
        self.slots = max(1, slots)
        self.mean_ms: dict[str, float] = {}

    def observe(self, name: str, duration_ms: float | None) -> None:
        if not self.enabled or duration_ms is None or not 0.0 <= duration_ms < 1e9:
            return
        mean = self.mean_ms.get(name)
        self.mean_ms[name] = duration_ms if mean is None else mean + EWMA_ALPHA * (duration_ms - mean)

    def _cost(self, job: ChunkJob) -> float | None:
        """Expected milliseconds of a job if it may be chunked, else None."""
        if job.timeout_s or job.solo:
            return None
        mean = self.mean_ms.get(job.name)
        if mean is None or mean >= TINY_MS:
            return None
        return max(mean, FLOOR_MS)

    def take(self, first: J, waiting: deque[J]) -> list[J]:
        """``first`` and the waiting jobs right behind it that may share its pool call.

        Takes from the front of ``waiting`` (FIFO order is kept), skips jobs that are done,
        and leaves work for every child: at most a ``1/slots`` share of what waits.
        """
        cost = self._cost(first) if self.enabled else None
        if cost is None or not waiting:
            return [first]
        share = math.ceil((len(waiting) + 1) / self.slots)
        limit = min(CHUNK_MAX, share)
        budget = CHUNK_TARGET_MS - cost
        out = [first]
        while waiting and len(out) < limit:
            job = waiting[0]
            if job.done:
                waiting.popleft()
                continue
            c = self._cost(job)
            if c is None or c > budget:
                break
            budget -= c
            out.append(waiting.popleft())
        return out
