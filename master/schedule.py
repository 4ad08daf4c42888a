"""Schedules: periodic tasks kept by the master (pure logic; wall-clock times passed in).

A schedule's ticks are wall-clock times: ``every_s`` seconds apart counted from the Unix
epoch (``every 30s`` fires at :00 and :30 of each minute), or the times a cron expression
names in the schedule's time zone. Cron expressions are read by cronsim, which follows
Debian cron around daylight-saving changes: a job at a time that does not exist that day runs
when the clocks have moved on (at the first minute after the gap), and a job at a time that
comes twice runs once, at the first one; expressions with ``*`` in the minute or hour field
simply run at the times that do exist.

``horizon`` is the last tick that is settled: a tick at or before it never runs. Firing a
tick moves the horizon to it in the same journal commit as the task the tick made, so a tick
runs at most once, across master restarts and crashes too. When several ticks are due at
once (the master was down, or its loop was held up) only the latest runs, or, after a
restart, none of the missed ones with ``catchup="skip"``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

CATCHUP = ("run-once", "skip")
#: The shortest and longest ``every`` interval.
MIN_EVERY_S = 1.0
MAX_EVERY_S = 366 * 86400.0
#: Schedules a master keeps at most.
MAX_SCHEDULES = 10_000


class ScheduleError(ValueError):
    """A schedule that cannot be kept as given (the message says why)."""


def zone(name: str | None) -> ZoneInfo:
    """The IANA time zone ``name`` (UTC when None)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: use an IANA name like Europe/Berlin or UTC"
        ) from None


def check_cron(expr: str, tz: ZoneInfo) -> None:
    try:
        CronSim(expr, datetime.now(tz))
    except (CronSimError, ValueError, IndexError) as exc:
        raise ScheduleError(f"bad cron expression {expr!r}: {exc or 'not understood'}") from None


def run_id(name: str, tick: float) -> bytes:
    """The task id of the run of ``name`` at ``tick``: made from both, so a tick fired again
    (it never is) would name the same task. Laid out like any task id (common/ids.py): the
    tick's Unix time in milliseconds in the first 48 bits, version 7, then bits of a hash."""
    ms = max(0, round(tick * 1000)) & ((1 << 48) - 1)
    h = hashlib.blake2b(f"{name}\0{ms}".encode(), digest_size=10).digest()
    return ms.to_bytes(6, "big") + bytes((0x70 | (h[0] & 0x0F), h[1], 0x80 | (h[2] & 0x3F))) + h[3:]


def tick_of(task_id: bytes) -> float:
    """The tick (Unix time) a schedule's run id was made for."""
    return int.from_bytes(task_id[:6], "big") / 1000


@dataclass
class Schedule:
    """One schedule, as the journal keeps it (``next_tick`` is worked out from the rest)."""

    name: str
    task: str
    payload: bytes
    options: dict[str, Any]
    every_s: float | None
    cron: str | None
    timezone: str | None
    catchup: str
    paused: bool
    horizon: float
    created_at: float
    last_tick: float | None = None
    last_task: bytes | None = None
    #: why the last tick made no task (the submit was refused), until the next tick
    refused: str | None = None
    next_tick: float = field(default=math.inf, compare=False)
    #: the tick missed while the master was down, to run at the first turn (catchup run-once)
    catch_up: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.every_s is None) == (self.cron is None):
            raise ScheduleError("a schedule needs either an interval (every) or a cron expression, not both")
        if self.every_s is not None:
            if not (math.isfinite(self.every_s) and MIN_EVERY_S <= self.every_s <= MAX_EVERY_S):
                raise ScheduleError(
                    f"every must be from {MIN_EVERY_S:g} s to {MAX_EVERY_S:g} s, not {self.every_s:g}"
                )
            if self.timezone is not None:
                raise ScheduleError("a time zone applies to cron schedules only (an interval counts in UTC)")
        self._tz = zone(self.timezone)
        if self.cron is not None:
            check_cron(self.cron, self._tz)
        if self.catchup not in CATCHUP:
            raise ScheduleError(f"catchup must be run-once or skip, not {self.catchup!r}")
        self.settle()

    # -- ticks -------------------------------------------------------------------------
    def tick_after(self, t: float) -> float:
        """The first tick later than ``t``."""
        if self.every_s is not None:
            return (math.floor(t / self.every_s) + 1) * self.every_s
        assert self.cron is not None
        start = datetime.fromtimestamp(math.floor(t), self._tz)
        return next(CronSim(self.cron, start)).timestamp()

    def latest_tick(self, t: float) -> float:
        """The last tick at or before ``t``."""
        if self.every_s is not None:
            return math.floor(t / self.every_s) * self.every_s
        assert self.cron is not None
        start = datetime.fromtimestamp(math.floor(t), self._tz) + timedelta(seconds=1)
        return next(CronSim(self.cron, start, reverse=True)).timestamp()

    def settle(self) -> None:
        """Work out the next tick after the horizon (none while paused)."""
        self.next_tick = math.inf if self.paused else self.tick_after(self.horizon)

    def due(self, wall: float) -> float | None:
        """The tick to run now (the latest one due), or None."""
        if self.next_tick > wall:
            return None
        return max(self.next_tick, self.latest_tick(wall))

    def fired(self, tick: float, task_id: bytes, refused: str | None) -> None:
        self.horizon = self.last_tick = tick
        self.last_task = task_id
        self.refused = refused
        self.settle()

    # -- the journal's row -------------------------------------------------------------
    def row(self, pack: Any) -> tuple[Any, ...]:
        """The row (journal_schedules.SCHEDULE_COLUMNS); ``pack`` encodes the options map."""
        return (
            self.name,
            self.task,
            self.payload,
            pack(self.options),
            self.every_s,
            self.cron,
            self.timezone,
            self.catchup,
            int(self.paused),
            self.horizon,
            self.last_tick,
            self.last_task,
            self.created_at,
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...], unpack: Any) -> Schedule:
        (
            name,
            task,
            payload,
            options,
            every_s,
            cron,
            tz,
            catchup,
            paused,
            horizon,
            last_tick,
            last_task,
            cat,
        ) = row
        return cls(
            name=name,
            task=task,
            payload=bytes(payload),
            options=unpack(bytes(options)),
            every_s=every_s,
            cron=cron,
            timezone=tz,
            catchup=catchup,
            paused=bool(paused),
            horizon=horizon,
            created_at=cat,
            last_tick=last_tick,
            last_task=None if last_task is None else bytes(last_task),
        )

    def describe(self) -> dict[str, Any]:
        """The schedule as SCHEDULE_CONTROL_REPLY lists it (without its last run's state)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "payload": self.payload,
            "options": dict(self.options),
            "catchup": self.catchup,
            "paused": self.paused,
            "created_at": self.created_at,
        }
        if self.every_s is not None:
            doc["every_s"] = self.every_s
        else:
            doc["cron"] = self.cron
            doc["timezone"] = self.timezone or "UTC"
        if self.next_tick != math.inf:
            doc["next_tick"] = self.next_tick
        if self.last_tick is not None:
            doc["last_tick"] = self.last_tick
        if self.last_task is not None:
            doc["last_task"] = self.last_task
        return doc


def iso(t: float, tz: ZoneInfo | None = None) -> str:
    """A tick as text, for logs."""
    return datetime.fromtimestamp(t, tz or UTC).isoformat()
