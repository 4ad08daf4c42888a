"""Schema version 2 on the PostgreSQL journal, against a real server: a version 1 database
gains priorities, schedules and rate limits; they are kept and replaced like the SQLite ones."""

from __future__ import annotations

import psycopg

from poolfleet.common import codec
from poolfleet.master.journal import SCHEMA_VERSION
from poolfleet.master.journal_pg import SCHEMA_V1, PostgresJournal
from poolfleet.master.schedule import Schedule


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_a_version_1_database_is_migrated_and_keeps_schedules_limits_and_priorities(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        for stmt in SCHEMA_V1:
            c.execute(stmt)
        c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        c.execute(
            "INSERT INTO tasks (id, name, queue, kind, state, created_at) VALUES (%s, 'm:f', 'default', 'cpu', 'PENDING', 0)",
            (tid(1),),
        )
    j = PostgresJournal(pg_url, "m1", 30.0)
    try:
        assert j.schema_version == 1 and SCHEMA_VERSION == 4
        assert j.try_acquire("tcp://c", "tcp://w")
        assert [(r[0], r[13]) for r in j.load_open()] == [(tid(1), 0)]
        j.stage_insert(tid(2), "m:f", "default", "cpu", b"p", None, None, 1.0, -7)
        s = Schedule(
            name="beat", task="m:f", payload=codec.pack_call((), {}), options={"priority": 2},
            every_s=30.0, cron=None, timezone=None, catchup="run-once", paused=False,
            horizon=1_700_000_000.0, created_at=1_700_000_000.0,
        )  # fmt: skip
        j.stage_schedule(s.row(codec.pack))
        j.stage_limit("m:f", 10, 1.0)
        j.commit()
        s.fired(s.next_tick, tid(9), None)
        j.stage_schedule(s.row(codec.pack))  # an upsert: the row is replaced
        j.stage_limit("m:f", 20, 60.0)
        j.commit()
        assert [r[13] for r in j.load_open()] == [0, -7]
        (row,) = j.load_schedules()
        assert Schedule.from_row(row, codec.unpack) == s
        assert j.load_limits() == [("m:f", 20, 60.0)]
        j.stage_schedule_removed("beat")
        j.stage_limit_removed("m:f")
        j.commit()
        assert j.load_schedules() == [] and j.load_limits() == []
    finally:
        j.close()
    again = PostgresJournal(pg_url, "m2", 30.0)
    assert again.schema_version == SCHEMA_VERSION
    again.close()
