"""Staged journal writes, kept until the next commit (group commit): one piece for both backends.

A backend gives the five statements in its own SQL dialect and writes ``_ops`` in
one transaction at commit; a start staged in the same commit as its task's
insert is folded into the insert (one statement per task instead of two).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from poolfleet.common.protocol import TaskState

#: How long the master keeps a task's start staged before writing it (``Stager.start_defer_s``):
#: a task that finishes or goes back within it costs one write (its final row carries the
#: attempt) instead of two, a fifth of the master's work per task in a drain. A start not yet
#: written when the master dies is one that recovery already expects (DISPATCH leaves before
#: the commit that records it): after an unclean stop the reloaded PENDING tasks wait the
#: recovery grace for a worker's HELLO to claim them at the newer attempt.
START_DEFER_S = 1.0

#: A run of at least MANY_MIN operations of a statement with a multi-row form is written as
#: statements of MANY_MAX, MANY_MAX / 2, ... down to MANY_MIN rows (a few forms, each prepared
#: once and kept in the connection's statement cache); what is left, as one executemany. A
#: statement of 512 FINISH rows costs about a sixth less a row than executemany's one statement
#: a row, and gives up the GIL once instead of once a row (bench.journal_finish).
MANY_MIN = 32
MANY_MAX = 512


def _write_many(
    cur: Any,
    ops: list[tuple[str, tuple[Any, ...] | list[Any]]],
    i: int,
    j: int,
    form: Callable[[int], str],
    key: int,
) -> int:
    """Write ``ops[i:j]`` (one statement's run) in multi-row statements, as far as they go;
    return the index of the first operation not written. A run with two rows of one task (a
    task finished twice in a commit) is left to executemany: a statement's rows have no order."""
    if key >= 0 and len({p[key] for _, p in ops[i:j]}) != j - i:
        return i
    while j - i >= MANY_MIN:
        n = MANY_MAX
        while n > j - i:
            n //= 2
        cur.execute(form(n), [x for _, p in ops[i : i + n] for x in p])
        i += n
    return i


class JournalUnavailable(Exception):
    """A journal write failed (a full disk, a damaged file): nothing of it was written, and
    what was staged is staged again for the next commit."""


class Stager:
    """The staging half of a journal; subclasses set the statements and commit ``_ops``."""

    INSERT: ClassVar[str]
    START: ClassVar[str]
    REQUEUE: ClassVar[str]
    FINISH: ClassVar[str]
    DEF: ClassVar[str]
    #: records the time of a commit in the meta table: a write that shows the journal takes
    #: writes again, when nothing else is staged
    MARK: ClassVar[str]
    HOLD: ClassVar[str]
    DUE: ClassVar[str]
    DEPS: ClassVar[str]
    DEPS_DONE: ClassVar[str]
    #: shipped code (see journal.CODE_SCHEMA): store a pickled function, name who shipped a task
    CODE: ClassVar[str]
    SHIPPED_BY: ClassVar[str]
    #: statements with a multi-row form: statement -> (the form for n rows, the index of the
    #: task id in a row, or -1 when rows of the same id may share a statement)
    MANY: ClassVar[dict[str, tuple[Callable[[int], str], int]]] = {}

    def __init__(self) -> None:
        #: 0: a start is written in the next commit; the master sets START_DEFER_S
        self.start_defer_s = 0.0
        self.clock: Callable[[], float] = time.monotonic
        self._ops: list[tuple[str, tuple[Any, ...] | list[Any]]] = []
        # starts staged but not yet due (start_defer_s): id -> attempt, and (due, id, attempt)
        # in the order staged; an entry whose task finished or started again is skipped
        self._starts: dict[bytes, int] = {}
        self._starts_due: deque[tuple[float, bytes, int]] = deque()
        # inserts staged since the last commit, by id: a start staged in the same commit is
        # folded into the insert
        self._fresh: dict[bytes, list[Any]] = {}
        # dependency rows, their removal and due times: written after the other operations of
        # the commit (each after its task's insert), in one run per statement instead of one
        # statement between every two inserts
        self._deps: list[tuple[Any, ...]] = []
        self._deps_done: list[tuple[Any, ...]] = []
        self._due: list[tuple[Any, ...]] = []

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
    ) -> None:
        # retries -1: none given, the default declared by the worker that runs it applies
        params = [
            task_id,
            name,
            queue,
            kind,
            "PENDING",
            0,
            payload,
            timeout_s,
            -1 if retries is None else retries,
            created_at,
            priority,
        ]
        self._fresh[task_id] = params
        self._ops.append((self.INSERT, params))

    def stage_start(self, task_id: bytes, attempt: int) -> None:
        fresh = self._fresh.get(task_id)
        if fresh is not None:  # inserted in this same commit: insert it as DISPATCHED
            fresh[4] = "DISPATCHED"
            fresh[5] = attempt
            return
        if self.start_defer_s <= 0:
            self._ops.append((self.START, (attempt, task_id)))
            return
        self._starts[task_id] = attempt
        self._starts_due.append((self.clock() + self.start_defer_s, task_id, attempt))

    def _start_now(self, task_id: bytes) -> None:
        """Write a deferred start in this commit, ahead of what follows for its task."""
        attempt = self._starts.pop(task_id, None)
        if attempt is not None:
            self._ops.append((self.START, (attempt, task_id)))

    def next_start_due(self) -> float | None:
        """When the oldest deferred start is due (``clock`` time), or None."""
        due = self._starts_due
        while due and self._starts.get(due[0][1]) != due[0][2]:
            due.popleft()  # finished or requeued since
        return due[0][0] if due else None

    def stage_requeue(self, task_id: bytes, failures: int, lost: int) -> None:
        self._start_now(task_id)  # the attempt that ended is recorded before the requeue
        self._ops.append((self.REQUEUE, (failures, lost, task_id)))

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
    ) -> None:
        self._starts.pop(task_id, None)  # the final row carries the attempt
        self._ops.append(
            (
                self.FINISH,
                (
                    state.value,
                    attempt,
                    value,
                    error,
                    finished_at,
                    expires_at,
                    worker_id,
                    duration_ms,
                    task_id,
                ),
            )
        )

    def stage_task_def(self, name: str, kind: str, timeout_s: float | None, retries: int) -> None:
        self._ops.append((self.DEF, (name, kind, timeout_s, retries)))

    def stage_mark(self, wall: float) -> None:
        self._ops.append((self.MARK, (repr(wall),)))

    def stage_hold(self, task_id: bytes, state: TaskState, payload: bytes | None = None) -> None:
        """A held task changes state (WAITING, DELAYED or PENDING), with its arguments (the
        results of its dependencies in place) when given."""
        fresh = self._fresh.get(task_id)
        if fresh is not None:  # inserted in this same commit
            fresh[4] = state.value
            if payload is not None:
                fresh[6] = payload
            return
        self._ops.append((self.HOLD, (state.value, payload, task_id)))

    def stage_due(self, task_id: bytes, due_at: float) -> None:
        """The wall-clock time (epoch seconds) a DELAYED task is due."""
        self._due.append((due_at, task_id))

    def stage_deps(self, task_id: bytes, deps: list[tuple[bytes, bool]]) -> None:
        """The tasks a WAITING task depends on (True: its result is passed in the arguments)."""
        self._deps.extend((task_id, dep, int(ref)) for dep, ref in deps)

    def stage_deps_done(self, task_id: bytes) -> None:
        """The task has started or finished: the results it depended on may expire."""
        self._deps_done.append((task_id,))

    def stage_code(
        self, digest: bytes, blob: bytes, python: str, cloudpickle: str, shipped_by: str, stored_at: float
    ) -> None:
        self._ops.append((self.CODE, (digest, blob, python, cloudpickle, shipped_by, stored_at)))

    def stage_shipped_by(self, task_id: bytes, shipped_by: str) -> None:
        """Record which trusted client (its key file, or ``loopback``) submitted a shipped task."""
        self._ops.append((self.SHIPPED_BY, (shipped_by, task_id)))

    @property
    def staged(self) -> int:
        return len(self._ops) + len(self._deps) + len(self._deps_done) + len(self._due)

    def _write(self, cur: Any, ops: list[tuple[str, tuple[Any, ...] | list[Any]]]) -> None:
        """Run ``ops`` on ``cur`` in order: a run of the same statement as one executemany, or,
        for a statement with a multi-row form (``MANY``), as few statements of many rows each."""
        i = 0
        while i < len(ops):
            sql = ops[i][0]
            j = i
            while j < len(ops) and ops[j][0] is sql:
                j += 1
            many = self.MANY.get(sql)
            if many is not None and j - i >= MANY_MIN:
                i = _write_many(cur, ops, i, j, *many)
            if i < j:
                cur.executemany(sql, [p for _, p in ops[i:j]])
            i = j

    def _restore(self, ops: list[tuple[str, tuple[Any, ...] | list[Any]]]) -> None:
        """A commit of ``ops`` failed: stage them again, ahead of anything staged since."""
        self._ops = ops + self._ops

    def unstage_inserts(self, ids: set[bytes]) -> None:
        """Forget the staged inserts of ``ids`` (tasks withdrawn after a failed commit), and
        what was staged for those tasks: their dependency rows, due times and holds."""
        if not ids:
            return
        # where each statement carries its task's id
        at = {self.INSERT: 0, self.DEPS: 0, self.DUE: 1, self.HOLD: 2}
        self._ops = [op for op in self._ops if not (op[0] in at and op[1][at[op[0]]] in ids)]
        self._deps = [r for r in self._deps if r[0] not in ids]
        self._due = [r for r in self._due if r[1] not in ids]
        for tid in ids:
            self._fresh.pop(tid, None)
            self._starts.pop(tid, None)

    def _take(self, final: bool = False) -> list[tuple[str, tuple[Any, ...] | list[Any]]]:
        """What was staged, for the commit, with the deferred starts now due (``final``: all of
        them, for the last commit before a clean stop); staging starts afresh."""
        if self._starts:
            now = self.clock()
            due, starts = self._starts_due, self._starts
            while due and (final or due[0][0] <= now):
                _, tid, attempt = due.popleft()
                if starts.get(tid) == attempt:
                    del starts[tid]
                    self._ops.append((self.START, (attempt, tid)))
        ops, self._ops = self._ops, []
        self._fresh = {}
        # a task's dependency rows go before their removal (a task may start in the commit
        # that holds its submit); neither touches the rows the other operations write
        for sql, rows in ((self.DEPS, self._deps), (self.DEPS_DONE, self._deps_done), (self.DUE, self._due)):
            ops.extend((sql, r) for r in rows)
        self._deps, self._deps_done, self._due = [], [], []
        return ops
