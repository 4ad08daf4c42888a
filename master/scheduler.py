"""Which pending task goes to which worker (pure logic, injected clock).

Pending tasks wait in one FIFO per (queue, kind, task name, priority): a lane;
tasks waiting for a retry backoff wait in a heap until they are due. Within a
(queue, kind) the lane heads are merged by (-priority, seq): higher priority
first, then the oldest; a task of the default priority costs what it did before
priorities (one deque append and pop, one heap step per batch). A task goes only to a worker
that serves its queue, has slots of its kind and offers its name. A dispatch
round hands each worker at most its free credits per kind, spreading tasks
across workers. (A chunk of calls routes by the function it calls: ``route``.)
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Collection, Iterable

from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master.ratelimit import RateLimits
from poolfleet.master.registry import INFLIGHT_BUDGET, FleetCounts, WorkerInfo
from poolfleet.master.state import TaskRecord
from poolfleet.master.tasktable import ColdBatch, TaskTable

#: At most this many tasks go out per dispatch round, so a round and the commit after it stay
#: short (the loop answers STATUS between rounds); the rest goes out in the next rounds.
MAX_PER_ROUND = 1000
#: The priorities a task may have (higher first; 0 the default). A bounded range keeps the
#: number of lanes per task name, and so the heap of lane heads, small.
PRIORITY_MIN, PRIORITY_MAX = -100, 100
#: Prefetch credit is handed out up to this many tasks to one worker at a time: a thousand
#: workers of tiny tasks then get a few dozen tasks per DISPATCH, not one each (a message per
#: task cost the drain two thirds of its rate).
PICK_BATCH = 32
#: A dispatch round looks only at the workers that may have credit left (``WorkerInfo.wants``)
#: unless new work came (a push, a promotion) or this long has passed since it looked at all.
#: At a thousand workers a round over every one cost 2-3 ms, and a draining master makes a
#: round every loop turn.
FULL_ROUND_S = 0.1
#: While the master is behind with the workers' messages (its last read stopped with more
#: waiting), a round sends at most as many tasks as have left the workers since the round
#: before, and at least this many: tasks sent then only wait at the workers, or their results
#: in the master's own queue, and each one more at a worker spreads the journal's writes of a
#: commit wider (a thousand workers: 50,000 tasks at workers instead of 2,000, and 40 us of
#: master CPU per task instead of 25).
BEHIND_MIN_ROUND = 50


class Scheduler:
    """Pending queues and the dispatch decision."""

    def __init__(
        self, prefetch: int, counts: FleetCounts | None = None, table: TaskTable | None = None
    ) -> None:
        self.prefetch = prefetch
        #: the master's task table: a task queued cold (by id) is thawed from it at the front
        self.table = TaskTable() if table is None else table
        #: the tasks at the registered workers (the registry's counts), for INFLIGHT_BUDGET
        self.counts = FleetCounts() if counts is None else counts
        #: ready tasks per lane: (queue, kind, route, priority); a cold task by its id
        self.ready: dict[tuple[str, Kind, str, int], deque[TaskRecord | bytes]] = {}
        #: pending tasks per (queue, kind, name), ready or delayed
        self.by_name: dict[tuple[str, Kind, str], int] = {}
        self.delayed: list[tuple[float, int, TaskRecord]] = []
        # FIFO order within a (queue, kind) across names: each ready task gets the next number;
        # tasks put back at the front get ever smaller (negative) ones
        self._seq = itertools.count(1)
        self._front = itertools.count(-1, -1)
        self.depth: dict[tuple[str, Kind], int] = {}
        self.more = False  # the last round stopped at MAX_PER_ROUND with credits left
        self._room = MAX_PER_ROUND
        self._round = 0
        #: queues paused by an operator: their tasks stay pending, none is dispatched
        self.paused: set[str] = set()
        #: fleet-wide rate limits per task name (enforced here, at dispatch)
        self.limits = RateLimits()
        self._now = 0.0
        #: when the earliest name held back by its rate limit in the last round may start again
        #: (the round at or after it looks at every worker)
        self._limited_until = math.inf
        self._full_due = True  # new work: the next round looks at every worker
        self._turn = 0  # where the rotation of _in_turn stands
        self._last_full = -math.inf
        #: the last round's room was cut to what the fleet's in-flight budget had left
        self._at_budget = False
        #: tasks that left a worker (finished, returned, lost) since the last round
        self.returned = 0
        #: the workers whose credit this round has counted, by identity
        self._looked: dict[bytes, WorkerInfo] = {}
        #: the workers serving each (queue, kind), for the registry version they were found at
        self._serving: dict[tuple[str, Kind], list[WorkerInfo]] = {}
        self._serving_version: int | None = None

    def push(self, rec: TaskRecord, now: float) -> None:
        """Queue a PENDING task (at the back, or in the backoff heap if not yet due)."""
        self._count(rec, 1)
        if rec.not_before > now:
            heapq.heappush(self.delayed, (rec.not_before, next(self._seq), rec))
        else:
            rec.seq = next(self._seq)
            self._lane(rec).append(rec)
            self._full_due = True

    def new_seq(self) -> int:
        """The next FIFO number (a cold batch takes one for all its tasks)."""
        return next(self._seq)

    def push_cold(self, tid: bytes, batch: ColdBatch) -> None:
        """Queue a task kept cold in the task table (``TaskTable.put_cold``) at the back."""
        self._count_in(batch.queue, batch.kind, batch.route, 1)
        key = (batch.queue, batch.kind, batch.route, batch.priority)
        lane = self.ready.get(key)
        if lane is None:
            lane = self.ready[key] = deque()
        lane.append(tid)
        self._full_due = True

    def _lane(self, rec: TaskRecord) -> deque[TaskRecord | bytes]:
        key = (rec.queue, rec.kind, rec.route, rec.priority)
        lane = self.ready.get(key)
        if lane is None:
            lane = self.ready[key] = deque()
        return lane

    def _count(self, rec: TaskRecord, n: int) -> None:
        self._count_in(rec.queue, rec.kind, rec.route, n)

    def _count_in(self, queue: str, kind: Kind, route: str, n: int) -> None:
        key = (queue, kind)
        self.depth[key] = self.depth.get(key, 0) + n
        nkey = (queue, kind, route)
        left = self.by_name.get(nkey, 0) + n
        if left > 0:
            self.by_name[nkey] = left
        else:
            self.by_name.pop(nkey, None)

    def push_front(self, rec: TaskRecord) -> None:
        """Queue a task returned unstarted by a draining worker, ahead of the rest."""
        self._count(rec, 1)
        rec.seq = next(self._front)
        self._lane(rec).appendleft(rec)
        self._full_due = True

    def discard(self, rec: TaskRecord) -> None:
        """A pending task left the queue by other means (cancel): fix the depth count.

        The record itself is skipped lazily when it reaches the front.
        """
        self._count(rec, -1)

    def promote(self, now: float) -> None:
        """Move tasks whose backoff has passed to their ready queue."""
        while self.delayed and self.delayed[0][0] <= now:
            _, _, rec = heapq.heappop(self.delayed)
            if rec.state is TaskState.PENDING:
                rec.seq = next(self._seq)
                self._lane(rec).append(rec)
                self._full_due = True

    def look_at_all(self) -> None:
        """Make the next round look at every worker (a queue resumed, a limit changed)."""
        self._full_due = True

    def next_due_s(self, now: float) -> float | None:
        """Seconds until the earliest delayed task is due (0 while a round left work behind)."""
        if self.more:
            return 0.0
        # a time already past is stale: no round has run since (no worker connected)
        due = self._limited_until if self._limited_until > now else math.inf
        if self.delayed:
            due = min(due, self.delayed[0][0])
        if due == math.inf:
            return None
        return max(0.0, due - now)

    def pending_count(self) -> int:
        return sum(self.depth.values())

    def assign(
        self,
        workers: Collection[WorkerInfo],
        now: float,
        behind: bool = False,
        version: int | None = None,
    ) -> dict[bytes, list[TaskRecord]]:
        """One dispatch round: map worker identity -> tasks to send. Does not mutate records
        (but for the round mark that keeps a record queued twice from being planned twice).
        ``behind``: the master has messages of the workers still to read (BEHIND_MIN_ROUND).
        ``version``: the registry's (``WorkerRegistry.version``): while it stays the same, the
        workers serving each (queue, kind) are those of the last round that asked (None:
        found anew)."""
        self.promote(now)
        self._round += 1
        self._now = now
        self.more = False
        self._room = MAX_PER_ROUND
        if behind:
            self._room = min(MAX_PER_ROUND, max(BEHIND_MIN_ROUND, self.returned))
        self.returned = 0
        plan: dict[bytes, list[TaskRecord]] = {}
        if not any(self.ready.values()):  # nothing ready: no need to look at a worker
            return plan
        if all(w.draining for w in workers):
            return plan
        at_workers = self.counts.at_workers
        # The fleet's in-flight budget bounds the tasks at all workers together, not a share of
        # each: a round's tasks then go to as few workers as their credit allows, in one
        # DISPATCH each (a share of 100 each at a thousand workers cost ten DISPATCH and ten
        # TASK_RESULTS messages a round where a hundred workers cost one of each).
        self._at_budget = INFLIGHT_BUDGET - at_workers < self._room
        if self._at_budget:
            self._room = max(0, INFLIGHT_BUDGET - at_workers)
            if not self._room:  # the next round comes when tasks leave the workers
                return plan
        full = self._full_due or now - self._last_full >= FULL_ROUND_S or now >= self._limited_until
        if full:
            self._full_due, self._last_full = False, now
        if version is None or version != self._serving_version:
            self._serving = {}
            self._serving_version = version
        self._limited_until = math.inf  # this round finds the names held back anew
        credits: dict[tuple[bytes, Kind], int] = {}
        self._looked = {}
        # the round's candidates: every worker not draining (full), or those that may want
        complete = self._round_over(workers, full, plan, credits)
        for w in self._looked.values():
            left = [credits.get((w.identity, k)) for k in w.slots]
            if any(c is not None and c > 0 for c in left):
                w.wants = True
            elif complete or None not in left:
                # no credit left, or none wanted: nothing for it until a task leaves it or new
                # work comes (a round cut short at MAX_PER_ROUND keeps those it did not reach)
                w.wants = False
        if complete:  # the candidates the round did not need to look at have nothing to get
            for w in workers:
                if (full or w.wants) and not w.draining and w.identity not in self._looked:
                    w.wants = False
        return plan

    def _serving_of(self, queue: str, kind: Kind, workers: Collection[WorkerInfo]) -> list[WorkerInfo]:
        """The workers not draining that serve ``queue`` with slots of ``kind``, in registry
        order; kept while the registry's version stays (a round at a thousand workers found
        them in a pass over every worker, twice, for the one or two it then needed)."""
        key = (queue, kind)
        found = self._serving.get(key)
        if found is None:
            found = [w for w in workers if not w.draining and queue in w.queues and w.slots.get(kind, 0) > 0]
            self._serving[key] = found
        return found

    def _round_over(
        self,
        workers: Collection[WorkerInfo],
        full: bool,
        plan: dict[bytes, list[TaskRecord]],
        credits: dict[tuple[bytes, Kind], int],
    ) -> bool:
        """Plan for the candidates among ``workers`` (``full``: all of them, else those that
        may want); False if the round stopped at MAX_PER_ROUND."""
        groups: dict[tuple[str, Kind], list[tuple[str, int]]] = {}
        for (queue, kind, name, prio), dq in self.ready.items():
            if dq and queue not in self.paused:
                groups.setdefault((queue, kind), []).append((name, prio))
        # One credit count per (worker, kind) for the whole round, shared by all its queues.
        complete = True
        for (queue, kind), names in groups.items():
            serving = self._serving_of(queue, kind, workers)
            if len(serving) > 1 and self.depth.get((queue, kind), 0) >= self._room:
                # A backlog bigger than the round: every worker gets filled over the next
                # rounds anyway, so this round looks at the workers in turn (a rotation that
                # goes on in the next round) only until their credit covers the round. Looking
                # at all of them each round cost a thousand workers 2-3 ms a round, and spread
                # the round over them one task (one DISPATCH) each.
                serving, whole = self._in_turn(serving, kind, credits, full)
                complete = complete and whole
            else:
                if not full:
                    serving = [w for w in serving if w.wants]
                for w in serving:
                    key = (w.identity, kind)
                    if key not in credits:
                        credits[key] = w.free(kind, self.prefetch)
                        self._looked[w.identity] = w
            serving = [w for w in serving if credits[(w.identity, kind)] > 0]
            if not serving:
                continue
            # most free credit first; ties keep registry order
            serving.sort(key=lambda w: -credits[(w.identity, kind)])
            # first to slots that can start a task now, then to prefetch credit: a task never
            # queues behind a busy worker's work while another worker has a slot free for it
            idle = {
                (w.identity, kind): min(credits[(w.identity, kind)], max(0, w.idle(kind))) for w in serving
            }
            for budget in (idle, credits):
                if not self._fill(queue, kind, names, serving, budget, credits, plan):
                    return False
        if not complete and not self._at_budget:
            self.more = True  # workers not looked at: the next round goes on with them
        return complete

    def _in_turn(
        self, serving: list[WorkerInfo], kind: Kind, credits: dict[tuple[bytes, Kind], int], full: bool
    ) -> tuple[list[WorkerInfo], bool]:
        """The candidates (``full``: all, else those that may want) from the rotation's place
        on, until their credit covers the round's room; True if that took all of them."""
        n = len(serving)
        start = self._turn % n
        chosen: list[WorkerInfo] = []
        total = 0
        for step in range(n):
            w = serving[(start + step) % n]
            if not (full or w.wants):
                continue
            key = (w.identity, kind)
            c = credits.get(key)
            if c is None:
                c = credits[key] = w.free(kind, self.prefetch)
                self._looked[w.identity] = w
            chosen.append(w)
            total += max(0, c)
            if total >= self._room:
                self._turn = start + step + 1
                return chosen, step == n - 1
        self._turn = start
        return chosen, True

    def _fill(
        self,
        queue: str,
        kind: Kind,
        lanes: list[tuple[str, int]],
        serving: list[WorkerInfo],
        budget: dict[tuple[bytes, Kind], int],
        credits: dict[tuple[bytes, Kind], int],
        plan: dict[bytes, list[TaskRecord]],
    ) -> bool:
        """Hand out one (queue, kind)'s ready tasks, highest priority first, then oldest first
        across names, each to the next worker in turn that offers its name and has ``budget``
        left (taken from its credits too). A name at its rate limit waits (its lane leaves the
        round; the others go on). False: the round is full."""
        # heads: (-priority, seq of the lane's head, index of the lane in ``live``)
        live: list[tuple[str, deque[TaskRecord | bytes]]] = []
        heads: list[tuple[int, int, int]] = []
        for name, prio in lanes:
            if any(w.offers_name(name) for w in serving):
                lane = self.ready[(queue, kind, name, prio)]
                rec = self._peek_live(lane)
                if rec is not None:
                    heads.append((-prio, rec.seq, len(live)))
                    live.append((name, lane))
        heapq.heapify(heads)
        left = sum(budget[(w.identity, kind)] for w in serving)
        cursor, n = 0, len(serving)
        limits = self.limits
        limited = bool(limits.by_name)
        while heads and left > 0:
            neg_prio, _, at = heads[0]
            name, dq = live[at]
            chosen = None
            for step in range(n):
                w = serving[(cursor + step) % n]
                if budget[(w.identity, kind)] > 0 and w.offers_name(name):
                    chosen = w
                    cursor = (cursor + step + 1) % n
                    break
            if chosen is None:  # nobody with credit left offers it: it waits for the next round
                heapq.heappop(heads)
                continue
            if self._room <= 0:
                # full: the next round comes at once, unless the budget cut it (then it comes
                # when tasks leave the workers)
                self.more = not self._at_budget
                return False
            # prefetch credit goes out in batches (one message carries them), free slots one
            # at a time in turn, so that work spreads over idle workers first
            take = 1 if budget is not credits else min(PICK_BATCH, budget[(chosen.identity, kind)])
            allowed = limits.allowance(name, self._now) if limited else None
            if allowed is not None:
                if allowed <= 0:  # at its rate limit: it waits until the window lets it start
                    heapq.heappop(heads)
                    self._limited_until = min(self._limited_until, limits.opens_at(name, self._now))
                    continue
                take = min(take, allowed)
            key = (chosen.identity, kind)
            batch = plan.setdefault(chosen.identity, [])
            nxt: TaskRecord | None = self._peek_live(dq)  # the live head peeked before
            while nxt is not None and take > 0 and self._room > 0:
                rec = nxt
                dq.popleft()
                rec.planned = self._round
                self._room -= 1
                batch.append(rec)
                self.depth[(queue, kind)] -= 1
                self._uncount_name((queue, kind, name))
                credits[key] -= 1
                if budget is not credits:
                    budget[key] -= 1
                left -= 1
                take -= 1
                if allowed is not None:
                    limits.took(name, self._now)
                nxt = self._peek_live(dq)
            if nxt is None:
                heapq.heappop(heads)
            else:
                heapq.heapreplace(heads, (neg_prio, nxt.seq, at))
        return True

    def _peek_live(self, dq: deque[TaskRecord | bytes]) -> TaskRecord | None:
        """The first record of ``dq`` still to dispatch; dead ones (cancelled, adopted, planned
        this round through a second entry) are dropped on the way. A cold task at the front
        becomes its record there."""
        while dq:
            head = dq[0]
            if isinstance(head, bytes):
                found = self.table.resolve(head)
                if found is None:  # left while cold (cancelled, withdrawn)
                    dq.popleft()
                    continue
                dq[0] = rec = found
            else:
                rec = head
            if rec.state is TaskState.PENDING and rec.worker is None and rec.planned != self._round:
                return rec
            dq.popleft()
        return None

    def _uncount_name(self, nkey: tuple[str, Kind, str]) -> None:
        left = self.by_name.get(nkey, 0) - 1
        if left > 0:
            self.by_name[nkey] = left
        else:
            self.by_name.pop(nkey, None)

    def unserved(self, workers: Iterable[WorkerInfo]) -> list[dict[str, object]]:
        """Pending (queue, kind, name) groups that no connected worker can take."""
        ws = list(workers)
        out: list[dict[str, object]] = []
        for (queue, kind, name), n in sorted(self.by_name.items()):
            if not any(queue in w.queues and w.slots.get(kind, 0) > 0 and w.offers_name(name) for w in ws):
                out.append({"name": name, "queue": queue, "kind": kind.value, "pending": n})
        return out

    def depths(self) -> dict[tuple[str, Kind], int]:
        return {k: v for k, v in self.depth.items() if v > 0}
