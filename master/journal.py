"""The master's embedded journal: one SQLite file (WAL) holding every task and result.

Writes are staged and committed together once per loop turn (group commit);
the master acknowledges a submit only after the commit that holds it. This is
the default backend; journal_pg.py keeps the same tables in PostgreSQL and
journal_api.py names the interface both offer.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import TaskState
from poolfleet.master.journal_staging import JournalUnavailable, Stager

#: The journal's schema version, kept in its ``meta`` table. Journals made before the table
#: existed are version 0 and are brought up to date when a master opens them.
SCHEMA_VERSION = 1

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
_MARK = "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write', ?)"

RESULT_COLUMNS = "id, name, state, attempt, value, error, worker_id, duration_ms, finished_at"
#: What a task listing (TASKS) reads of a row.
LIST_COLUMNS = "id, name, queue, kind, state, attempt, worker_id, created_at, finished_at, duration_ms"
#: What TASK_SHOW reads of a row.
SHOW_COLUMNS = (
    "id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, created_at,"
    " finished_at, expires_at, value, error, worker_id, duration_ms"
)
_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (task_id, attempt, worker_id, started_at, ended_at, outcome)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_OPEN_SQL = "('PENDING', 'DISPATCHED', 'RUNNING')"
#: The final states, as an SQL list: a row whose state is none of these nor open is not a result
_FINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in TaskState if s.final) + ")"
_KNOWN_SQL = "(" + ", ".join(f"'{s.value}'" for s in TaskState) + ")"


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


class SqliteJournal(Stager):
    """SQLite-backed store of tasks; staged writes land in one transaction per commit."""

    #: One master per data dir is enforced by the dir's lock (datadir.py), not by a lease.
    has_lease = False
    INSERT, START, REQUEUE, FINISH, DEF, MARK = _INSERT, _START, _REQUEUE, _FINISH, _DEF, _MARK

    def __init__(self, path: Path, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"journal sync must be 'normal' or 'full', not {sync!r}")
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={sync.upper()}")
            self.db.execute("PRAGMA busy_timeout=5000")
            self._check()
            self.schema_version = self._migrate()
        except sqlite3.Error as exc:
            self.db.close()
            raise ConfigError(self._open_failure(exc)) from None
        except BaseException:
            self.db.close()
            raise
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_INTERVAL_S
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoints, name="pf-checkpoint", daemon=True)
        self._checkpointer.start()
        Stager.__init__(self)

    def _check(self) -> None:
        """SQLite's quick_check of the whole file (pages, records, indexes): a damaged journal is
        refused at start, not found later by a query of the running master."""
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(str(r) for r in rows))

    def _open_failure(self, exc: sqlite3.Error) -> str:
        """The one-line start-up error for a journal that cannot be opened."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = -1
        if "full" in text or free == 0:
            return (
                f"cannot open the journal at {self.path}: {text}; the disk holding the data dir"
                f" {self.path.parent} is full ({free} bytes free): free space, then start pmaster again"
            )
        return (
            f"the journal at {self.path} is damaged ({text}): stop here and recover it (OPERATIONS.md,"
            f" 'A damaged journal'): move it aside, then sqlite3 OLD .recover | sqlite3 {self.path}"
        )

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
            # version 0 -> 1: the meta table (and the dropped state index, see SCHEMA)
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
        try:
            self._transaction(lambda cur: self._write(cur, ops))
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a write that can never succeed (a bug): not kept to fail every commit
        except sqlite3.Error as exc:  # the disk or the file: full, failing, damaged
            self._restore(ops)  # kept for the next commit: nothing staged is lost
            raise JournalUnavailable(self.failure(exc)) from exc
        return len(ops)

    def _transaction(self, body: Callable[[sqlite3.Cursor], None]) -> None:
        """Run ``body`` in one write transaction, rolled back if it fails. SQLite has already
        rolled back after some errors (a full disk): a ROLLBACK then would fail too ("cannot
        rollback - no transaction is active") and hide the first error."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            body(cur)
            cur.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                try:
                    cur.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the first error is the one to report
            raise

    def failure(self, exc: BaseException) -> str:
        """What to tell an operator (and a refused client) about a failed journal write."""
        text = str(exc).strip() or type(exc).__name__
        where = self.path.parent
        if "full" in text:
            return (
                f"the journal at {self.path} cannot be written: {text}; free space on the disk"
                f" holding the data dir {where}"
            )
        return (
            f"the journal at {self.path} cannot be used: {text}; check the disk holding the"
            f" data dir {where} (see OPERATIONS.md, a damaged journal)"
        )

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

    def unknown_states(self) -> list[tuple[bytes, str]]:
        """(id, state) of the rows whose state this pmaster does not know (a damaged or hand-edited
        journal): reported at start, and otherwise left alone."""
        return [
            (r[0], str(r[1]))
            for r in self.db.execute(f"SELECT id, state FROM tasks WHERE state NOT IN {_KNOWN_SQL}")
        ]

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
                f"SELECT {RESULT_COLUMNS} FROM tasks WHERE id IN ({marks}) AND state IN {_FINAL_SQL}",
                chunk,
            ):
                out[row[0]] = tuple(row)
        return out

    def final_counts(self) -> dict[str, int]:
        return dict(
            self.db.execute(
                f"SELECT state, count(*) FROM tasks WHERE state IN {_FINAL_SQL} GROUP BY state"
            ).fetchall()
        )

    def expire(self, now: float, limit: int = 5000) -> dict[str, int]:
        """Delete up to ``limit`` results past their TTL; return counts by state removed
        (JournalUnavailable if the journal cannot be read or written)."""
        try:
            return self._expire(now, limit)
        except sqlite3.Error as exc:
            raise JournalUnavailable(self.failure(exc)) from exc

    def _expire(self, now: float, limit: int) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT id, state FROM tasks WHERE expires_at IS NOT NULL AND expires_at < ? LIMIT ?",
            (now, limit),
        ).fetchall()
        if not rows:
            return {}
        removed: dict[str, int] = {}
        for _, state in rows:
            removed[state] = removed.get(state, 0) + 1
        ids = [(r[0],) for r in rows]

        def delete(cur: sqlite3.Cursor) -> None:
            cur.executemany("DELETE FROM tasks WHERE id = ?", ids)
            cur.executemany("DELETE FROM attempts WHERE task_id = ?", ids)

        self._transaction(delete)
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

    # -- inspection and control (TASKS, TASK_SHOW, RESOLVE, TASK_RETRY, QUEUE_CONTROL) -------------
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
        self._ops.append((_ATTEMPT, (task_id, attempt, worker_id, started_at, ended_at, outcome)))

    def list_window(
        self, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Up to ``window`` rows with ``floor <= id < before`` (either bound may be None), newest
        first (columns: LIST_COLUMNS); True when the range holds no more rows than those."""
        where, params = self._id_range(before, floor)
        rows = self.db.execute(
            f"SELECT {LIST_COLUMNS} FROM tasks{where} ORDER BY id DESC LIMIT ?", (*params, window + 1)
        ).fetchall()
        return [tuple(r) for r in rows[:window]], len(rows) <= window

    def list_finished(
        self, state: str, before: bytes | None, floor: bytes | None, window: int
    ) -> tuple[list[tuple[Any, ...]], bool]:
        """Like :meth:`list_window`, for the finished rows of one final state (index
        tasks_finished)."""
        where, params = self._id_range(before, floor)
        where = (where + " AND" if where else " WHERE") + " state = ? AND finished_at IS NOT NULL"
        rows = self.db.execute(
            f"SELECT {LIST_COLUMNS} FROM tasks INDEXED BY tasks_finished{where} ORDER BY id DESC LIMIT ?",
            (*params, state, window + 1),
        ).fetchall()
        return [tuple(r) for r in rows[:window]], len(rows) <= window

    @staticmethod
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

    def ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        """Ids with ``low <= id <= high``, at most ``limit`` (a prefix lookup on the key)."""
        rows = self.db.execute(
            "SELECT id FROM tasks WHERE id >= ? AND id <= ? ORDER BY id LIMIT ?", (low, high, limit)
        )
        return [r[0] for r in rows]

    def task_row(self, task_id: bytes) -> tuple[Any, ...] | None:
        """One task's whole row (columns: SHOW_COLUMNS), or None."""
        row = self.db.execute(f"SELECT {SHOW_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else tuple(row)

    def attempts_of(self, task_id: bytes) -> list[tuple[Any, ...]]:
        """(attempt, worker_id, started_at, ended_at, outcome) of its earlier attempts, in order."""
        return [
            tuple(r)
            for r in self.db.execute(
                "SELECT attempt, worker_id, started_at, ended_at, outcome FROM attempts"
                " WHERE task_id = ? ORDER BY attempt",
                (task_id,),
            )
        ]

    def stage_queue_paused(self, queue: str, paused: bool) -> None:
        if paused:
            self._ops.append(("INSERT OR IGNORE INTO paused_queues (queue) VALUES (?)", (queue,)))
        else:
            self._ops.append(("DELETE FROM paused_queues WHERE queue = ?", (queue,)))

    def paused_queues(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT queue FROM paused_queues ORDER BY queue")]


#: The name other modules have always imported.
Journal = SqliteJournal
