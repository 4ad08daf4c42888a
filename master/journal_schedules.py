"""The journal's schedules and rate limits (tables of schema version 2), for both backends.

A schedule's row is written whole at every change (add, pause, resume, a fired or skipped
tick), staged like every other write: a fired tick's row and the task it made land in one
commit, so a tick is recorded exactly when its task is.
"""

from __future__ import annotations

from typing import Any, ClassVar

#: The columns of a schedule row, in the order ``stage_schedule`` takes and ``load_schedules``
#: gives them.
SCHEDULE_COLUMNS = (
    "name, task, payload, options, every_s, cron, timezone, catchup, paused, horizon, last_tick,"
    " last_task, created_at"
)


class ScheduleStore:
    """Staging and loading of schedules and rate limits; a backend gives the statements (its
    dialect) and ``_query``."""

    _ops: list[tuple[str, tuple[Any, ...] | list[Any]]]
    SCHEDULE_PUT: ClassVar[str]
    SCHEDULE_DEL: ClassVar[str]
    LIMIT_PUT: ClassVar[str]
    LIMIT_DEL: ClassVar[str]

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def stage_schedule(self, row: tuple[Any, ...]) -> None:
        """Insert or replace a schedule (columns: SCHEDULE_COLUMNS)."""
        self._ops.append((self.SCHEDULE_PUT, row))

    def stage_schedule_removed(self, name: str) -> None:
        self._ops.append((self.SCHEDULE_DEL, (name,)))

    def stage_limit(self, name: str, count: int, period_s: float) -> None:
        self._ops.append((self.LIMIT_PUT, (name, count, period_s)))

    def stage_limit_removed(self, name: str) -> None:
        self._ops.append((self.LIMIT_DEL, (name,)))

    def load_schedules(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._query(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")]

    def load_limits(self) -> list[tuple[str, int, float]]:
        return [
            (str(r[0]), int(r[1]), float(r[2]))
            for r in self._query("SELECT name, count, period_s FROM rate_limits ORDER BY name")
        ]


def sqlite_statements() -> dict[str, str]:
    marks = ", ".join("?" * len(SCHEDULE_COLUMNS.split(",")))
    return {
        "SCHEDULE_PUT": f"INSERT OR REPLACE INTO schedules ({SCHEDULE_COLUMNS}) VALUES ({marks})",
        "SCHEDULE_DEL": "DELETE FROM schedules WHERE name = ?",
        "LIMIT_PUT": "INSERT OR REPLACE INTO rate_limits (name, count, period_s) VALUES (?, ?, ?)",
        "LIMIT_DEL": "DELETE FROM rate_limits WHERE name = ?",
    }


def postgres_statements() -> dict[str, str]:
    cols = [c.strip() for c in SCHEDULE_COLUMNS.split(",")]
    marks = ", ".join(["%s"] * len(cols))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[1:])
    return {
        "SCHEDULE_PUT": f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES ({marks})"
        f" ON CONFLICT (name) DO UPDATE SET {updates}",
        "SCHEDULE_DEL": "DELETE FROM schedules WHERE name = %s",
        "LIMIT_PUT": "INSERT INTO rate_limits (name, count, period_s) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET count = EXCLUDED.count, period_s = EXCLUDED.period_s",
        "LIMIT_DEL": "DELETE FROM rate_limits WHERE name = %s",
    }
