"""The master core's schedules and fleet-wide rate limits: SCHEDULE_CONTROL and LIMIT_CONTROL
(add, list, pause, resume, remove a schedule; set, list, remove a limit), the schedules kept
from the journal at a restart, and the firing of due ticks.

A due tick becomes a task like a submitted one (every submit check applies) under an id made
from the schedule's name and the tick. It is fired after the turn's dispatch round, so the
commit that records the tick and its task comes before any worker can have the task: a crash
before that commit leaves no trace of the tick (it runs after the restart), one after it
leaves it recorded (it never runs again).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, cast

import structlog

from poolfleet.common import codec
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import ErrorCode, MsgKind, Role
from poolfleet.master import client_api
from poolfleet.master.core_base import JournalPort
from poolfleet.master.core_clients import ClientEvents
from poolfleet.master.ratelimit import check_rate
from poolfleet.master.schedule import MAX_SCHEDULES, Schedule, ScheduleError, iso, run_id

log = structlog.get_logger("pmaster")

UNKNOWN_SCHEDULE = ErrorCode.UNKNOWN_SCHEDULE
SCHEDULE_EXISTS = ErrorCode.SCHEDULE_EXISTS
#: The task options a schedule may carry (as in a SUBMIT entry).
SCHEDULE_OPTIONS = ("kind", "queue", "timeout_s", "retries", "priority")
_OWNER = b"schedule:"


class ScheduleJournal(JournalPort, Protocol):
    """The journal writes of schedules and limits (journal_schedules.py)."""

    def stage_schedule(self, row: tuple[Any, ...]) -> None: ...
    def stage_schedule_removed(self, name: str) -> None: ...
    def stage_limit(self, name: str, count: int, period_s: float) -> None: ...
    def stage_limit_removed(self, name: str) -> None: ...


class ScheduleEvents(ClientEvents):
    """Schedules and rate limits (a base of the core; see core.py)."""

    #: the schedules by name
    schedules: dict[str, Schedule]
    #: the earliest next tick among the schedules that run (wall clock)
    _next_fire = math.inf
    #: the wall clock less the monotonic one, as of the last tick
    _gap = 0.0
    #: a tick fired in this turn: the next turn dispatches its task at once
    _fired = False

    @property
    def sjournal(self) -> ScheduleJournal:
        return cast(ScheduleJournal, self.journal)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedules = {}

    def _keep(self, s: Schedule) -> None:
        """Stage the schedule's row (then ``_refresh`` the next firing time)."""
        self.sjournal.stage_schedule(s.row(self.pack))

    def _refresh(self) -> None:
        self._next_fire = min((x.next_tick for x in self.schedules.values()), default=math.inf)

    # -- restart -------------------------------------------------------------------------
    def recover_schedules(
        self, rows: list[tuple[Any, ...]], limits: list[tuple[str, int, float]], wall: float
    ) -> None:
        """Load the journal's schedules and limits. Ticks missed while the master was down run
        once, at the first tick (``run-once``), or are settled unrun here (``skip``)."""
        self.schedules = {}
        for row in rows:
            try:
                s = Schedule.from_row(row, codec.unpack)
            except ScheduleError as exc:  # a time zone this machine lacks, say: kept, not run
                log.error("schedule_unusable", schedule=row[0], reason=str(exc))
                continue
            self.schedules[s.name] = s
            missed = s.due(wall)
            if missed is None:
                continue
            if s.catchup == "skip":
                s.horizon = missed
                s.settle()
                log.info("schedule_ticks_skipped", schedule=s.name, until=iso(missed))
                self._keep(s)
            else:  # that very tick runs (a later one due by the first turn runs as well)
                s.catch_up = missed
                log.info("schedule_tick_missed", schedule=s.name, tick=iso(missed), runs="once, now")
        for name, count, period_s in limits:
            self.scheduler.limits.set(name, count, period_s)
        self._refresh()
        log.info("schedules_recovered", schedules=len(self.schedules), limits=len(limits), wall=wall)

    # -- firing ------------------------------------------------------------------------------
    def fire_due(self, now: float, wall: float) -> None:
        """Run the due tick of every schedule (after the dispatch round: see the module doc)."""
        self._gap = wall - now
        self._fired = False
        if wall < self._next_fire:
            return
        for s in self.schedules.values():
            missed, s.catch_up = s.catch_up, None
            if missed is not None and not s.paused:
                self._fire(s, missed, now, wall)
            tick = s.due(wall)
            if tick is not None:
                self._fire(s, tick, now, wall)
        self._refresh()

    def _fire(self, s: Schedule, tick: float, now: float, wall: float) -> None:
        tid = run_id(s.name, tick)
        entry: dict[str, Any] = {"id": tid, "name": s.task, "payload": s.payload, **s.options}
        self.submit(_OWNER + s.name.encode(), 0, [entry], False, now, wall)
        submitted = self.after_commit.pop()  # the SUBMITTED it queued: nobody waits for it
        assert submitted.kind is MsgKind.SUBMITTED
        rejected = submitted.body["rejected"]
        refused = f"{rejected[0]['code']}: {rejected[0]['message']}" if rejected else None
        skipped = 0 if s.last_tick is None or s.every_s is None else round((tick - s.next_tick) / s.every_s)
        s.fired(tick, tid, refused)
        self._keep(s)
        self._fired = True
        if refused:
            log.warning("schedule_run_refused", schedule=s.name, tick=iso(tick), reason=refused)
        else:
            log.info(
                "schedule_fired",
                schedule=s.name,
                task_name=s.task,
                task_id=format_id(tid),
                tick=iso(tick),
                late_s=round(wall - tick, 3),
                coalesced=max(0, skipped),
            )

    def schedule_wait_s(self, now: float) -> float | None:
        """Seconds until the next tick (0: fired in this turn, dispatch at once)."""
        if self._fired:
            return 0.0
        if self._next_fire == math.inf:
            return None
        return max(0.0, self._next_fire - (now + self._gap))

    # -- SCHEDULE_CONTROL ---------------------------------------------------------------------
    def schedule_control(self, client: bytes, req: int, body: dict[str, Any], wall: float) -> None:
        """add / remove / pause / resume / list; the reply follows the commit."""
        action = body["action"]
        changed = False
        if action == "list":
            shown = sorted(self.schedules)
        elif action == "add":
            s = self._new_schedule(body.get("schedule"), wall)
            old = self.schedules.get(s.name)
            if old is not None and not _same(old, s):
                raise ProtocolError(
                    SCHEDULE_EXISTS, f"a schedule named {s.name!r} exists already; remove it first"
                )
            if old is None:
                if len(self.schedules) >= MAX_SCHEDULES:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, f"at most {MAX_SCHEDULES} schedules")
                self.schedules[s.name] = s
                self._keep(s)
                self._refresh()
                changed = True
                log.info("schedule_added", schedule=s.name, task_name=s.task, next_tick=iso(s.next_tick))
            shown = [s.name]
        elif action in ("remove", "pause", "resume"):
            name = body.get("name")
            known = self.schedules.get(name) if isinstance(name, str) else None
            if known is None:
                raise ProtocolError(UNKNOWN_SCHEDULE, f"no schedule named {name!r} (see ptask schedule list)")
            changed = self._change(known, action, wall)
            shown = [] if action == "remove" else [known.name]
        else:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "SCHEDULE_CONTROL: action must be add, list, remove, pause or resume"
            )
        docs = [self._schedule_doc(self.schedules[n]) for n in shown]
        self._later(
            Role.CLIENT,
            client,
            MsgKind.SCHEDULE_CONTROL_REPLY,
            {"req": req, "action": action, "changed": changed, "schedules": docs},
        )

    def _change(self, s: Schedule, action: str, wall: float) -> bool:
        if action == "remove":
            del self.schedules[s.name]
            self.sjournal.stage_schedule_removed(s.name)
            self._refresh()
            log.info("schedule_removed", schedule=s.name)
            return True
        pause = action == "pause"
        if s.paused == pause:
            return False
        s.paused = pause
        if not pause:  # ticks that fell while it was paused do not run
            s.horizon = max(s.horizon, wall)
        s.settle()
        self._keep(s)
        self._refresh()
        log.info("schedule_paused" if pause else "schedule_resumed", schedule=s.name)
        return True

    def _new_schedule(self, doc: Any, wall: float) -> Schedule:
        if not isinstance(doc, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "SCHEDULE_CONTROL add: schedule must be a map")
        name, task, payload = doc.get("name"), doc.get("task"), doc.get("payload")
        if not isinstance(name, str) or not client_api.QUEUE_NAME.match(name):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"bad schedule name {name!r}: 1 to 100 of A-Z a-z 0-9 _ . -"
            )
        if not isinstance(task, str) or not isinstance(payload, bytes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "SCHEDULE_CONTROL add: task (str) and payload (bin)")
        options = doc.get("options") or {}
        if not isinstance(options, dict) or set(options) - set(SCHEDULE_OPTIONS):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"schedule options must be a map of {', '.join(SCHEDULE_OPTIONS)}"
            )
        entry = {"id": bytes(16), "name": task, "payload": payload, **options}
        try:
            from poolfleet.common import messages

            messages.check("schedule options", entry, messages.SUBMIT_TASK)
            self._options(entry)  # the checks a submit makes (an unknown task, a bad queue...)
            client_api.check_priority(entry)
            every_s = doc.get("every_s")
            if every_s is not None and (isinstance(every_s, bool) or not isinstance(every_s, int | float)):
                raise ScheduleError("every_s must be a number of seconds")
            return Schedule(
                name=name,
                task=task,
                payload=payload,
                options={k: v for k, v in options.items() if v is not None},
                every_s=None if every_s is None else float(every_s),
                cron=_opt_str(doc, "cron"),
                timezone=_opt_str(doc, "timezone"),
                catchup=_opt_str(doc, "catchup") or "run-once",
                paused=False,
                horizon=wall,
                created_at=wall,
            )
        except (ValueError, TypeError) as exc:  # ScheduleError, or a number that is none
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None

    def _schedule_doc(self, s: Schedule) -> dict[str, Any]:
        doc = s.describe()
        if s.refused is not None:
            doc["last_state"] = "REFUSED"
            doc["last_error"] = s.refused
        elif s.last_task is not None:
            doc["last_state"] = self._state_of(s.last_task)
        return doc

    def _state_of(self, tid: bytes) -> str:
        rec = self.tasks.get(tid)
        if rec is not None:
            return rec.state.value
        final = self.unflushed.get(tid)
        if final is not None:
            return str(final["state"])
        row = self.journal.results([tid]).get(tid)
        return "EXPIRED" if row is None else str(row[2])

    # -- LIMIT_CONTROL -------------------------------------------------------------------------
    def limit_control(self, client: bytes, req: int, body: dict[str, Any], now: float) -> None:
        """set / remove / list fleet-wide rate limits; the reply follows the commit."""
        action = body["action"]
        name: str = body.get("name") or ""
        limits = self.scheduler.limits
        changed = False
        if action in ("set", "remove") and (
            not isinstance(name, str) or not client_api.TASK_NAME.match(name)
        ):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"a rate limit names a task as module:function, not {name!r}"
            )
        if action == "set":
            count, period_s = body.get("count"), body.get("period_s")
            try:
                check_rate(count, period_s)
            except ValueError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None
            assert isinstance(count, int) and isinstance(period_s, float | int)
            changed = limits.set(name, count, float(period_s))
            if changed:
                self.sjournal.stage_limit(name, count, float(period_s))
                log.info("rate_limit_set", task_name=name, count=count, period_s=period_s)
        elif action == "remove":
            changed = limits.remove(name)
            if changed:
                self.sjournal.stage_limit_removed(name)
                log.info("rate_limit_removed", task_name=name)
        elif action != "list":
            raise ProtocolError(ErrorCode.BAD_REQUEST, "LIMIT_CONTROL: action must be set, remove or list")
        if action != "list":
            self.scheduler.look_at_all()  # a name held back may go now
        docs = limits.describe(now)
        if action != "list":
            docs = [d for d in docs if d["name"] == name]
        self._later(
            Role.CLIENT,
            client,
            MsgKind.LIMIT_CONTROL_REPLY,
            {"req": req, "action": action, "changed": changed, "limits": docs},
        )


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise ScheduleError(f"{key} must be a string")
    return value


def _same(a: Schedule, b: Schedule) -> bool:
    """The same definition (an add sent again after a lost reply changes nothing)."""
    keys = ("task", "payload", "options", "every_s", "cron", "timezone", "catchup")
    return all(getattr(a, k) == getattr(b, k) for k in keys)
