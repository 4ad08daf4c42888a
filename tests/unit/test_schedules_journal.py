"""Schema version 2 of both journals' SQLite side: task priorities, schedules and rate limits,
kept on a real file; a version 1 journal is brought up to version 2 with its tasks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from poolfleet.common import codec
from poolfleet.master.journal import SCHEMA, SCHEMA_VERSION, SqliteJournal
from poolfleet.master.schedule import Schedule


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_a_version_1_journal_gains_priorities_schedules_and_limits_and_keeps_its_tasks(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(str(path))
    old.executescript(SCHEMA)
    old.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    old.execute(
        "INSERT INTO tasks (id, name, queue, kind, state, created_at) VALUES (?, 'm:f', 'default', 'cpu', 'PENDING', 0)",
        (tid(1),),
    )
    old.commit()
    old.close()
    j = SqliteJournal(path)
    try:
        assert j.schema_version == 1 and SCHEMA_VERSION == 4
        assert [(r[0], r[13]) for r in j.load_open()] == [(tid(1), 0)]  # priority 0: the default
        assert j.load_schedules() == [] and j.load_limits() == []
    finally:
        j.close()
    again = SqliteJournal(path)  # the step ran once: opening again changes nothing
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_priorities_schedules_and_limits_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = SqliteJournal(path)
    j.stage_insert(tid(1), "m:f", "default", "cpu", b"p", None, None, 1.0, 7)
    s = Schedule(
        name="nightly",
        task="m:f",
        payload=codec.pack_call((1,), {}),
        options={"queue": "q", "priority": 3},
        every_s=None,
        cron="0 2 * * *",
        timezone="Europe/Berlin",
        catchup="skip",
        paused=False,
        horizon=1_700_000_000.0,
        created_at=1_700_000_000.0,
    )
    j.stage_schedule(s.row(codec.pack))
    j.stage_limit("m:f", 10, 1.0)
    j.stage_limit("m:g", 5, 60.0)
    j.commit()
    j.stage_limit_removed("m:g")
    s.fired(s.next_tick, tid(9), None)
    j.stage_schedule(s.row(codec.pack))  # written whole again: replaces the row
    j.commit()
    j.close()
    j = SqliteJournal(path)
    try:
        assert [r[13] for r in j.load_open()] == [7]
        (row,) = j.load_schedules()
        back = Schedule.from_row(row, codec.unpack)
        assert back == s and back.last_task == tid(9) and back.next_tick == s.next_tick
        assert j.load_limits() == [("m:f", 10, 1.0)]
        j.stage_schedule_removed("nightly")
        j.commit()
        assert j.load_schedules() == []
    finally:
        j.close()
