"""The master's embedded journal: one SQLite file (WAL) holding every task and result.

Writes are staged and committed together once per loop turn (group commit);
the master acknowledges a submit only after the commit that holds it. This is
the default backend; journal_pg.py keeps the same tables in PostgreSQL and
journal_api.py names the interface both offer.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import TaskState
from poolfleet.master.journal_reads import JournalReads
from poolfleet.master.journal_schedules import ScheduleStore, sqlite_statements
from poolfleet.master.journal_staging import JournalUnavailable, Stager

_SCHED = sqlite_statements()

#: The journal's schema version, kept in its ``meta`` table. Journals made before the table
#: existed are version 0 and are brought up to date when a master opens them: SCHEMA makes
#: version 1, then each step of MIGRATIONS runs in its own transaction.
SCHEMA_VERSION = 4

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

#: Version 1 -> 2 (tasks that wait): the due time of a DELAYED task (wall clock, epoch
#: seconds), and the tasks each WAITING task depends on (``ref`` 1: its result is passed in
#: the arguments). A row stays until its task has started or finished: the result it names
#: is not expired meanwhile, whatever the TTL.
SCHEMA_V2 = """
ALTER TABLE tasks ADD COLUMN due_at REAL;
CREATE TABLE IF NOT EXISTS task_deps (
    task_id BLOB NOT NULL,
    dep_id  BLOB NOT NULL,
    ref     INTEGER NOT NULL,
    PRIMARY KEY (task_id, dep_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS task_deps_dep ON task_deps(dep_id);
"""

#: Version 2 -> 3: task priorities, schedules and fleet-wide rate limits (journal_schedules.py).
SCHEMA_V3 = """
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS schedules (
    name      TEXT PRIMARY KEY,
    task      TEXT NOT NULL,
    payload   BLOB NOT NULL,
    options   BLOB NOT NULL,
    every_s   REAL,
    cron      TEXT,
    timezone  TEXT,
    catchup   TEXT NOT NULL,
    paused    INTEGER NOT NULL DEFAULT 0,
    horizon   REAL NOT NULL,
    last_tick REAL,
    last_task BLOB,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rate_limits (
    name     TEXT PRIMARY KEY,
    count    INTEGER NOT NULL,
    period_s REAL NOT NULL
);
"""

#: Version 3 -> 4: what a task wrote (the kept tail, and the offset at its end) and its last
#: progress report, for the tasks that wrote or reported anything.
SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS task_output (
    task_id    BLOB PRIMARY KEY,
    output     TEXT NOT NULL,
    output_end INTEGER NOT NULL,
    progress   BLOB
) WITHOUT ROWID;
"""

#: (version, script) in order: what brings a journal of the version before up to that one.
MIGRATIONS: list[tuple[int, str]] = [(2, SCHEMA_V2), (3, SCHEMA_V3), (4, SCHEMA_V4)]

_INSERT = (
    "INSERT OR IGNORE INTO tasks (id, name, queue, kind, state, attempt, payload, timeout_s, retries,"
    " created_at, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_START = "UPDATE tasks SET state = 'DISPATCHED', attempt = ? WHERE id = ?"
_REQUEUE = "UPDATE tasks SET state = 'PENDING', failures = ?, lost = ? WHERE id = ?"
# The payload of a task that did not succeed is kept, so it can be retried (TASK_RETRY).
_FINISH = (
    "UPDATE tasks SET state = ?1, attempt = ?2, value = ?3, error = ?4, finished_at = ?5,"
    " expires_at = ?6, worker_id = ?7, duration_ms = ?8,"
    " payload = CASE WHEN ?1 = 'SUCCEEDED' THEN NULL ELSE payload END WHERE id = ?9"
)


@functools.cache
def _insert_many(n: int) -> str:
    """_INSERT for n rows in one statement."""
    return (
        _INSERT.partition(" VALUES ")[0] + " VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    )


@functools.cache
def _start_many(n: int) -> str:
    """_START for n rows (attempt, id) in one statement."""
    rows = ", ".join(["(?, ?)"] * n)
    return (
        f"WITH v(attempt, id) AS (VALUES {rows}) UPDATE tasks SET state = 'DISPATCHED', attempt = v.attempt"
        " FROM v WHERE tasks.id = v.id"
    )


@functools.cache
def _finish_many(n: int) -> str:
    """_FINISH for n rows in one statement, the columns of a row in _FINISH's order."""
    rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    return (
        f"WITH v(state, attempt, value, error, finished_at, expires_at, worker_id, duration_ms, id) AS"
        f" (VALUES {rows}) UPDATE tasks SET state = v.state, attempt = v.attempt, value = v.value,"
        " error = v.error, finished_at = v.finished_at, expires_at = v.expires_at, worker_id = v.worker_id,"
        " duration_ms = v.duration_ms,"
        " payload = CASE WHEN v.state = 'SUCCEEDED' THEN NULL ELSE tasks.payload END FROM v WHERE tasks.id = v.id"
    )


#: UPDATE ... FROM came with SQLite 3.33; an older library writes each row on its own
_MANY: dict[str, tuple[Callable[[int], str], int]] = {_INSERT: (_insert_many, -1)}
if sqlite3.sqlite_version_info >= (3, 33, 0):
    _MANY.update({_START: (_start_many, 1), _FINISH: (_finish_many, 8)})

_DEF = "INSERT OR REPLACE INTO task_defs (name, kind, timeout_s, retries) VALUES (?, ?, ?, ?)"
_MARK = "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_write', ?)"
_HOLD = "UPDATE tasks SET state = ?, payload = COALESCE(?, payload) WHERE id = ?"
_DUE = "UPDATE tasks SET due_at = ? WHERE id = ?"
_DEPS = "INSERT OR IGNORE INTO task_deps (task_id, dep_id, ref) VALUES (?, ?, ?)"
_DEPS_DONE = "DELETE FROM task_deps WHERE task_id = ?"

RESULT_COLUMNS = "id, name, state, attempt, value, error, worker_id, duration_ms, finished_at"
_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (task_id, attempt, worker_id, started_at, ended_at, outcome)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_OPEN_SQL = "('WAITING', 'DELAYED', 'PENDING', 'DISPATCHED', 'RUNNING')"
#: The final states, as an SQL list: a row whose state is none of these nor open is not a result
_FINAL_SQL = "(" + ", ".join(f"'{s.value}'" for s in TaskState if s.final) + ")"
_KNOWN_SQL = "(" + ", ".join(f"'{s.value}'" for s in TaskState) + ")"
#: Shipped code: pickled functions by hash, and which trusted client shipped each task. Created
#: in any journal that lacks them when it is opened (no schema version change: older pmasters
#: ignore them).
CODE_SCHEMA = """
CREATE TABLE IF NOT EXISTS code_blobs (
    hash        BLOB PRIMARY KEY,
    blob        BLOB NOT NULL,
    python      TEXT NOT NULL,
    cloudpickle TEXT NOT NULL,
    shipped_by  TEXT NOT NULL,
    stored_at   REAL NOT NULL
) WITHOUT ROWID;
"""
_CODE = (
    "INSERT OR IGNORE INTO code_blobs (hash, blob, python, cloudpickle, shipped_by, stored_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_SHIPPED_BY = "UPDATE tasks SET shipped_by = ? WHERE id = ?"
_PAUSE = "INSERT OR IGNORE INTO paused_queues (queue) VALUES (?)"
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


class SqliteJournal(Stager, JournalReads, ScheduleStore):
    """SQLite-backed store of tasks; staged writes land in one transaction per commit."""

    #: One master per data dir is enforced by the dir's lock (datadir.py), not by a lease.
    has_lease = False
    INSERT, START, REQUEUE, FINISH, DEF, MARK = _INSERT, _START, _REQUEUE, _FINISH, _DEF, _MARK
    HOLD, DUE, DEPS, DEPS_DONE = _HOLD, _DUE, _DEPS, _DEPS_DONE
    SCHEDULE_PUT, SCHEDULE_DEL = _SCHED["SCHEDULE_PUT"], _SCHED["SCHEDULE_DEL"]
    LIMIT_PUT, LIMIT_DEL = _SCHED["LIMIT_PUT"], _SCHED["LIMIT_DEL"]
    CODE, SHIPPED_BY = _CODE, _SHIPPED_BY
    ATTEMPT, OUTPUT, PAUSE = _ATTEMPT, _OUTPUT, _PAUSE
    FINISHED_HINT = " INDEXED BY tasks_finished"
    MANY = _MANY

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
        if found < 1:
            # version 0 -> 1: the meta table (and the dropped state index, see SCHEMA)
            self.db.executescript(SCHEMA)
            self._set_version(1)
        for version, script in MIGRATIONS:
            if found < version:  # one transaction per step: a step is done whole or not at all
                self.db.executescript(
                    f"BEGIN IMMEDIATE; {script}; INSERT OR REPLACE INTO meta (key, value)"
                    f" VALUES ('schema_version', '{version}'); COMMIT;"
                )
        self.db.executescript(CODE_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(tasks)")}
        if "shipped_by" not in columns:
            self.db.execute("ALTER TABLE tasks ADD COLUMN shipped_by TEXT")
        return found

    def _set_version(self, version: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),)
        )

    # -- commit (staging: journal_staging.Stager) -------------------------------
    def commit(self, final: bool = False) -> int:
        """Write everything staged in one transaction; return the number of operations."""
        ops = self._take(final)
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
    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.db.execute(sql)]

    def load_open(self) -> Iterator[tuple[Any, ...]]:
        """Open tasks, oldest first (retries None: not given; due_at last)."""
        for row in self.db.execute(
            "SELECT id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures,"
            f" lost, created_at, due_at, priority FROM tasks WHERE state IN {_OPEN_SQL} ORDER BY id"
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

    def load_deps(self) -> list[tuple[bytes, bytes, int]]:
        """(task id, dependency id, ref) of the tasks that wait (or have not started since)."""
        return [tuple(r) for r in self.db.execute("SELECT task_id, dep_id, ref FROM task_deps")]

    def load_task_defs(self) -> list[tuple[str, str, float | None, int]]:
        return list(self.db.execute("SELECT name, kind, timeout_s, retries FROM task_defs"))

    def load_code(self, digest: bytes) -> tuple[bytes, str, str, str] | None:
        """A shipped function's (blob, python, cloudpickle, shipped_by), or None."""
        row = self.db.execute(
            "SELECT blob, python, cloudpickle, shipped_by FROM code_blobs WHERE hash = ?", (digest,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), str(row[2]), str(row[3]))

    def shipped_by(self, task_id: bytes) -> str | None:
        """Which trusted client shipped this task (None: not a shipped task, or unknown)."""
        row = self.db.execute("SELECT shipped_by FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return None if row is None else row[0]

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
        (JournalUnavailable if the journal cannot be read or written). A result a waiting task
        still refers to (a task_deps row) is kept."""
        try:
            return self._expire(now, limit)
        except sqlite3.Error as exc:
            raise JournalUnavailable(self.failure(exc)) from exc

    def _expire(self, now: float, limit: int) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT id, state FROM tasks WHERE expires_at IS NOT NULL AND expires_at < ?"
            " AND NOT EXISTS (SELECT 1 FROM task_deps WHERE dep_id = tasks.id) LIMIT ?",
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
            cur.executemany("DELETE FROM task_output WHERE task_id = ?", ids)

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

    # -- inspection and control (journal_reads.JournalReads) --------------------------------
    def _fetch(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.db.execute(sql, params)]


__all__ = ["RESULT_COLUMNS", "Journal", "SqliteJournal"]

#: The name other modules have always imported.
Journal = SqliteJournal
