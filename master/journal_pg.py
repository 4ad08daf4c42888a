"""The PostgreSQL journal: the SQLite journal's tables in a database several masters share.

Writes are staged and committed once per loop turn, as in journal.py. Exactly one
master is active on a database: the one holding the lease, a row with a fencing
token that each takeover increments. The lease's expiry is judged by the
database's own clock, so no two hosts' clocks are ever compared. Every commit
starts by checking (and renewing) the token in its own transaction, holding
the lease row's lock to the end: once a standby has taken over, an old active
master's commit finds a stale token, is rolled back whole and raises
:class:`LeaseLost`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from poolfleet.master.journal import SCHEMA_VERSION, check_version
from poolfleet.master.journal_api import LeaseLost
from poolfleet.master.journal_reads import JournalReads
from poolfleet.master.journal_schedules import ScheduleStore, postgres_statements
from poolfleet.master.journal_staging import JournalUnavailable, Stager

log = structlog.get_logger("pmaster")

#: The advisory lock key masters take while they create or migrate the schema.
MIGRATION_LOCK = 0x706F6F6C666C74  # "poolflt"

#: Version 1: the tables of the SQLite journal (same columns), the meta table and the lease.
SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS tasks (
        id          BYTEA PRIMARY KEY,
        name        TEXT NOT NULL,
        queue       TEXT NOT NULL,
        kind        TEXT NOT NULL,
        state       TEXT NOT NULL,
        attempt     INTEGER NOT NULL DEFAULT 0,
        payload     BYTEA,
        timeout_s   DOUBLE PRECISION,
        retries     INTEGER NOT NULL DEFAULT 0,
        failures    INTEGER NOT NULL DEFAULT 0,
        lost        INTEGER NOT NULL DEFAULT 0,
        created_at  DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        expires_at  DOUBLE PRECISION,
        value       BYTEA,
        error       BYTEA,
        worker_id   TEXT,
        duration_ms DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks(expires_at) WHERE expires_at IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS task_defs (
        name      TEXT PRIMARY KEY,
        kind      TEXT NOT NULL,
        timeout_s DOUBLE PRECISION,
        retries   INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS lease (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        holder      TEXT NOT NULL DEFAULT '',
        token       BIGINT NOT NULL DEFAULT 0,
        expires_at  TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
        acquired_at TIMESTAMPTZ,
        released    BOOLEAN NOT NULL DEFAULT TRUE,
        host        TEXT,
        pid         INTEGER,
        clients     TEXT,
        workers     TEXT
    )""",
    "INSERT INTO lease (id) VALUES (1) ON CONFLICT DO NOTHING",
    # finding tasks (TASKS), the attempts of TASK_SHOW and the paused queues, as in SQLite
    "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(state, id) WHERE finished_at IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS attempts (
        task_id    BYTEA NOT NULL,
        attempt    INTEGER NOT NULL,
        worker_id  TEXT,
        started_at DOUBLE PRECISION,
        ended_at   DOUBLE PRECISION,
        outcome    TEXT NOT NULL,
        PRIMARY KEY (task_id, attempt)
    )""",
    "CREATE TABLE IF NOT EXISTS paused_queues (queue TEXT PRIMARY KEY)",
]

#: Version 2: tasks that wait (see journal.SCHEMA_V2).
SCHEMA_V2 = [
    "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS due_at DOUBLE PRECISION",
    """CREATE TABLE IF NOT EXISTS task_deps (
        task_id BYTEA NOT NULL,
        dep_id  BYTEA NOT NULL,
        ref     INTEGER NOT NULL,
        PRIMARY KEY (task_id, dep_id)
    )""",
    "CREATE INDEX IF NOT EXISTS task_deps_dep ON task_deps(dep_id)",
]

#: Version 3: task priorities, schedules and fleet-wide rate limits (journal_schedules.py).
SCHEMA_V3 = [
    "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS priority INTEGER NOT NULL DEFAULT 0",
    """CREATE TABLE IF NOT EXISTS schedules (
        name      TEXT PRIMARY KEY,
        task      TEXT NOT NULL,
        payload   BYTEA NOT NULL,
        options   BYTEA NOT NULL,
        every_s   DOUBLE PRECISION,
        cron      TEXT,
        timezone  TEXT,
        catchup   TEXT NOT NULL,
        paused    INTEGER NOT NULL DEFAULT 0,
        horizon   DOUBLE PRECISION NOT NULL,
        last_tick DOUBLE PRECISION,
        last_task BYTEA,
        created_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rate_limits (
        name     TEXT PRIMARY KEY,
        count    INTEGER NOT NULL,
        period_s DOUBLE PRECISION NOT NULL
    )""",
]
#: Version 4: what tasks wrote and their last progress report (journal.SCHEMA_V4).
SCHEMA_V4 = [
    """CREATE TABLE IF NOT EXISTS task_output (
        task_id    BYTEA PRIMARY KEY,
        output     TEXT NOT NULL,
        output_end BIGINT NOT NULL,
        progress   BYTEA
    )""",
]
#: (version, statements) in order: what brings a journal of the version before up to that one.
MIGRATIONS: list[tuple[int, list[str]]] = [(2, SCHEMA_V2), (3, SCHEMA_V3), (4, SCHEMA_V4)]

_SCHED = postgres_statements()
_INSERT = (
    "INSERT INTO tasks (id, name, queue, kind, state, attempt, payload, timeout_s, retries,"
    " created_at, priority) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (id) DO NOTHING"
)
_START = "UPDATE tasks SET state = 'DISPATCHED', attempt = %s WHERE id = %s"
_REQUEUE = "UPDATE tasks SET state = 'PENDING', failures = %s, lost = %s WHERE id = %s"
# The payload of a task that did not succeed is kept, so it can be retried (TASK_RETRY); the
# parameters come in the Stager's order, through a VALUES row that can name the state twice.
_FINISH = (
    "WITH v (s, a, val, err, fin, exp, w, d, tid) AS (VALUES (%s::text, %s::integer, %s::bytea,"
    " %s::bytea, %s::double precision, %s::double precision, %s::text, %s::double precision, %s::bytea))"
    " UPDATE tasks SET state = v.s, attempt = v.a, value = v.val, error = v.err, finished_at = v.fin,"
    " expires_at = v.exp, worker_id = v.w, duration_ms = v.d,"
    " payload = CASE WHEN v.s = 'SUCCEEDED' THEN NULL ELSE tasks.payload END FROM v WHERE tasks.id = v.tid"
)
_ATTEMPT = (
    "INSERT INTO attempts (task_id, attempt, worker_id, started_at, ended_at, outcome)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = EXCLUDED.worker_id,"
    " started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at, outcome = EXCLUDED.outcome"
)
_OUTPUT = (
    "INSERT INTO task_output (task_id, output, output_end, progress) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (task_id) DO UPDATE SET output = EXCLUDED.output, output_end = EXCLUDED.output_end,"
    " progress = EXCLUDED.progress"
)
_PAUSE = "INSERT INTO paused_queues (queue) VALUES (?) ON CONFLICT DO NOTHING"
_DEF = (
    "INSERT INTO task_defs (name, kind, timeout_s, retries) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (name) DO UPDATE SET kind = EXCLUDED.kind, timeout_s = EXCLUDED.timeout_s,"
    " retries = EXCLUDED.retries"
)
_HOLD = "UPDATE tasks SET state = %s, payload = COALESCE(%s, payload) WHERE id = %s"
_DUE = "UPDATE tasks SET due_at = %s WHERE id = %s"
_DEPS = "INSERT INTO task_deps (task_id, dep_id, ref) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
_DEPS_DONE = "DELETE FROM task_deps WHERE task_id = %s"
#: The fencing check: renews the lease only for the holder of the current token, and takes the
#: lease row's lock until the end of the transaction (a takeover waits for the commit).
_RENEW = (
    "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => %s)"
    " WHERE id = 1 AND token = %s AND holder = %s"
)
_CODE_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS code_blobs (
        hash        BYTEA PRIMARY KEY,
        blob        BYTEA NOT NULL,
        python      TEXT NOT NULL,
        cloudpickle TEXT NOT NULL,
        shipped_by  TEXT NOT NULL,
        stored_at   DOUBLE PRECISION NOT NULL
    )""",
    "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS shipped_by TEXT",
]
_CODE = (
    "INSERT INTO code_blobs (hash, blob, python, cloudpickle, shipped_by, stored_at)"
    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (hash) DO NOTHING"
)
_SHIPPED_BY = "UPDATE tasks SET shipped_by = %s WHERE id = %s"
_OPEN = "state IN ('WAITING', 'DELAYED', 'PENDING', 'DISPATCHED', 'RUNNING')"
RESULT_COLUMNS = "id, name, state, attempt, value, error, worker_id, duration_ms, finished_at"
LOOKUP_BATCH = 5000


