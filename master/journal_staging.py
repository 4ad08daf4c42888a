"""Staged journal writes, kept until the next commit (group commit): one piece for both backends.

A backend gives the five statements in its own SQL dialect and writes ``_ops`` in
one transaction at commit; a start staged in the same commit as its task's
insert is folded into the insert (one statement per task instead of two).
"""

from __future__ import annotations

from typing import Any, ClassVar

from poolfleet.common.protocol import TaskState


class Stager:
    """The staging half of a journal; subclasses set the statements and commit ``_ops``."""

    INSERT: ClassVar[str]
    START: ClassVar[str]
    REQUEUE: ClassVar[str]
    FINISH: ClassVar[str]
    DEF: ClassVar[str]
    #: shipped code (see journal.CODE_SCHEMA): store a pickled function, name who shipped a task
    CODE: ClassVar[str]
    SHIPPED_BY: ClassVar[str]

    def __init__(self) -> None:
        self._ops: list[tuple[str, tuple[Any, ...] | list[Any]]] = []
        # inserts staged since the last commit, by id: a start staged in the same commit is
        # folded into the insert
        self._fresh: dict[bytes, list[Any]] = {}

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
        ]
        self._fresh[task_id] = params
        self._ops.append((self.INSERT, params))

    def stage_start(self, task_id: bytes, attempt: int) -> None:
        fresh = self._fresh.get(task_id)
        if fresh is not None:  # inserted in this same commit: insert it as DISPATCHED
            fresh[4] = "DISPATCHED"
            fresh[5] = attempt
            return
        self._ops.append((self.START, (attempt, task_id)))

    def stage_requeue(self, task_id: bytes, failures: int, lost: int) -> None:
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

    def stage_code(
        self, digest: bytes, blob: bytes, python: str, cloudpickle: str, shipped_by: str, stored_at: float
    ) -> None:
        self._ops.append((self.CODE, (digest, blob, python, cloudpickle, shipped_by, stored_at)))

    def stage_shipped_by(self, task_id: bytes, shipped_by: str) -> None:
        """Record which trusted client (its key file, or ``loopback``) submitted a shipped task."""
        self._ops.append((self.SHIPPED_BY, (shipped_by, task_id)))

    @property
    def staged(self) -> int:
        return len(self._ops)

    @staticmethod
    def _write(cur: Any, ops: list[tuple[str, tuple[Any, ...] | list[Any]]]) -> None:
        """Run ``ops`` on ``cur``: one executemany per run of the same statement, in order."""
        i = 0
        while i < len(ops):
            sql = ops[i][0]
            j = i
            while j < len(ops) and ops[j][0] is sql:
                j += 1
            cur.executemany(sql, [p for _, p in ops[i:j]])
            i = j

    def _take(self) -> list[tuple[str, tuple[Any, ...] | list[Any]]]:
        """What was staged, for the commit; staging starts afresh."""
        ops, self._ops = self._ops, []
        self._fresh = {}
        return ops
