"""The PostgreSQL journal against a real server: the SQLite journal's assertions (staging,
group commit, recovery reads, results, expiry, schema version), then the lease and its fencing
token."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from pfharness import wait_for
from pfpostgres import PgServer

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import TaskState
from poolfleet.master.journal import SCHEMA_VERSION
from poolfleet.master.journal_api import LeaseLost
from poolfleet.master.journal_pg import PostgresJournal
from poolfleet.master.settings import MasterSettings

LEASE_S = 0.6


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def open_active(url: str, holder: str = "m1", lease_s: float = 30.0) -> PostgresJournal:
    j = PostgresJournal(url, holder, lease_s)
    assert j.try_acquire("tcp://c", "tcp://w")
    return j


@pytest.fixture
def journal(pg_url: str) -> Iterator[PostgresJournal]:
    j = open_active(pg_url)
    yield j
    j.close()


def insert(j: PostgresJournal, n: int, name: str = "m:f", queue: str = "default", kind: str = "cpu") -> None:
    j.stage_insert(tid(n), name, queue, kind, b"payload-%d" % n, 2.5, 1, float(n))


def finish(
    j: PostgresJournal, n: int, state: TaskState, expires_at: float = 1000.0, value: bytes | None = None
) -> None:
    j.stage_finish(tid(n), state, 1, value, b"err" if value is None else None, 50.0, expires_at, "w1", 12.5)


def count(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT count(*) FROM tasks").fetchone()
        assert row is not None
        return int(row[0])


def test_nothing_is_written_before_commit(journal: PostgresJournal, pg_url: str) -> None:
    insert(journal, 1)
    insert(journal, 2)
    assert journal.staged == 2
    assert count(pg_url) == 0
    assert journal.commit() == 2
    assert journal.staged == 0
    assert count(pg_url) == 2
    assert journal.commit() == 0


def test_group_commit_is_all_or_nothing(journal: PostgresJournal) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.stage_requeue(tid(2), None, 0)  # type: ignore[arg-type]  # violates NOT NULL
    with pytest.raises(psycopg.errors.NotNullViolation):
        journal.commit()
    assert journal.staged == 0
    assert journal.existing([tid(1), tid(2)]) == set()
    insert(journal, 1)
    assert journal.commit() == 1
    assert journal.existing([tid(1)]) == {tid(1)}


def test_insert_is_idempotent_the_first_one_stands(journal: PostgresJournal) -> None:
    insert(journal, 1, name="m:first")
    journal.commit()
    insert(journal, 1, name="m:second")
    insert(journal, 1, name="m:third")
    assert journal.commit() == 2
    rows = list(journal.load_open())
    assert len(rows) == 1 and rows[0][1] == "m:first"


def test_load_open_after_insert_start_requeue(journal: PostgresJournal, pg_url: str) -> None:
    for n in (3, 1, 2):
        insert(journal, n, queue=f"q{n}", kind="io")
    journal.stage_start(tid(1), 1)
    journal.stage_start(tid(2), 1)
    journal.stage_requeue(tid(2), 1, 2)
    journal.commit()
    journal.close()
    again = PostgresJournal(pg_url, "m2", 30.0)  # another master reads the same database
    rows = list(again.load_open())
    assert [r[0] for r in rows] == [tid(1), tid(2), tid(3)]
    assert rows[0][1:] == ("m:f", "q1", "io", "DISPATCHED", 1, b"payload-1", 2.5, 1, 0, 0, 1.0, None, 0)
    assert rows[1][4:6] == ("PENDING", 1) and rows[1][9:11] == (1, 2)
    assert rows[2][4:6] == ("PENDING", 0)
    again.close()


def test_finish_stores_the_result_and_drops_the_payload(journal: PostgresJournal) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.stage_start(tid(1), 1)
    finish(journal, 1, TaskState.SUCCEEDED, value=b"\x2a")
    journal.commit()
    assert [r[0] for r in journal.load_open()] == [tid(2)]
    row = journal.conn.execute("SELECT payload FROM tasks WHERE id = %s", (tid(1),)).fetchone()
    assert row is not None and row[0] is None
    res = journal.results([tid(1), tid(2), tid(99)])
    assert list(res) == [tid(1)]
    assert res[tid(1)] == (tid(1), "m:f", "SUCCEEDED", 1, b"\x2a", None, "w1", 12.5, 50.0)


def test_existing_and_results_in_batches(journal: PostgresJournal) -> None:
    for n in range(1200):
        insert(journal, n)
        if n % 2:
            finish(journal, n, TaskState.FAILED)
    journal.commit()
    asked = [tid(n) for n in range(1400)]
    assert journal.existing(asked) == {tid(n) for n in range(1200)}
    res = journal.results(asked)
    assert set(res) == {tid(n) for n in range(1, 1200, 2)}
    assert res[tid(1)][5] == b"err"


def test_final_counts_and_expiry(journal: PostgresJournal) -> None:
    for n in range(6):
        insert(journal, n)
    finish(journal, 0, TaskState.SUCCEEDED, expires_at=100.0, value=b"")
    finish(journal, 1, TaskState.SUCCEEDED, expires_at=200.0, value=b"")
    finish(journal, 2, TaskState.FAILED, expires_at=100.0)
    finish(journal, 3, TaskState.CANCELLED, expires_at=300.0)
    journal.commit()
    assert journal.final_counts() == {"SUCCEEDED": 2, "FAILED": 1, "CANCELLED": 1}
    assert journal.expire(100.0) == {}
    assert journal.expire(150.0) == {"SUCCEEDED": 1, "FAILED": 1}
    assert journal.final_counts() == {"SUCCEEDED": 1, "CANCELLED": 1}
    assert journal.existing([tid(0), tid(2), tid(4)]) == {tid(4)}
    assert journal.expire(10_000.0, limit=1) in ({"SUCCEEDED": 1}, {"CANCELLED": 1})
    assert journal.expire(10_000.0) in ({"SUCCEEDED": 1}, {"CANCELLED": 1})
    assert journal.expire(10_000.0) == {}
    assert [r[0] for r in journal.load_open()] == [tid(4), tid(5)]


def test_held_tasks_their_due_times_dependencies_and_the_results_they_keep(
    journal: PostgresJournal, pg_url: str
) -> None:
    for n in (1, 2, 3, 4):
        insert(journal, n)
    finish(journal, 1, TaskState.SUCCEEDED, expires_at=10.0, value=b"\x01")
    finish(journal, 2, TaskState.SUCCEEDED, expires_at=10.0, value=b"\x02")
    journal.stage_hold(tid(3), TaskState.WAITING)
    journal.stage_deps(tid(3), [(tid(1), True)])
    journal.stage_hold(tid(4), TaskState.DELAYED)
    journal.stage_due(tid(4), 99.5)
    journal.commit()
    journal.release()  # a clean stop: the next master takes over at once
    journal.close()
    again = open_active(pg_url, "m2")
    try:
        rows = {r[0]: r for r in again.load_open()}
        assert (rows[tid(3)][4], rows[tid(4)][4], rows[tid(4)][12]) == ("WAITING", "DELAYED", 99.5)
        assert again.load_deps() == [(tid(3), tid(1), 1)]
        assert again.expire(100.0) == {"SUCCEEDED": 1}  # task 1 is kept: task 3 refers to it
        assert set(again.results([tid(1), tid(2)])) == {tid(1)}
        again.stage_hold(tid(3), TaskState.PENDING, b"with-result")
        again.stage_deps_done(tid(3))
        again.commit()
        assert again.load_deps() == [] and again.expire(100.0) == {"SUCCEEDED": 1}
    finally:
        again.close()


def test_task_defs_are_replaced(journal: PostgresJournal) -> None:
    journal.stage_task_def("m:f", "cpu", None, 0)
    journal.stage_task_def("m:g", "io", 5.0, 2)
    journal.commit()
    journal.stage_task_def("m:f", "io", 1.0, 3)
    journal.commit()
    assert sorted(journal.load_task_defs()) == [("m:f", "io", 1.0, 3), ("m:g", "io", 5.0, 2)]


def test_schema_is_versioned_and_a_newer_one_is_refused(pg_url: str) -> None:
    first = PostgresJournal(pg_url, "m1", 30.0)
    assert first.schema_version == 0  # it made the schema
    first.close()
    second = PostgresJournal(pg_url, "m2", 30.0)
    assert second.schema_version == SCHEMA_VERSION
    second.conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    second.close()
    with pytest.raises(ConfigError, match="newer than this pmaster"):
        PostgresJournal(pg_url, "m3", 30.0)


# -- the lease --------------------------------------------------------------------------------


def test_one_holder_at_a_time_and_takeover_after_expiry(pg_url: str) -> None:
    a = PostgresJournal(pg_url, "a", LEASE_S)
    b = PostgresJournal(pg_url, "b", LEASE_S)
    try:
        assert a.try_acquire("tcp://a:1", "tcp://a:2")
        assert a.previous_released()  # a new database: nobody held it
        assert not b.try_acquire("tcp://b:1", "tcp://b:2")
        held = b.holder()
        assert held is not None and held["holder"] == "a" and held["clients"] == "tcp://a:1"
        a.renew()
        # a stops renewing: b takes over once the database's clock says the lease is gone
        wait_for(lambda: b.try_acquire("tcp://b:1", "tcp://b:2"), timeout=10, what="takeover")
        assert b.token == (a.token or 0) + 1
        assert not b.previous_released()  # a did not release it: a crash, as far as b knows
    finally:
        a.close()
        b.close()


def test_a_stale_token_writes_nothing(pg_url: str) -> None:
    a = PostgresJournal(pg_url, "a", LEASE_S)
    b = PostgresJournal(pg_url, "b", LEASE_S)
    try:
        assert a.try_acquire("", "")
        insert(a, 1)
        a.commit()
        wait_for(lambda: b.try_acquire("", ""), timeout=10, what="takeover")
        insert(a, 2)
        a.stage_finish(tid(1), TaskState.SUCCEEDED, 1, b"", None, 1.0, 2.0, "w", 1.0)
        with pytest.raises(LeaseLost, match="stale"):
            a.commit()
        with pytest.raises(LeaseLost, match="stale"):
            a.renew()
        with pytest.raises(LeaseLost, match="stale"):
            a.expire(10_000.0)
        assert [r[0] for r in b.load_open()] == [tid(1)]  # task 1 still open, no task 2
        insert(b, 3)
        assert b.commit() == 1
    finally:
        a.close()
        b.close()


def test_released_lease_is_taken_at_once(pg_url: str) -> None:
    a = PostgresJournal(pg_url, "a", 30.0)
    b = PostgresJournal(pg_url, "b", 30.0)
    try:
        assert a.try_acquire("", "")
        assert not b.try_acquire("", "")
        a.release()
        assert b.try_acquire("", "")
        assert b.previous_released()
    finally:
        a.close()
        b.close()


def test_a_paused_transaction_does_not_block_a_takeover(pg_url: str) -> None:
    """An active master stopped inside its commit holds the lease row's lock: the server ends
    its session after a lease, and the standby then takes over."""
    a = PostgresJournal(pg_url, "a", LEASE_S)
    b = PostgresJournal(pg_url, "b", LEASE_S)
    try:
        assert a.try_acquire("", "")
        a.conn.execute("BEGIN")
        a.conn.execute("UPDATE lease SET expires_at = expires_at WHERE id = 1")  # the row lock, held
        wait_for(lambda: b.try_acquire("", ""), timeout=15, what="takeover past a held row lock")
        insert(a, 1)
        with pytest.raises(LeaseLost):
            a.commit()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://pf:secret@127.0.0.1/db",
        "postgresql://pf@127.0.0.1/db?password=secret",
    ],
)
def test_a_url_with_a_password_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="PGPASSFILE"):
        MasterSettings(journal=url)


def test_other_urls_are_refused() -> None:
    with pytest.raises(ConfigError, match="postgresql://"):
        MasterSettings(journal="mysql://x@y/z")
    assert MasterSettings(journal="postgresql://pf@127.0.0.1:5432/db").journal


def test_server_fixture_uses_its_password_file(pg_server: PgServer) -> None:
    db = pg_server.new_database()
    with psycopg.connect(pg_server.local_url(db)) as c:
        assert c.execute("SELECT current_user").fetchone() == ("poolfleet",)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_server.url(db), passfile="/nonexistent", connect_timeout=5)


def test_inspection_tables_reads_and_their_expiry(journal: PostgresJournal) -> None:
    for n in (1, 2, 3):
        insert(journal, n, queue="q" if n == 3 else "default")
        journal.stage_start(tid(n), 1)
    journal.stage_attempt(tid(2), 1, "w1", 10.0, 11.0, "worker lost")
    journal.stage_output(tid(2), "tail", 104, b"\x81")
    finish(journal, 1, TaskState.SUCCEEDED, value=b"\x2a", expires_at=10.0)
    finish(journal, 2, TaskState.FAILED, expires_at=10.0)
    journal.stage_queue_paused("q", True)
    journal.stage_queue_paused("q", True)  # again: no error
    journal.commit()
    rows, done = journal.list_window(None, None, 2)
    assert [r[0] for r in rows] == [tid(3), tid(2)] and not done
    rows, done = journal.list_finished("FAILED", None, None, 10)
    assert [r[0] for r in rows] == [tid(2)] and done
    assert journal.ids_between(tid(1), tid(2), 5) == [tid(1), tid(2)]
    row = journal.task_row(tid(2))
    assert row is not None and row[4] == "FAILED" and row[6] == b"payload-2"  # kept for a retry
    success = journal.task_row(tid(1))
    assert success is not None and success[6] is None
    assert journal.attempts_of(tid(2)) == [(1, "w1", 10.0, 11.0, "worker lost")]
    assert journal.output_of(tid(2)) == ("tail", 104, b"\x81")
    assert journal.progress_of([tid(1), tid(2)]) == {tid(2): b"\x81"}
    assert journal.paused_queues() == ["q"]
    journal.stage_queue_paused("q", False)
    journal.commit()
    assert journal.paused_queues() == []
    assert journal.expire(100.0) == {"SUCCEEDED": 1, "FAILED": 1}
    assert journal.attempts_of(tid(2)) == [] and journal.output_of(tid(2)) is None


def test_the_server_gives_up_on_a_silent_master_within_a_few_seconds(pg_url: str) -> None:
    """A master cut off in the middle of a statement leaves its session waiting for the rest,
    holding the lease row's lock, and the idle-in-transaction timeout never ends a session
    that is not idle. So the session has the server's end of its TCP connection give up on a
    silent peer within seconds (keepalives every second after a lease of silence, and a user
    timeout of a lease for data it sent that nobody acknowledges), not the system's hours."""
    j = open_active(pg_url, lease_s=2.0)
    try:
        names = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
        rows = j.conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(names),)
        ).fetchall()
        # pg_settings shows what the server applied to this TCP connection (0: the system's)
        assert dict(rows) == {
            "tcp_keepalives_idle": "2",
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": "2000",
        }
    finally:
        j.close()