def connect_kwargs(url: str, lease_s: float) -> dict[str, Any]:
    """libpq parameters added to the URL's: a connection that cannot be made, or a database
    that stops answering, is noticed within about a lease."""
    given = conninfo_to_dict(url)
    extra: dict[str, Any] = {"application_name": "pmaster"}
    defaults = {
        "connect_timeout": str(max(2, int(lease_s))),
        "keepalives": "1",
        "keepalives_idle": str(max(1, int(lease_s))),
        "keepalives_interval": "1",
        "keepalives_count": "3",
        "tcp_user_timeout": str(int(lease_s * 1000)),
    }
    for key, value in defaults.items():
        if key not in given:
            extra[key] = value
    return extra


class PostgresJournal(Stager, JournalReads, ScheduleStore):
    """The journal in PostgreSQL, with the lease that makes one master among several active."""

    has_lease = True
    INSERT, START, REQUEUE, FINISH, DEF = _INSERT, _START, _REQUEUE, _FINISH, _DEF
    MARK = (
        "INSERT INTO meta (key, value) VALUES ('last_write', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    HOLD, DUE, DEPS, DEPS_DONE = _HOLD, _DUE, _DEPS, _DEPS_DONE
    SCHEDULE_PUT, SCHEDULE_DEL = _SCHED["SCHEDULE_PUT"], _SCHED["SCHEDULE_DEL"]
    LIMIT_PUT, LIMIT_DEL = _SCHED["LIMIT_PUT"], _SCHED["LIMIT_DEL"]
    CODE, SHIPPED_BY = _CODE, _SHIPPED_BY
    # the shared statements are written with ? placeholders (journal_reads.py)
    ATTEMPT, OUTPUT = _ATTEMPT.replace("?", "%s"), _OUTPUT.replace("?", "%s")
    PAUSE, UNPAUSE = _PAUSE.replace("?", "%s"), JournalReads.UNPAUSE.replace("?", "%s")

    def __init__(self, url: str, holder: str, lease_s: float) -> None:
        self.url = url
        self.holder_id = holder
        self.lease_s = lease_s
        self.token: int | None = None
        self._released_before = False
        self.conn = self._connect()
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self.conn.close()
            raise
        Stager.__init__(self)

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conn = psycopg.connect(self.url, autocommit=True, **connect_kwargs(self.url, self.lease_s))
        lease_ms = max(100, int(self.lease_s * 1000))
        try:
            # a master paused inside a transaction holds the lease row's lock: the server ends
            # that session after a lease, so a standby is never kept from taking over for longer
            conn.execute(f"SET idle_in_transaction_session_timeout = {lease_ms}")
            conn.execute(f"SET lock_timeout = {max(100, min(1000, lease_ms // 4))}")
            # A master whose host is cut off in the middle of a statement leaves the server's
            # session waiting for the rest of it (not idle, so the timeout above never ends it),
            # with the lease row locked. The server's own end of the connection then gives up
            # on a silent peer within a few seconds too, not the system's two hours.
            idle_s = max(1, int(self.lease_s))
            conn.execute(f"SET tcp_keepalives_idle = {idle_s}")
            conn.execute("SET tcp_keepalives_interval = 1")
            conn.execute("SET tcp_keepalives_count = 3")
            if conn.info.server_version >= 120000:  # PostgreSQL 12 has it
                conn.execute(f"SET tcp_user_timeout = {lease_ms}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self) -> int:
        """Create or bring the schema to SCHEMA_VERSION (one master at a time); return the
        version found (0: an empty database)."""
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else 0
            check_version(found, "the PostgreSQL journal")
            # every statement is idempotent: a database made before the tables of finding
            # and pausing tasks gains them here
            for stmt in SCHEMA_V1:
                self.conn.execute(stmt)
            for version, stmts in MIGRATIONS:  # in the same transaction: all steps, or none
                if found < version:
                    for stmt in stmts:
                        self.conn.execute(stmt)
            for stmt in _CODE_SCHEMA:  # shipped code: added to any journal that lacks it
                self.conn.execute(stmt)
            if found < SCHEMA_VERSION:
                self.conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    (str(SCHEMA_VERSION),),
                )
        return found

    # -- the lease -------------------------------------------------------------
    def try_acquire(self, clients: str, workers: str) -> bool:
        """Take the lease if it has expired (or was released): True if this master is now active."""
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()  # a standby outlives a database restart
        with self.conn.transaction():
            row = self.conn.execute(
                "SELECT released, expires_at < clock_timestamp() FROM lease WHERE id = 1 FOR UPDATE"
            ).fetchone()
            if row is None or not row[1]:
                return False
            released = bool(row[0])
            got = self.conn.execute(
                "UPDATE lease SET holder = %s, token = token + 1, acquired_at = clock_timestamp(),"
                " expires_at = clock_timestamp() + make_interval(secs => %s), released = FALSE,"
                " host = %s, pid = %s, clients = %s, workers = %s WHERE id = 1 RETURNING token",
                (self.holder_id, self.lease_s, socket.gethostname(), os.getpid(), clients, workers),
            ).fetchone()
        assert got is not None
        self.token = int(got[0])
        self._released_before = released
        return True

    def previous_released(self) -> bool:
        """Whether the master before this one released the lease (stopped cleanly)."""
        return self._released_before

    def holder(self) -> dict[str, Any] | None:
        """The lease row: who is active, where it serves, and whether its lease still runs."""
        cur = self.conn.execute(
            "SELECT holder, token, host, pid, clients, workers, expires_at > clock_timestamp()"
            " FROM lease WHERE id = 1"
        )
        row = cur.fetchone()
        if row is None or not row[0]:
            return None
        keys = ("holder", "token", "host", "pid", "clients", "workers", "live")
        return dict(zip(keys, row, strict=True))

    def renew(self) -> None:
        """Extend the lease; LeaseLost if another master holds it now or the database is gone."""
        try:
            cur = self.conn.execute(_RENEW, (self.lease_s, self.token, self.holder_id))
        except psycopg.Error as exc:
            raise LeaseLost(f"cannot renew the lease: {exc}".strip()) from exc
        if cur.rowcount != 1:
            raise LeaseLost(self._stale())

    def _stale(self) -> str:
        try:
            now = self.holder()
        except psycopg.Error:
            now = None
        who = f" by master {now['holder']} on {now['host']} (token {now['token']})" if now else ""
        return f"fencing token {self.token} is stale: the lease was taken over{who}"

    def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over at once."""
        if self.token is None:
            return
        try:
            self.conn.execute(
                "UPDATE lease SET expires_at = '-infinity', released = TRUE"
                " WHERE id = 1 AND token = %s AND holder = %s",
                (self.token, self.holder_id),
            )
        except psycopg.Error as exc:
            log.warning("lease_release_failed", reason=str(exc))
        self.token = None

    def _gone(self, exc: psycopg.Error) -> bool:
        """Whether ``exc`` says the database is out of reach (or ended this session), rather
        than that a statement was wrong: then the lease can no longer be shown to be ours."""
        return isinstance(exc, psycopg.OperationalError) or self.conn.broken or self.conn.closed

    def _fence(self, cur: psycopg.Cursor[tuple[Any, ...]]) -> None:
        if self.token is None:
            raise LeaseLost("this master holds no lease: it writes nothing")
        cur.execute(_RENEW, (self.lease_s, self.token, self.holder_id))
        if cur.rowcount != 1:
            raise LeaseLost(self._stale())

    # -- commit (staging: journal_staging.Stager) -------------------------------
    def commit(self, final: bool = False) -> int:
        """Check the fencing token and write everything staged, in one transaction; return the
        number of operations. LeaseLost (and nothing written) if the token is stale."""
        ops = self._take(final)
        if not ops:
            return 0
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                self._fence(cur)
                self._write(cur, ops)
        except psycopg.Error as exc:
            if self._gone(exc):
                raise LeaseLost(f"journal commit failed: {exc}".strip()) from exc
            if not isinstance(exc, psycopg.OperationalError):  # DiskFull and the like are
                raise  # a write that can never succeed (a bug): not kept to fail every commit
            self._restore(ops)  # kept for the next commit: nothing staged is lost
            raise JournalUnavailable(f"the PostgreSQL journal cannot be written: {exc}".strip()) from exc
        return len(ops)

    # -- reads ---------------------------------------------------------------
    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql.encode())]

    def load_open(self) -> Iterator[tuple[Any, ...]]:
        """Open tasks, oldest first (retries None: not given; due_at last)."""
        cur = self.conn.execute(
            "SELECT id, name, queue, kind, state, attempt, payload, timeout_s, retries, failures,"
            f" lost, created_at, due_at, priority FROM tasks WHERE {_OPEN} ORDER BY id"
        )
        for row in cur:
            if row[8] < 0:
                row = (*row[:8], None, *row[9:])
            yield tuple(row)

    def load_deps(self) -> list[tuple[bytes, bytes, int]]:
        """(task id, dependency id, ref) of the tasks that wait (or have not started since)."""
        return [tuple(r) for r in self.conn.execute("SELECT task_id, dep_id, ref FROM task_deps")]

    def load_task_defs(self) -> list[tuple[str, str, float | None, int]]:
        return [tuple(r) for r in self.conn.execute("SELECT name, kind, timeout_s, retries FROM task_defs")]

    def load_code(self, digest: bytes) -> tuple[bytes, str, str, str] | None:
        """A shipped function's (blob, python, cloudpickle, shipped_by), or None."""
        row = self.conn.execute(
            "SELECT blob, python, cloudpickle, shipped_by FROM code_blobs WHERE hash = %s", (digest,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), str(row[2]), str(row[3]))

    def existing(self, ids: Iterable[bytes]) -> set[bytes]:
        found: set[bytes] = set()
        batch = list(ids)
        for i in range(0, len(batch), LOOKUP_BATCH):
            cur = self.conn.execute("SELECT id FROM tasks WHERE id = ANY(%s)", (batch[i : i + LOOKUP_BATCH],))
            found.update(row[0] for row in cur)
        return found

    def results(self, ids: Iterable[bytes]) -> dict[bytes, tuple[Any, ...]]:
        out: dict[bytes, tuple[Any, ...]] = {}
        batch = list(ids)
        for i in range(0, len(batch), LOOKUP_BATCH):
            cur = self.conn.execute(
                f"SELECT {RESULT_COLUMNS} FROM tasks WHERE id = ANY(%s) AND NOT ({_OPEN})",
                (batch[i : i + LOOKUP_BATCH],),
            )
            for row in cur:
                out[row[0]] = tuple(row)
        return out

    def final_counts(self) -> dict[str, int]:
        cur = self.conn.execute(f"SELECT state, count(*) FROM tasks WHERE NOT ({_OPEN}) GROUP BY state")
        return {state: int(n) for state, n in cur}

    def expire(self, now: float, limit: int = 5000) -> dict[str, int]:
        """Delete up to ``limit`` results past their TTL (a fenced write); counts by state."""
        removed: dict[str, int] = {}
        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                self._fence(cur)
                cur.execute(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE expires_at IS NOT NULL"
                    " AND expires_at < %s AND NOT EXISTS (SELECT 1 FROM task_deps d"
                    " WHERE d.dep_id = tasks.id) LIMIT %s) RETURNING state, id",
                    (now, limit),
                )
                gone: list[bytes] = []
                for state, tid in cur.fetchall():
                    removed[state] = removed.get(state, 0) + 1
                    gone.append(tid)
                if gone:
                    cur.execute("DELETE FROM attempts WHERE task_id = ANY(%s)", (gone,))
                    cur.execute("DELETE FROM task_output WHERE task_id = ANY(%s)", (gone,))
        except psycopg.Error as exc:
            if self._gone(exc):
                raise LeaseLost(f"journal expiry failed: {exc}".strip()) from exc
            raise
        return removed

    def _fetch(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """A read of journal_reads.JournalReads (written with ? placeholders)."""
        return [tuple(r) for r in self.conn.execute(sql.replace("?", "%s"), params)]

    def checkpoint(self) -> None:
        """Nothing to do: PostgreSQL checkpoints by itself."""

    def close(self) -> None:
        try:
            self.conn.close()
        except psycopg.Error:
            pass
