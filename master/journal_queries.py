"""The journal's inspection reads and control writes (TASKS, TASK_SHOW, RESOLVE, TASK_RETRY,
QUEUE_CONTROL), one piece for both backends: each gives its placeholder, its statements where
the dialects differ, and how to run a read."""

from __future__ import annotations

from typing import Any, ClassVar

#: What a task listing (TASKS) reads of a row.
LIST_COLUMNS = "id, name, queue, kind, state, attempt, worker_id, created_at, finished_at, duration_ms"
#: What TASK_SHOW reads of a row.
SHOW_COLUMNS = (
    "id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, created_at,"
    " finished_at, expires_at, value, error, worker_id, duration_ms, priority"
)


class QueryReads:
    """Mixed into a journal (after its Stager, whose ``_ops`` it stages into)."""

    #: the dialect's parameter mark
    P: ClassVar[str]
    #: how the finished listing names its index (SQLite: INDEXED BY), or nothing
    FINISHED_INDEX: ClassVar[str] = ""
    ATTEMPT: ClassVar[str]
    PAUSE: ClassVar[str]
    UNPAUSE: ClassVar[str] = "DELETE FROM paused_queues WHERE queue = {p}"

    _ops: list[tuple[str, tuple[Any, ...] | list[Any]]]

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.replace("{p}", self.P)

    def stage_attempt(
        self,
        task_id: bytes,
        attempt: int,
        worker_id: str | None,
        started_at: float | None,
        ended_at: float | None,
        outcome: str,
    ) -> None:
        """An attempt that ended without finishing its task (rare: retries and lost workers)."""
        self._ops.append((self.ATTEMPT, (task_id, attempt, worker_id, started_at, ended_at, outcome)))

    def list_window(
        self, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Up to ``window`` rows with ``floor <= id < before`` (either bound may be None), newest
        first (columns: LIST_COLUMNS); True when the range holds no more rows than those."""
        where, params = self._id_range(before, floor)
        rows = self._read(
            self._sql(f"SELECT {LIST_COLUMNS} FROM tasks{where} ORDER BY id DESC LIMIT {{p}}"),
            (*params, window + 1),
        )
        return rows[:window], len(rows) <= window

    def list_finished(
        self, state: str, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Like :meth:`list_window`, for the finished rows of one final state (index
        tasks_finished)."""
        where, params = self._id_range(before, floor)
        where = (where + " AND" if where else " WHERE") + " state = {p} AND finished_at IS NOT NULL"
        rows = self._read(
            self._sql(
                f"SELECT {LIST_COLUMNS} FROM tasks{self.FINISHED_INDEX}{where} ORDER BY id DESC LIMIT {{p}}"
            ),
            (*params, state, window + 1),
        )
        return rows[:window], len(rows) <= window

    @staticmethod
    def _id_range(before: bytes | None, floor: bytes | None) -> tuple[str, tuple[bytes, ...]]:
        conds: list[str] = []
        params: list[bytes] = []
        if before is not None:
            conds.append("id < {p}")
            params.append(before)
        if floor is not None:
            conds.append("id >= {p}")
            params.append(floor)
        return (" WHERE " + " AND ".join(conds)) if conds else "", tuple(params)

    def ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        """Ids with ``low <= id <= high``, at most ``limit`` (a prefix lookup on the key)."""
        sql = "SELECT id FROM tasks WHERE id >= {p} AND id <= {p} ORDER BY id LIMIT {p}"
        return [bytes(r[0]) for r in self._read(self._sql(sql), (low, high, limit))]

    def task_row(self, task_id: bytes) -> tuple[Any, ...] | None:
        """One task's whole row (columns: SHOW_COLUMNS), or None."""
        rows = self._read(self._sql(f"SELECT {SHOW_COLUMNS} FROM tasks WHERE id = {{p}}"), (task_id,))
        return rows[0] if rows else None

    def attempts_of(self, task_id: bytes) -> list[tuple[Any, ...]]:
        """(attempt, worker_id, started_at, ended_at, outcome) of its earlier attempts, in order."""
        sql = (
            "SELECT attempt, worker_id, started_at, ended_at, outcome FROM attempts"
            " WHERE task_id = {p} ORDER BY attempt"
        )
        return self._read(self._sql(sql), (task_id,))

    def stage_queue_paused(self, queue: str, paused: bool) -> None:
        self._ops.append((self._sql(self.PAUSE if paused else self.UNPAUSE), (queue,)))

    def paused_queues(self) -> list[str]:
        return [str(r[0]) for r in self._read("SELECT queue FROM paused_queues ORDER BY queue")]
