"""The master's embedded journal: one SQLite file (WAL) holding every task and result.

Writes are staged and committed together once per loop turn (group commit);
the master acknowledges a submit only after the commit that holds it. This is
the default backend; journal_pg.py keeps the same tables in PostgreSQL and
journal_api.py names the interface both offer.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from poolfleet.common.errors import ConfigError
from poolfleet.master.journal_reads import LIST_COLUMNS, SHOW_COLUMNS, JournalReads
from poolfleet.master.journal_staging import Stager

#: The journal's schema version, kept in its ``meta`` table. Journals made before the table
#: existed are version 0 and are brought up to date when a master opens them.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id          BLOB PRIMARY KEY,
    name        TEXT NOT NULL,
    queue       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    payload     BLOB,
    timeout_s   REAL,
    retries     INTEGER NOT NULL DEFAULT 0,
    failures    INTEGER NOT NULL DEFAULT 0,
    lost        INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    finished_at REAL,
    expires_at  REAL,
    value       BLOB,
    error       BLOB,
    worker_id   TEXT,
    duration_ms REAL
) WITHOUT ROWID;
-- No index on state: recovery reads the open tasks once, in id order, and a scan of the table
-- in its own (id) order costs what the index plus a sort did (200 ms for 100,000 open tasks among
-- a million), while keeping the index cost every task three more B-tree writes (insert, start,
-- finish): 11.1 -> 8.8 us per start and finish. Journals of earlier versions lose it here.
DROP INDEX IF EXISTS tasks_open;
CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS task_defs (
    name      TEXT PRIMARY KEY,
    kind      TEXT NOT NULL,
    timeout_s REAL,
    retries   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Finding tasks (TASKS): finished rows by state, newest first. Partial, so an insert, a start
-- or a requeue (finished_at still NULL) writes nothing to it; a finish writes one entry.
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(state, id) WHERE finished_at IS NOT NULL;
-- Attempts that ended without finishing their task (a failure retried, a lost worker, a send
-- the worker never got); the final attempt is the task's own row.
CREATE TABLE IF NOT EXISTS attempts (
    task_id    BLOB NOT NULL,
    attempt    INTEGER NOT NULL,
    worker_id  TEXT,
    started_at REAL,
    ended_at   REAL,
    outcome    TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paused_queues (queue TEXT PRIMARY KEY);
-- What a task wrote (the kept tail, and the offset at its end) and its last progress report,
-- for the tasks that wrote or reported anything (version 2).
CREATE TABLE IF NOT EXISTS task_output (
    task_id    BLOB PRIMARY KEY,
    output     TEXT NOT NULL,
    output_end INTEGER NOT NULL,
    progress   BLOB
) WITHOUT ROWID;
"""

