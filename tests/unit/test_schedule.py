"""Schedules as pure logic: ticks of intervals and cron expressions (with time zones and a
daylight-saving change), the settled horizon, coalesced ticks, run ids."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from poolfleet.master.schedule import Schedule, ScheduleError, run_id, tick_of

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
BERLIN = ZoneInfo("Europe/Berlin")


def sched(**kw: Any) -> Schedule:
    args: dict[str, Any] = {
        "name": "s",
        "task": "m:f",
        "payload": b"\x92\x90\x80",
        "options": {},
        "every_s": None,
        "cron": None,
        "timezone": None,
        "catchup": "run-once",
        "paused": False,
        "horizon": T0,
        "created_at": T0,
    }
    args.update(kw)
    return Schedule(**args)


def test_an_interval_ticks_on_multiples_of_it_from_the_epoch() -> None:
    s = sched(every_s=30.0)
    assert s.next_tick == 1_700_000_010.0  # :30 of the minute after T0 (:13:20)
    assert s.due(T0 + 5) is None
    assert s.due(1_700_000_010.0) == 1_700_000_010.0
    s.fired(1_700_000_010.0, b"x" * 16, None)
    assert s.horizon == s.last_tick == 1_700_000_010.0 and s.next_tick == 1_700_000_040.0


def test_several_due_ticks_run_once_as_the_latest() -> None:
    s = sched(every_s=1.0)
    assert s.due(T0 + 7.5) == T0 + 7  # ticks T0+1 .. T0+7 were due: only the latest runs
    s.fired(T0 + 7, b"x" * 16, None)
    assert s.due(T0 + 7.9) is None and s.next_tick == T0 + 8


def test_cron_in_a_time_zone_and_across_a_daylight_saving_change() -> None:
    # 02:30 every day in Berlin; on 2026-03-29 02:00-03:00 does not exist (clocks go forward):
    # cronsim runs such a job at the first minute after the gap, as Debian cron does
    day_before = datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN).timestamp()
    s = sched(cron="30 2 * * *", timezone="Europe/Berlin", horizon=day_before)
    first = datetime.fromtimestamp(s.next_tick, BERLIN)
    assert (first.day, first.hour, first.minute) == (29, 3, 0)
    s.fired(s.next_tick, b"x" * 16, None)
    second = datetime.fromtimestamp(s.next_tick, BERLIN)
    assert (second.day, second.hour, second.minute, second.utcoffset()) == (30, 2, 30, first.utcoffset())
    # the latest tick at or before a time, for coalescing: the 02:30 of that day
    assert s.latest_tick(datetime(2026, 3, 30, 9, 0, tzinfo=BERLIN).timestamp()) == s.next_tick


def test_every_five_minutes_in_utc() -> None:
    s = sched(cron="*/5 * * * *")
    assert s.next_tick == 1_700_000_100.0  # 22:15:00 UTC
    assert s.latest_tick(1_700_000_100.0) == 1_700_000_100.0
    assert s.latest_tick(1_700_000_099.0) == 1_700_000_100.0 - 300


def test_paused_schedules_have_no_next_tick() -> None:
    s = sched(every_s=1.0, paused=True)
    assert s.due(T0 + 100) is None and "next_tick" not in s.describe()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "either an interval"),
        ({"every_s": 1.0, "cron": "* * * * *"}, "either an interval"),
        ({"every_s": 0.5}, "every must be"),
        ({"every_s": 60.0, "timezone": "Europe/Berlin"}, "cron schedules only"),
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"cron": "* * *"}, "bad cron expression"),
        ({"cron": "0 0 30 2 *"}, "bad cron expression"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "* * * * *", "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"every_s": 1.0, "catchup": "all"}, "catchup must be"),
    ],
)
def test_bad_schedules_are_refused_with_the_reason(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        sched(**kw)


def test_run_ids_are_made_from_name_and_tick_and_carry_the_tick() -> None:
    a = run_id("s", T0 + 1)
    assert a == run_id("s", T0 + 1) and a != run_id("s", T0 + 2) and a != run_id("t", T0 + 1)
    assert len(a) == 16 and a[6] >> 4 == 7 and a[8] >> 6 == 2  # UUIDv7 layout
    assert tick_of(a) == T0 + 1


def test_ptask_schedule_list_rows() -> None:
    from poolfleet.client.cli_schedules import schedule_rows, when_text

    every = sched(every_s=30.0)
    cron = sched(name="c", cron="*/5 * * * *", timezone="Europe/Berlin", paused=True)
    every.fired(every.next_tick, run_id("s", every.next_tick), None)
    docs = [every.describe() | {"last_state": "SUCCEEDED"}, cron.describe()]
    assert when_text(docs[1]) == "cron */5 * * * * (Europe/Berlin)"
    (a, b) = schedule_rows(docs)
    assert (
        a[:4] == ["s", "m:f", "every 30s", "active"] and a[5] == "SUCCEEDED" and a[6] == "2023-11-14 22:14:00"
    )
    assert b[3:] == ["paused", "", "", ""]
