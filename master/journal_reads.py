"""The inspection and control tables both journals keep, and the reads over them: find tasks
(TASKS), resolve id prefixes, one task's row and earlier attempts (TASK_SHOW), paused queues,
and the output and progress of finished tasks.

The SQL is written once, with ``?`` placeholders; a backend runs it through :meth:`_fetch`
(PostgreSQL turns them into ``%s``) and gives the few statements that differ (upserts, an
index hint) as class attributes.
"""

from __future__ import annotations

from typing import Any

#: What a task listing (TASKS) reads of a row.
LIST_COLUMNS = "id, name, queue, kind, state, attempt, worker_id, created_at, finished_at, duration_ms"
#: What TASK_SHOW reads of a row.
SHOW_COLUMNS = (
    "id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, created_at,"
    " finished_at, expires_at, value, error, worker_id, duration_ms, priority"
)


class JournalReads:
    """Mixed into a journal that has ``_ops`` (journal_staging.Stager) and ``_fetch``."""

    _ops: list[tuple[str, tuple[Any, ...] | list[Any]]]
    #: An earlier attempt of a task, inserted or replaced: (task_id, attempt, worker_id,
    #: started_at, ended_at, outcome).
    ATTEMPT: str
    #: A task's output and progress, inserted or replaced: (task_id, output, output_end, progress).
    OUTPUT: str
    #: Pause a queue (queue,), keeping an existing row.
    PAUSE: str
    UNPAUSE = "DELETE FROM paused_queues WHERE queue = ?"
    #: What makes a listing of finished rows use the tasks_finished index.
    FINISHED_HINT = ""

    def _fetch(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    # -- staged writes -----------------------------------------------------------------------
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

    def stage_queue_paused(self, queue: str, paused: bool) -> None:
        self._ops.append((self.PAUSE if paused else self.UNPAUSE, (queue,)))

    def stage_output(self, task_id: bytes, output: str, output_end: int, progress: bytes | None) -> None:
        self._ops.append((self.OUTPUT, (task_id, output, output_end, progress)))

    # -- reads -------------------------------------------------------------------------------
    def list_window(
        self, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Up to ``window`` rows with ``floor <= id < before`` (either bound may be None), newest
        first (columns: LIST_COLUMNS); True when the range holds no more rows than those."""
        where, params = _id_range(before, floor)
        rows = self._fetch(
            f"SELECT {LIST_COLUMNS} FROM tasks{where} ORDER BY id DESC LIMIT ?", (*params, window + 1)
        )
        return rows[:window], len(rows) <= window

    def list_finished(
        self, state: str, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Like :meth:`list_window`, for the finished rows of one final state (index
        tasks_finished)."""
        where, params = _id_range(before, floor)
        where = (where + " AND" if where else " WHERE") + " state = ? AND finished_at IS NOT NULL"
        rows = self._fetch(
            f"SELECT {LIST_COLUMNS} FROM tasks{self.FINISHED_HINT}{where} ORDER BY id DESC LIMIT ?",
            (*params, state, window + 1),
        )
        return rows[:window], len(rows) <= window

    def ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        """Ids with ``low <= id <= high``, at most ``limit`` (a prefix lookup on the key)."""
        rows = self._fetch(
            "SELECT id FROM tasks WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?", (low, high, limit)
        )
        return [bytes(r[0]) for r in rows]

    def task_row(self, task_id: bytes) -> tuple[Any, ...] | None:
        """One task's whole row (columns: SHOW_COLUMNS), or None."""
        rows = self._fetch(f"SELECT {SHOW_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def attempts_of(self, task_id: bytes) -> list[tuple[Any, ...]]:
        """(attempt, worker_id, started_at, ended_at, outcome) of its earlier attempts, in order."""
        return self._fetch(
            "SELECT attempt, worker_id, started_at, ended_at, outcome FROM attempts WHERE task_id = ? ORDER BY attempt",
            (task_id,),
        )

    def paused_queues(self) -> list[str]:
        return [r[0] for r in self._fetch("SELECT queue FROM paused_queues ORDER BY queue")]

    def output_of(self, task_id: bytes) -> tuple[str, int, bytes | None] | None:
        """(output, output_end, progress) of a finished task that wrote or reported anything."""
        rows = self._fetch(
            "SELECT output, output_end, progress FROM task_output WHERE task_id = ?", (task_id,)
        )
        if not rows:
            return None
        output, end, progress = rows[0]
        return output, end, None if progress is None else bytes(progress)

    def progress_of(self, ids: list[bytes]) -> dict[bytes, bytes]:
        """The stored last progress report of each of ``ids`` that has one."""
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._fetch(
            f"SELECT task_id, progress FROM task_output WHERE task_id IN ({marks}) AND progress IS NOT NULL",
            ids,
        )
        return {bytes(r[0]): bytes(r[1]) for r in rows}


def _id_range(before: bytes | None, floor: bytes | None) -> tuple[str, tuple[bytes, ...]]:
    conds: list[str] = []
    params: list[bytes] = []
    if before is not None:
        conds.append("id < ?")
        params.append(before)
    if floor is not None:
        conds.append("id >= ?")
        params.append(floor)
    return (" WHERE " + " AND ".join(conds)) if conds else "", tuple(params)
