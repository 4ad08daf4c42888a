"""The SQLite journal on a real file: staging, group commit, recovery reads, results, expiry."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import TaskState
from poolfleet.master.journal import SCHEMA_VERSION, Journal, SqliteJournal


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite3"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    j = Journal(path)
    yield j
    j.close()


def insert(j: Journal, n: int, name: str = "m:f", queue: str = "default", kind: str = "cpu") -> None:
    j.stage_insert(tid(n), name, queue, kind, b"payload-%d" % n, 2.5, 1, float(n))


def finish(
    j: Journal, n: int, state: TaskState, expires_at: float = 1000.0, value: bytes | None = None
) -> None:
    j.stage_finish(tid(n), state, 1, value, b"err" if value is None else None, 50.0, expires_at, "w1", 12.5)


def other_reader(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path))


def test_wal_mode_and_bad_sync_setting(path: Path) -> None:
    j = Journal(path, sync="full")
    assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    j.close()
    with pytest.raises(ValueError, match="'never'"):
        Journal(path, sync="never")


def test_nothing_is_written_before_commit(journal: Journal, path: Path) -> None:
    insert(journal, 1)
    insert(journal, 2)
    assert journal.staged == 2
    reader = other_reader(path)
    assert reader.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
    assert journal.commit() == 2
    assert journal.staged == 0
    assert reader.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2
    assert journal.commit() == 0  # nothing staged: no transaction
    reader.close()


def test_group_commit_is_all_or_nothing(journal: Journal, path: Path) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.stage_requeue(tid(2), None, 0)  # type: ignore[arg-type]  # violates NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        journal.commit()
    assert journal.staged == 0
    assert journal.existing([tid(1), tid(2)]) == set()  # the whole turn was rolled back
    insert(journal, 1)
    assert journal.commit() == 1  # and the journal is usable afterwards
    assert journal.existing([tid(1)]) == {tid(1)}


def test_insert_is_idempotent_the_first_one_stands(journal: Journal) -> None:
    insert(journal, 1, name="m:first")
    journal.commit()
    insert(journal, 1, name="m:second")
    insert(journal, 1, name="m:third")
    assert journal.commit() == 2
    rows = list(journal.load_open())
    assert len(rows) == 1 and rows[0][1] == "m:first"


def test_load_open_after_insert_start_requeue(journal: Journal, path: Path) -> None:
    for n in (3, 1, 2):
        insert(journal, n, queue=f"q{n}", kind="io")
    journal.stage_start(tid(1), 1)
    journal.stage_start(tid(2), 1)
    journal.stage_requeue(tid(2), 1, 2)
    journal.commit()
    journal.close()
    again = Journal(path)  # a restarted master reads the same file
    rows = list(again.load_open())
    assert [r[0] for r in rows] == [tid(1), tid(2), tid(3)]  # oldest (smallest id) first
    assert rows[0][1:] == ("m:f", "q1", "io", "DISPATCHED", 1, b"payload-1", 2.5, 1, 0, 0, 1.0, None, 0)
    assert rows[1][4:6] == ("PENDING", 1) and rows[1][9:11] == (1, 2)
    assert rows[2][4:6] == ("PENDING", 0)
    again.close()


def test_finish_stores_the_result_and_drops_the_payload(journal: Journal) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.stage_start(tid(1), 1)
    finish(journal, 1, TaskState.SUCCEEDED, value=b"\x2a")
    journal.commit()
    assert [r[0] for r in journal.load_open()] == [tid(2)]
    assert journal.db.execute("SELECT payload FROM tasks WHERE id = ?", (tid(1),)).fetchone()[0] is None
    res = journal.results([tid(1), tid(2), tid(99)])
    assert list(res) == [tid(1)]  # open and unknown tasks have no result
    assert res[tid(1)] == (tid(1), "m:f", "SUCCEEDED", 1, b"\x2a", None, "w1", 12.5, 50.0)


def test_existing_and_results_work_in_chunks(journal: Journal) -> None:
    for n in range(1200):
        insert(journal, n)
        if n % 2:
            finish(journal, n, TaskState.FAILED)
    journal.commit()
    asked = [tid(n) for n in range(0, 1400, 1)]
    assert journal.existing(asked) == {tid(n) for n in range(1200)}
    res = journal.results(asked)
    assert set(res) == {tid(n) for n in range(1, 1200, 2)}
    assert res[tid(1)][5] == b"err"


def test_final_counts_and_expiry(journal: Journal) -> None:
    for n in range(6):
        insert(journal, n)
    finish(journal, 0, TaskState.SUCCEEDED, expires_at=100.0, value=b"")
    finish(journal, 1, TaskState.SUCCEEDED, expires_at=200.0, value=b"")
    finish(journal, 2, TaskState.FAILED, expires_at=100.0)
    finish(journal, 3, TaskState.CANCELLED, expires_at=300.0)
    journal.commit()
    assert journal.final_counts() == {"SUCCEEDED": 2, "FAILED": 1, "CANCELLED": 1}
    assert journal.expire(100.0) == {}  # expires_at must be passed, not reached
    assert journal.expire(150.0) == {"SUCCEEDED": 1, "FAILED": 1}
    assert journal.final_counts() == {"SUCCEEDED": 1, "CANCELLED": 1}
    assert journal.existing([tid(0), tid(2), tid(4)]) == {tid(4)}  # open tasks never expire
    assert journal.expire(10_000.0, limit=1) in ({"SUCCEEDED": 1}, {"CANCELLED": 1})
    assert journal.expire(10_000.0) in ({"SUCCEEDED": 1}, {"CANCELLED": 1})
    assert journal.expire(10_000.0) == {}
    assert [r[0] for r in journal.load_open()] == [tid(4), tid(5)]


def test_task_defs_are_replaced(journal: Journal) -> None:
    journal.stage_task_def("m:f", "cpu", None, 0)
    journal.stage_task_def("m:g", "io", 5.0, 2)
    journal.commit()
    journal.stage_task_def("m:f", "io", 1.0, 3)
    journal.commit()
    assert sorted(journal.load_task_defs()) == [("m:f", "io", 1.0, 3), ("m:g", "io", 5.0, 2)]


def test_checkpoint_truncates_the_wal(journal: Journal, path: Path) -> None:
    for n in range(50):
        insert(journal, n)
    journal.commit()
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0
    journal.checkpoint()
    assert wal.stat().st_size == 0


def test_a_journal_of_an_earlier_version_loses_its_state_index_and_keeps_its_tasks(path: Path) -> None:
    old = sqlite3.connect(str(path))
    old.executescript(
        "CREATE TABLE tasks (id BLOB PRIMARY KEY, name TEXT NOT NULL, queue TEXT NOT NULL,"
        " kind TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, payload BLOB,"
        " timeout_s REAL, retries INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,"
        " lost INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, finished_at REAL, expires_at REAL,"
        " value BLOB, error BLOB, worker_id TEXT, duration_ms REAL) WITHOUT ROWID;"
        "CREATE INDEX tasks_open ON tasks(state) WHERE state IN ('PENDING', 'RUNNING');"
    )
    for n, state in ((3, "RUNNING"), (1, "PENDING"), (2, "SUCCEEDED")):
        old.execute(
            "INSERT INTO tasks (id, name, queue, kind, state, created_at) VALUES (?, 'm:f', 'default', 'cpu', ?, 0)",
            (tid(n), state),
        )
    old.commit()
    old.close()
    j = Journal(path)
    try:
        assert j.schema_version == 0  # no meta table: migrated to the current version
        assert j.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        indexes = {r[0] for r in j.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "tasks_open" not in indexes
        assert [(row[0], row[4]) for row in j.load_open()] == [(tid(1), "PENDING"), (tid(3), "RUNNING")]
    finally:
        j.close()


def test_schema_version_is_kept_and_a_newer_journal_is_refused(path: Path) -> None:
    assert Journal is SqliteJournal
    j = SqliteJournal(path)
    assert j.schema_version == 0  # a new file
    j.close()
    j = SqliteJournal(path)
    assert j.schema_version == SCHEMA_VERSION
    j.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    j.close()
    with pytest.raises(ConfigError, match="newer than this pmaster"):
        SqliteJournal(path)


# -- inspection: listings, prefixes, rows, attempts, paused queues ------------------------------


def test_a_task_that_did_not_succeed_keeps_its_payload_and_a_succeeded_one_drops_it(journal: Journal) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.commit()
    finish(journal, 1, TaskState.FAILED)
    finish(journal, 2, TaskState.SUCCEEDED, value=b"v")
    journal.commit()
    row1, row2 = journal.task_row(tid(1)), journal.task_row(tid(2))
    assert row1 is not None and row2 is not None
    assert (row1[4], row1[6]) == ("FAILED", b"payload-1")
    assert (row2[4], row2[6]) == ("SUCCEEDED", None)
    assert journal.task_row(tid(3)) is None


def test_listings_go_newest_first_in_windows_and_by_state_through_the_partial_index(journal: Journal) -> None:
    for n in range(1, 8):
        insert(journal, n)
    journal.commit()
    for n in (2, 4, 6):
        finish(journal, n, TaskState.FAILED)
    finish(journal, 5, TaskState.SUCCEEDED, value=b"v")
    journal.commit()
    rows, done = journal.list_window(None, None, 3)
    assert [r[0] for r in rows] == [tid(7), tid(6), tid(5)] and not done
    rows, done = journal.list_window(tid(5), tid(2), 10)
    assert [r[0] for r in rows] == [tid(4), tid(3), tid(2)] and done
    rows, done = journal.list_finished("FAILED", None, None, 2)
    assert [r[0] for r in rows] == [tid(6), tid(4)] and not done
    rows, done = journal.list_finished("FAILED", tid(4), None, 2)
    assert [r[0] for r in rows] == [tid(2)] and done
    plan = journal.db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM tasks WHERE state = 'FAILED' AND finished_at IS NOT NULL"
        " ORDER BY id DESC"
    ).fetchall()
    assert "tasks_finished" in str(plan)


def test_ids_between_serves_prefixes_and_attempts_and_pauses_are_kept(journal: Journal, path: Path) -> None:
    for n in (0x1100, 0x1200, 0x1201):
        insert(journal, n)
    journal.stage_attempt(tid(0x1100), 1, "w1", 10.0, 11.0, "worker lost")
    journal.stage_queue_paused("q1", True)
    journal.stage_queue_paused("q2", True)
    journal.stage_queue_paused("q2", False)
    journal.commit()
    low, high = bytes(14) + b"\x12\x00", bytes(14) + b"\x12\xff"
    assert journal.ids_between(low, high, 5) == [tid(0x1200), tid(0x1201)]
    assert journal.ids_between(low, high, 1) == [tid(0x1200)]
    assert journal.attempts_of(tid(0x1100)) == [(1, "w1", 10.0, 11.0, "worker lost")]
    assert journal.paused_queues() == ["q1"]
    finish(journal, 0x1100, TaskState.FAILED, expires_at=5.0)
    journal.commit()
    journal.expire(6.0)
    assert journal.attempts_of(tid(0x1100)) == []  # expired with its task


# -- tasks that wait: held states, due times, dependency rows (schema version 2) -----------------
def test_held_tasks_keep_their_state_due_time_and_dependencies_across_a_restart(
    journal: Journal, path: Path
) -> None:
    insert(journal, 1)
    insert(journal, 2)
    journal.stage_hold(tid(2), TaskState.WAITING)  # folded into the insert of the same commit
    journal.stage_deps(tid(2), [(tid(1), True)])
    insert(journal, 3)
    journal.stage_hold(tid(3), TaskState.DELAYED)
    journal.stage_due(tid(3), 1234.5)
    journal.commit()
    journal.stage_hold(tid(2), TaskState.PENDING, b"with-result")
    journal.commit()
    journal.close()
    again = Journal(path)
    try:
        rows = {r[0]: r for r in again.load_open()}
        assert rows[tid(2)][4] == "PENDING" and rows[tid(2)][6] == b"with-result"
        assert rows[tid(3)][4] == "DELAYED" and rows[tid(3)][12] == 1234.5
        assert again.load_deps() == [(tid(2), tid(1), 1)]
        again.stage_deps_done(tid(2))
        again.commit()
        assert again.load_deps() == []
    finally:
        again.close()


def test_a_result_a_waiting_task_refers_to_is_not_expired(journal: Journal) -> None:
    for n in (1, 2, 3):
        insert(journal, n)
    finish(journal, 1, TaskState.SUCCEEDED, expires_at=10.0, value=b"\x01")
    finish(journal, 2, TaskState.SUCCEEDED, expires_at=10.0, value=b"\x02")
    journal.stage_hold(tid(3), TaskState.WAITING)
    journal.stage_deps(tid(3), [(tid(1), True)])
    journal.commit()
    assert journal.expire(100.0) == {"SUCCEEDED": 1}
    assert set(journal.results([tid(1), tid(2)])) == {tid(1)}  # kept: task 3 needs it
    journal.stage_deps_done(tid(3))
    journal.commit()
    assert journal.expire(100.0) == {"SUCCEEDED": 1}


def test_a_version_1_journal_is_migrated_to_the_current_version(path: Path) -> None:
    from poolfleet.master.journal import SCHEMA

    old = sqlite3.connect(str(path))
    old.executescript(SCHEMA)
    old.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    old.execute(
        "INSERT INTO tasks (id, name, queue, kind, state, created_at) VALUES (?, 'm:f', 'default', 'cpu', 'PENDING', 0)",
        (tid(1),),
    )
    old.commit()
    old.close()
    j = Journal(path)
    try:
        assert j.schema_version == 1 and SCHEMA_VERSION == 4
        assert [(r[0], r[4], r[12]) for r in j.load_open()] == [(tid(1), "PENDING", None)]
        assert j.load_deps() == []
    finally:
        j.close()


def _states(path: Path) -> dict[int, tuple[str, int]]:
    reader = other_reader(path)
    try:
        rows = reader.execute("SELECT id, state, attempt FROM tasks").fetchall()
    finally:
        reader.close()
    return {int.from_bytes(r[0], "big"): (r[1], r[2]) for r in rows}


def _deferring(j: Journal, tasks: int, at: float) -> list[float]:
    """Starts deferred by 1 s on a clock the test moves (``[now]``), ``tasks`` rows committed."""
    t = [at]
    j.clock = lambda: t[0]
    j.start_defer_s = 1.0
    for n in range(1, tasks + 1):
        insert(j, n)
    j.commit()
    return t


def test_a_deferred_start_is_written_once_due_or_never_if_its_task_ends_first(
    journal: Journal, path: Path
) -> None:
    t = _deferring(journal, 3, 100.0)
    for n in (1, 2, 3):
        journal.stage_start(tid(n), 1)
    assert journal.next_start_due() == 101.0
    assert journal.commit() == 0  # not due: nothing written, no transaction
    assert _states(path) == {1: ("PENDING", 0), 2: ("PENDING", 0), 3: ("PENDING", 0)}
    finish(journal, 1, TaskState.SUCCEEDED, value=b"v")  # ends within the delay: one write
    journal.stage_requeue(tid(2), 1, 0)  # goes back: its attempt is recorded first
    assert journal.commit() == 3  # the finish; task 2's start, then its requeue
    assert _states(path) == {1: ("SUCCEEDED", 1), 2: ("PENDING", 1), 3: ("PENDING", 0)}
    t[0] = 101.0
    assert journal.next_start_due() == 101.0  # task 3's; 1 and 2 are skipped
    assert journal.commit() == 1
    assert _states(path)[3] == ("DISPATCHED", 1)
    assert journal.next_start_due() is None
    assert journal.commit() == 0


def test_a_start_again_supersedes_the_deferred_one_and_a_final_commit_writes_all(
    journal: Journal, path: Path
) -> None:
    t = _deferring(journal, 2, 0.0)
    journal.stage_start(tid(1), 1)
    t[0] = 0.5
    journal.stage_requeue(tid(1), 0, 1)  # its worker was lost
    journal.stage_start(tid(1), 2)  # and it went to another
    journal.stage_start(tid(2), 1)
    t[0] = 1.2  # the first entry's time, but attempt 1 is no longer the current start
    assert journal.commit() == 2  # the start of attempt 1 and the requeue
    assert _states(path)[1] == ("PENDING", 1)
    assert journal.commit(final=True) == 2  # a clean stop: what is deferred is written now
    assert _states(path) == {1: ("DISPATCHED", 2), 2: ("DISPATCHED", 1)}


class RowByRow(SqliteJournal):
    """The journal as it writes without multi-row statements: the reference for them."""

    MANY = {}


def stage_lifecycle(j: Journal, n: int) -> None:
    """n inserts, committed; n starts, committed; n finishes of every kind, committed."""
    for k in range(n):
        insert(j, k)
    j.commit()
    for k in range(n):
        j.stage_start(tid(k), 1 + k % 3)
    j.commit()
    states = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT)
    for k in range(n):
        value = b"v%d" % k if k % 4 == 0 else None
        j.stage_finish(
            tid(k),
            states[k % 4],
            1 + k % 3,
            value,
            None if value else b"e%d" % k,
            50.0 + k,
            900.0 + k,
            f"w{k % 7}",
            k / 8,
        )
    j.commit()


def all_rows(j: Journal) -> list[tuple[object, ...]]:
    return j.db.execute("SELECT * FROM tasks ORDER BY id").fetchall()


def test_long_runs_are_written_in_multi_row_statements_with_the_same_rows_as_one_by_one(
    tmp_path: Path,
) -> None:
    n = 512 + 256 + 64 + 32 + 7  # each of the three runs: statements of these rows, 7 left
    reference = RowByRow(tmp_path / "one.sqlite3")
    stage_lifecycle(reference, n)
    j = Journal(tmp_path / "many.sqlite3")
    statements: list[str] = []
    j.db.set_trace_callback(statements.append)
    stage_lifecycle(j, n)
    j.db.set_trace_callback(None)
    rows = all_rows(j)
    assert len(rows) == n
    assert rows == all_rows(reference)
    assert {r[0] for r in j.db.execute("SELECT payload IS NULL FROM tasks WHERE state = 'SUCCEEDED'")} == {1}
    writes = [s for s in statements if s.startswith(("INSERT", "UPDATE", "WITH"))]
    assert len(writes) == 3 * (4 + 7)  # executemany runs its statement once a row
    reference.close()
    j.close()


def test_a_run_with_two_finishes_of_one_task_is_written_in_order(journal: Journal) -> None:
    n = 100
    for k in range(n):
        insert(journal, k)
    journal.commit()
    for k in range(n):
        finish(journal, k, TaskState.FAILED)
    finish(journal, 3, TaskState.SUCCEEDED, value=b"late")  # the second of task 3's, last
    journal.commit()
    state, value, payload = journal.db.execute(
        "SELECT state, value, payload FROM tasks WHERE id = ?", (tid(3),)
    ).fetchone()
    assert (state, value, payload) == ("SUCCEEDED", b"late", None)
    assert journal.db.execute("SELECT count(*) FROM tasks WHERE state = 'FAILED'").fetchone()[0] == n - 1
