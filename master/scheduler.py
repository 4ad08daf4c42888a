"""Which pending task goes to which worker (pure logic, injected clock).

Pending tasks wait in one FIFO per (queue, kind); tasks waiting for a retry
backoff wait in a heap until they are due. A dispatch round hands each worker
at most its free credits per kind, spreading tasks across workers.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable

from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master.registry import WorkerInfo
from poolfleet.master.state import TaskRecord

#: At most this many tasks go out per dispatch round, so a round and the commit after it stay
#: short (the loop answers STATUS between rounds); the rest goes out in the next rounds.
MAX_PER_ROUND = 1000


class Scheduler:
    """Pending queues and the dispatch decision."""

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.ready: dict[tuple[str, Kind], deque[TaskRecord]] = {}
        self.delayed: list[tuple[float, int, TaskRecord]] = []
        self._seq = itertools.count()
        self.depth: dict[tuple[str, Kind], int] = {}
        self.more = False  # the last round stopped at MAX_PER_ROUND with credits left
        self._room = MAX_PER_ROUND

    def push(self, rec: TaskRecord, now: float) -> None:
        """Queue a PENDING task (at the back, or in the backoff heap if not yet due)."""
        key = (rec.queue, rec.kind)
        self.depth[key] = self.depth.get(key, 0) + 1
        if rec.not_before > now:
            heapq.heappush(self.delayed, (rec.not_before, next(self._seq), rec))
        else:
            self.ready.setdefault(key, deque()).append(rec)

    def push_front(self, rec: TaskRecord) -> None:
        """Queue a task returned unstarted by a draining worker, ahead of the rest."""
        key = (rec.queue, rec.kind)
        self.depth[key] = self.depth.get(key, 0) + 1
        self.ready.setdefault(key, deque()).appendleft(rec)

    def discard(self, rec: TaskRecord) -> None:
        """A pending task left the queue by other means (cancel): fix the depth count.

        The record itself is skipped lazily when it reaches the front.
        """
        key = (rec.queue, rec.kind)
        self.depth[key] = self.depth.get(key, 1) - 1

    def promote(self, now: float) -> None:
        """Move tasks whose backoff has passed to their ready queue."""
        while self.delayed and self.delayed[0][0] <= now:
            _, _, rec = heapq.heappop(self.delayed)
            if rec.state is TaskState.PENDING:
                self.ready.setdefault((rec.queue, rec.kind), deque()).append(rec)

    def next_due_s(self, now: float) -> float | None:
        """Seconds until the earliest delayed task is due (0 while a round left work behind)."""
        if self.more:
            return 0.0
        if not self.delayed:
            return None
        return max(0.0, self.delayed[0][0] - now)

    def pending_count(self) -> int:
        return sum(self.depth.values())

    def assign(self, workers: Iterable[WorkerInfo], now: float) -> dict[bytes, list[TaskRecord]]:
        """One dispatch round: map worker identity -> tasks to send. Does not mutate records."""
        self.promote(now)
        self.more = False
        self._room = MAX_PER_ROUND
        plan: dict[bytes, list[TaskRecord]] = {}
        candidates = [w for w in workers if not w.draining]
        if not candidates:
            return plan
        # One credit count per (worker, kind) for the whole round, shared by all its queues.
        credits: dict[tuple[bytes, Kind], int] = {}
        for (queue, kind), dq in self.ready.items():
            if not dq:
                continue
            eligible = [w for w in candidates if queue in w.queues and w.slots.get(kind, 0) > 0]
            if not eligible:
                continue
            for w in eligible:
                credits.setdefault((w.identity, kind), w.free(kind, self.prefetch))
            # most free credit first; ties keep registry order
            eligible.sort(key=lambda w: -credits[(w.identity, kind)])
            self._fill(queue, kind, dq, eligible, credits, plan)
        return plan

    def _fill(
        self,
        queue: str,
        kind: Kind,
        dq: deque[TaskRecord],
        eligible: list[WorkerInfo],
        credits: dict[tuple[bytes, Kind], int],
        plan: dict[bytes, list[TaskRecord]],
    ) -> None:
        active = [w for w in eligible if credits[(w.identity, kind)] > 0]
        while dq and active:
            still: list[WorkerInfo] = []
            for w in active:
                if self._room <= 0:
                    self.more = True
                    return
                rec = self._pop_live(dq)
                if rec is None:
                    return
                self._room -= 1
                plan.setdefault(w.identity, []).append(rec)
                self.depth[(queue, kind)] -= 1
                credits[(w.identity, kind)] -= 1
                if credits[(w.identity, kind)] > 0:
                    still.append(w)
            active = still

    @staticmethod
    def _pop_live(dq: deque[TaskRecord]) -> TaskRecord | None:
        while dq:
            rec = dq.popleft()
            if rec.state is TaskState.PENDING and rec.worker is None:
                return rec
        return None

    def depths(self) -> dict[tuple[str, Kind], int]:
        return {k: v for k, v in self.depth.items() if v > 0}