_INSERT = (
    "INSERT OR IGNORE INTO tasks (id, name, queue, kind, state, attempt, payload, timeout_s, retries,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_START = "UPDATE tasks SET state = 'DISPATCHED', attempt = ? WHERE id = ?"
_REQUEUE = "UPDATE tasks SET state = 'PENDING', failures = ?, lost = ? WHERE id = ?"
# The payload of a task that did not succeed is kept, so it can be retried (TASK_RETRY).
_FINISH = (
    "UPDATE tasks SET state = ?1, attempt = ?2, value = ?3, error = ?4, finished_at = ?5,"
    " expires_at = ?6, worker_id = ?7, duration_ms = ?8,"
    " payload = CASE WHEN ?1 = 'SUCCEEDED' THEN NULL ELSE payload END WHERE id = ?9"
)
_DEF = "INSERT OR REPLACE INTO task_defs (name, kind, timeout_s, retries) VALUES (?, ?, ?, ?)"

RESULT_COLUMNS = "id, name, state, attempt, value, error, worker_id, duration_ms, finished_at"
_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (task_id, attempt, worker_id, started_at, ended_at, outcome)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_PAUSE = "INSERT OR IGNORE INTO paused_queues (queue) VALUES (?)"
_OPEN_SQL = "('PENDING', 'DISPATCHED', 'RUNNING')"
_OUTPUT = "INSERT OR REPLACE INTO task_output (task_id, output, output_end, progress) VALUES (?, ?, ?, ?)"


#: A background thread with its own connection folds the WAL back into the database at this
#: interval. SQLite's automatic checkpoint would run inside whichever commit crosses its size
#: mark, writing and syncing megabytes there: a stall of 100 ms and more in the master's loop.
CHECKPOINT_INTERVAL_S = 1.0


def check_version(found: int, where: str) -> None:
    """Refuse a journal written by a newer pmaster (its schema may mean what this one cannot)."""
    if found > SCHEMA_VERSION:
        raise ConfigError(
            f"the journal at {where} has schema version {found}, newer than this pmaster's"
            f" {SCHEMA_VERSION}: run the pmaster release that wrote it (or a newer one)"
        )


class SqliteJournal(JournalReads, Stager):
    """SQLite-backed store of tasks; staged writes land in one transaction per commit."""

    #: One master per data dir is enforced by the dir's lock (datadir.py), not by a lease.
    has_lease = False
    INSERT, START, REQUEUE, FINISH, DEF = _INSERT, _START, _REQUEUE, _FINISH, _DEF
    ATTEMPT, OUTPUT, PAUSE = _ATTEMPT, _OUTPUT, _PAUSE
    FINISHED_HINT = " INDEXED BY tasks_finished"

    def __init__(self, path: Path, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"journal sync must be 'normal' or 'full', not {sync!r}")
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={sync.upper()}")
        self.db.execute("PRAGMA busy_timeout=5000")
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self.db.close()
            raise
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_INTERVAL_S
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="pf-checkpoint", daemon=True)
        self._checkpointer.start()
        Stager.__init__(self)

    def _migrate(self) -> int:
        """Bring the schema to SCHEMA_VERSION; return the version found before (0: none)."""
        has_meta = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        found = 0
        if has_meta:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else 0
        check_version(found, str(self.path))
        if found < SCHEMA_VERSION:
            # version 0 -> 1: the meta table (and the dropped state index, see SCHEMA);
            # 1 -> 2: the task_output table
            self.db.executescript(SCHEMA)
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        return found

    # -- commit (staging: journal_staging.Stager) -------------------------------
    def commit(self) -> int:
        """Write everything staged in one transaction; return the number of operations."""
        ops = self._take()
        if not ops:
            return 0
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            self._write(cur, ops)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return len(ops)

    # -- reads -------------------------------------------------------------
    def load_open(self) -> Iterator[tuple[Any, ...]]:
        """Tasks that are PENDING, DISPATCHED or RUNNING, oldest first (retries None: not given)."""
        for row in self.db.execute(
            "SELECT id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures,"
            " lost, created_at FROM tasks WHERE state IN ('PENDING', 'DISPATCHED', 'RUNNING') ORDER BY id"
        ):
            if row[8] < 0:
                row = (*row[:8], None, *row[9:])
            yield row

    def load_task_defs(self) -> list[tuple[str, str, float | None, int]]:
        return list(self.db.execute("SELECT name, kind, timeout_s, retries FROM task_defs"))

    def existing(self, ids: Iterable[bytes]) -> set[bytes]:
        """Which of ``ids`` the journal already holds."""
        found: set[bytes] = set()
        batch = list(ids)
        for i in range(0, len(batch), 500):
            chunk = batch[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0] for row in self.db.execute(f"SELECT id FROM tasks WHERE id IN ({marks})", chunk)
            )
        return found

    def results(self, ids: Iterable[bytes]) -> dict[bytes, tuple[Any, ...]]:
        """Finished rows for ``ids`` (columns: RESULT_COLUMNS)."""
        out: dict[bytes, tuple[Any, ...]] = {}
        batch = list(ids)
        for i in range(0, len(batch), 500):
            chunk = batch[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                f"SELECT {RESULT_COLUMNS} FROM tasks WHERE id IN ({marks})"
                " AND state NOT IN ('PENDING', 'DISPATCHED', 'RUNNING')",
                chunk,
            ):
                out[row[0]] = tuple(row)
        return out

    def final_counts(self) -> dict[str, int]:
        return dict(
            self.db.execute(
                "SELECT state, count(*) FROM tasks"
                " WHERE state NOT IN ('PENDING', 'DISPATCHED', 'RUNNING') GROUP BY state"
            ).fetchall()
        )

    def expire(self, now: float, limit: int = 5000) -> dict[str, int]:
        """Delete up to ``limit`` results past their TTL; return counts by state removed."""
        rows = self.db.execute(
            "SELECT id, state FROM tasks WHERE expires_at IS NOT NULL AND expires_at < ? LIMIT ?",
            (now, limit),
        ).fetchall()
        if not rows:
            return {}
        removed: dict[str, int] = {}
        for _, state in rows:
            removed[state] = removed.get(state, 0) + 1
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        cur.executemany("DELETE FROM tasks WHERE id = ?", [(r[0],) for r in rows])
        cur.executemany("DELETE FROM attempts WHERE task_id = ?", [(r[0],) for r in rows])
        cur.executemany("DELETE FROM task_output WHERE task_id = ?", [(r[0],) for r in rows])
        cur.execute("COMMIT")
        return removed

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file so it does not grow without bound."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _checkpoints(self) -> None:
        """Background thread: passive checkpoints (they never block the master's commits)."""
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            while not self._stop.wait(CHECKPOINT_INTERVAL_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    continue  # busy or failing now: the next interval tries again
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join(10)
        self.db.close()

    # -- inspection and control (journal_reads.JournalReads) --------------------------------
    def _fetch(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.db.execute(sql, params)]


__all__ = ["LIST_COLUMNS", "RESULT_COLUMNS", "SHOW_COLUMNS", "Journal", "SqliteJournal"]

#: The name other modules have always imported.
Journal = SqliteJournal
