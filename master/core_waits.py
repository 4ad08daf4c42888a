"""Tasks the master holds back: WAITING for other tasks, DELAYED until their time (pure logic).

A submit may name tasks whose results stand in its arguments (task references, see
common/codec.py), tasks it only comes after (``after``), and a due time (``delay_s`` from
now, or an absolute ``eta``, wall-clock epoch seconds). Such a task is WAITING while a task
it depends on is open; when all have SUCCEEDED, their results are put in place of the
references and it becomes DELAYED (its time has not come) or PENDING. When one of them ends
otherwise, the task ends at once (FAILED, or CANCELLED after a cancelled one) with a
``DependencyFailed`` error naming it, and so, in turn, do the tasks waiting on it.

The ids are made by the clients before the submit, and a dependency must be known to the
master when the task that names it arrives: a task can only depend on tasks submitted before
it, so no cycle can form.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, EncodeError, ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import ErrorCode, TaskState
from poolfleet.master.core_base import CoreState, task_route
from poolfleet.master.state import Finish, TaskRecord

log = structlog.get_logger("pmaster")

#: Tasks one task may depend on (references and ``after`` together).
MAX_DEPS = 10_000
#: The value of a task that succeeded with no value recorded (msgpack nil).
_NIL = codec.pack(None)
#: SUBMIT entry fields that make a task wait.
HOLD_FIELDS = ("refs", "after", "delay_s", "eta")


@dataclass(slots=True)
class Wait:
    """A WAITING task: how many of its dependencies are still open, and what it has of them."""

    remaining: int
    refs: bool  # its payload holds references: keep the results of its dependencies
    due: float | None  # wall clock, epoch seconds
    values: dict[bytes, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class Hold:
    """What a submit asks: its dependencies and their state now, and its due time."""

    deps: list[tuple[bytes, bool]]  # (id, its result is passed)
    open: list[bytes]
    values: dict[bytes, bytes]
    failed: tuple[bytes, str, dict[str, Any] | None] | None
    due: float | None
    refs: bool


def dependency_error(dep: bytes, state: str, error: dict[str, Any] | None) -> dict[str, Any]:
    """The error of a task whose dependency ``dep`` ended in ``state`` (not SUCCEEDED)."""
    why = ""
    if error and error.get("message"):
        why = f" ({error.get('type')}: {error.get('message')})"
    return {
        "type": "DependencyFailed",
        "message": f"task {format_id(dep)} it depends on ended {state}{why}",
        "traceback": "",
        "dependency": format_id(dep),
        "dependency_state": state,
    }


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _due(entry: dict[str, Any], wall: float) -> float | None:
    """The due time a submit asks for (None: none, or already come)."""
    due = None
    delay = entry.get("delay_s")
    if delay is not None:
        delay = float(delay)
        if not (math.isfinite(delay) and delay >= 0):
            raise _bad("delay_s must be a finite number of seconds, 0 or more")
        due = wall + delay
    eta = entry.get("eta")
    if eta is not None:
        eta = float(eta)
        if not math.isfinite(eta):
            raise _bad("eta must be a finite time (seconds since the epoch, UTC)")
        due = eta if due is None else max(due, eta)
    return due if due is not None and due > wall else None


def _requested(entry: dict[str, Any]) -> tuple[list[bytes], set[bytes]]:
    """The tasks a submit depends on, in order, and those whose results it is passed."""
    refs: list[bytes] = []
    if entry.get("refs"):
        try:
            refs = codec.refs_in(entry["payload"])
        except DecodeError as exc:
            raise _bad(f"payload with task references: {exc}") from None
    after = entry.get("after") or []
    if not all(isinstance(a, bytes) and len(a) == 16 for a in after):
        raise _bad("after must be a list of 16-byte task ids")
    deps = list(dict.fromkeys([*refs, *after]))
    if len(deps) > MAX_DEPS:
        raise _bad(f"a task may depend on at most {MAX_DEPS} tasks, not {len(deps)}")
    if entry["id"] in deps:
        raise _bad("a task cannot depend on itself")
    return deps, set(refs)


class WaitEvents(CoreState):
    """Holding tasks back, and letting them go."""

    def hold_plan(self, entry: dict[str, Any], wall: float) -> Hold | None:
        """What holds this submitted task back (None: nothing); ProtocolError if it cannot be."""
        deps, ref_set = _requested(entry)
        due = _due(entry, wall)
        if not deps and due is None:
            return None
        hold = Hold([(d, d in ref_set) for d in deps], [], {}, None, due, bool(ref_set))
        final: dict[bytes, tuple[str, bytes | None, dict[str, Any] | None]] = {}
        lookup = []
        for dep in deps:
            if dep in self.tasks:
                hold.open.append(dep)
            elif dep in self.unflushed:
                e = self.unflushed[dep]
                final[dep] = (e["state"], e.get("value"), e.get("error"))
            else:
                lookup.append(dep)
        if lookup:
            rows = self.journal.results(lookup)
            unknown = [d for d in lookup if d not in rows]
            if unknown:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_ID,
                    f"depends on task {format_id(unknown[0])}, which the master does not know "
                    "(never submitted, or its result expired)",
                )
            for dep, row in rows.items():
                final[dep] = (row[2], row[4], codec.unpack(row[5]) if row[5] is not None else None)
        for dep, (state, value, error) in final.items():
            if state != TaskState.SUCCEEDED:
                hold.failed = hold.failed or (dep, state, error)
            elif dep in ref_set:
                hold.values[dep] = value if value is not None else _NIL
        return hold

    def hold(self, rec: TaskRecord, plan: Hold, wall: float) -> None:
        """Hold a task just submitted (and staged) back, as ``plan`` says."""
        if plan.failed is not None:
            dep, state, error = plan.failed
            self._fail_dependent(rec, dep, state, error, wall)
            return
        if plan.due is not None:
            self.journal.stage_due(rec.id, plan.due)
        if not plan.open:  # its dependencies have all succeeded already
            self._wake(rec, Wait(0, plan.refs, plan.due, plan.values), wall)
            return
        rec.state = TaskState.WAITING
        self.waits[rec.id] = Wait(len(plan.open), plan.refs, plan.due, plan.values)
        for dep in plan.open:
            self.dependents.setdefault(dep, []).append(rec.id)
        self.journal.stage_hold(rec.id, TaskState.WAITING)
        self.journal.stage_deps(rec.id, plan.deps)
        self.deps_held.add(rec.id)

    def _fail_dependent(
        self, rec: TaskRecord, dep: bytes, state: str, error: dict[str, Any] | None, wall: float
    ) -> None:
        final = TaskState.CANCELLED if state == TaskState.CANCELLED else TaskState.FAILED
        self._finish(rec, Finish(final, error=dependency_error(dep, state, error)), None, None, wall)

    def _wake(self, rec: TaskRecord, w: Wait, wall: float) -> None:
        """All its dependencies succeeded: their results go in place, and it goes on."""
        self.waits.pop(rec.id, None)
        payload = None
        if w.refs:
            try:
                payload = codec.substitute_refs(rec.payload, w.values)
            except (DecodeError, EncodeError) as exc:
                error = {
                    "type": "DependencyFailed",
                    "message": f"the results of its dependencies cannot stand in its arguments: {exc}",
                    "traceback": "",
                }
                self._finish(rec, Finish(TaskState.FAILED, error=error), None, None, wall)
                return
            rec.payload = payload
            rec.route = task_route(rec.name, payload)
        if w.due is not None and w.due > wall:
            self._delay(rec, w.due)
            self.journal.stage_hold(rec.id, TaskState.DELAYED, payload)
        else:
            rec.state = TaskState.PENDING
            self.journal.stage_hold(rec.id, TaskState.PENDING, payload)
            self.scheduler.push(rec, self.last_now)

    def _delay(self, rec: TaskRecord, due: float) -> None:
        rec.state = TaskState.DELAYED
        self.delayed_n += 1
        heapq.heappush(self.delayed, (due, rec.id))

    def release_due(self, wall: float) -> None:
        """DELAYED tasks whose time has come become PENDING (the journal keeps them DELAYED
        until they start: recovery lets those past their time go at once)."""
        heap = self.delayed
        while heap and heap[0][0] <= wall:
            _, tid = heapq.heappop(heap)
            rec = self.tasks.get(tid)
            if rec is None or rec.state is not TaskState.DELAYED:
                continue  # cancelled meanwhile
            self.delayed_n -= 1
            rec.state = TaskState.PENDING
            self.scheduler.push(rec, self.last_now)

    def next_due_s(self) -> float | None:
        """Seconds until the next DELAYED task is due (by the last wall time seen)."""
        if not self.delayed:
            return None
        return max(0.0, self.delayed[0][0] - self.last_wall)

    def _settle(self, tid: bytes, decision: Finish, wall: float) -> None:
        """``tid`` has finished: the tasks waiting on it go on, or end (and theirs, in turn:
        through a work list, never by recursion, so a long chain costs no stack)."""
        self._cascade.append((tid, decision))
        if self._cascading:
            return
        self._cascading = True
        try:
            while self._cascade:
                dep, d = self._cascade.pop()
                for wid in self.dependents.pop(dep, ()):
                    w = self.waits.get(wid)
                    rec = self.tasks.get(wid)
                    if w is None or rec is None:
                        continue  # it ended meanwhile (cancelled, or another dependency failed)
                    if d.state is not TaskState.SUCCEEDED:
                        self._fail_dependent(rec, dep, d.state.value, d.error, wall)
                        continue
                    if w.refs:
                        w.values[dep] = d.value if d.value is not None else _NIL
                    w.remaining -= 1
                    if w.remaining <= 0:
                        self._wake(rec, w, wall)
        finally:
            self._cascading = False

    def recover_holds(
        self,
        waiting: dict[bytes, float | None],
        deps: Iterable[tuple[bytes, bytes, int]],
        wall: float,
    ) -> None:
        """After the open tasks are loaded: the WAITING ones (id -> due time) wait again on
        the dependencies the journal names; those whose dependencies have all ended go on or
        end now."""
        by_task: dict[bytes, list[tuple[bytes, bool]]] = {}
        for tid, dep, ref in deps:
            by_task.setdefault(tid, []).append((dep, bool(ref)))
        for tid in by_task:
            if tid in self.tasks:
                self.deps_held.add(tid)
            else:
                self.journal.stage_deps_done(tid)  # left over: its task has finished
        needed = [d for t in waiting for d, _ in by_task.get(t, ()) if d not in self.tasks]
        rows = self.journal.results(needed) if needed else {}
        failed: list[tuple[bytes, bytes, str, dict[str, Any] | None]] = []
        for tid, due in waiting.items():
            own = by_task.get(tid, [])
            w = Wait(0, any(r for _, r in own), due)
            self.waits[tid] = w
            for dep, _ in own:
                if dep in self.tasks:
                    w.remaining += 1
                    self.dependents.setdefault(dep, []).append(tid)
                    continue
                row = rows.get(dep)
                if row is None:
                    failed.append((tid, dep, "EXPIRED", {"type": "Expired", "message": "result not kept"}))
                elif row[2] != TaskState.SUCCEEDED:
                    err = codec.unpack(row[5]) if row[5] is not None else None
                    failed.append((tid, dep, row[2], err))
                elif w.refs:
                    w.values[dep] = row[4] if row[4] is not None else _NIL
        for tid, dep, state, error in failed:
            rec = self.tasks.get(tid)
            if rec is not None and tid in self.waits:
                self._fail_dependent(rec, dep, state, error, wall)
        for tid in list(waiting):
            w2 = self.waits.get(tid)
            if w2 is not None and w2.remaining == 0:
                self._wake(self.tasks[tid], w2, wall)
