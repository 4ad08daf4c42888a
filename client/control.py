"""The client's schedule and rate-limit calls (a base of :class:`~poolfleet.client.Client`).

Schedules and limits are kept by the master, in its journal; these calls send
SCHEDULE_CONTROL and LIMIT_CONTROL (docs/PROTOCOL.md) and return the master's entries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from poolfleet.common import codec
from poolfleet.common.protocol import MsgKind


class WorkflowControl:
    """``schedule_add`` / ``schedules`` / ``schedule_pause`` / ``schedule_resume`` /
    ``schedule_remove`` and ``limit_set`` / ``limits`` / ``limit_remove``."""

    def _call(self, kind: MsgKind, body: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        raise NotImplementedError  # the Client's

    # -- schedules -------------------------------------------------------------------------
    def schedule_add(
        self,
        name: str,
        fn: Callable[..., Any] | str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        every_s: float | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        catchup: str = "run-once",
        kind: str | None = None,
        queue: str | None = None,
        timeout_s: float | None = None,
        retries: int | None = None,
        priority: int | None = None,
        request_timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Run ``fn(*args, **kwargs)`` every ``every_s`` seconds (ticks on multiples of it from
        the Unix epoch) or at the times of the cron expression ``cron`` in ``timezone`` (an IANA
        name; UTC by default). A tick missed while the master was down runs once when it starts
        (``catchup="run-once"``) or not at all (``"skip"``). The task options are those of
        ``with_options``. Returns the schedule as the master keeps it (``next_tick``...)."""
        from poolfleet.client.client import TaskOptions, task_name

        opts = TaskOptions(kind=kind, queue=queue, timeout_s=timeout_s, retries=retries, priority=priority)
        options = {k: v for k, v in opts.apply({}).items()}
        doc: dict[str, Any] = {
            "name": name,
            "task": task_name(fn),
            "payload": codec.pack_call(tuple(args), dict(kwargs or {})),
            "options": options,
            "catchup": catchup,
        }
        for key, value in (("every_s", every_s), ("cron", cron), ("timezone", timezone)):
            if value is not None:
                doc[key] = float(value) if key == "every_s" else value
        reply = self._call(MsgKind.SCHEDULE_CONTROL, {"action": "add", "schedule": doc}, request_timeout_s)
        out: dict[str, Any] = reply["schedules"][0]
        return out

    def schedules(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Every schedule, by name, with its last run (``last_task``, ``last_state``) and
        ``next_tick`` (absent while paused)."""
        return list(self._call(MsgKind.SCHEDULE_CONTROL, {"action": "list"}, timeout_s)["schedules"])

    def _schedule_action(self, action: str, name: str, timeout_s: float | None) -> bool:
        reply = self._call(MsgKind.SCHEDULE_CONTROL, {"action": action, "name": name}, timeout_s)
        return bool(reply["changed"])

    def schedule_pause(self, name: str, timeout_s: float | None = None) -> bool:
        """Stop firing (ticks that fall while paused never run); False if it was paused."""
        return self._schedule_action("pause", name, timeout_s)

    def schedule_resume(self, name: str, timeout_s: float | None = None) -> bool:
        """Fire again from the next tick on; False if it was not paused."""
        return self._schedule_action("resume", name, timeout_s)

    def schedule_remove(self, name: str, timeout_s: float | None = None) -> bool:
        """Remove a schedule (the tasks it made stay as they are)."""
        return self._schedule_action("remove", name, timeout_s)

    # -- rate limits -------------------------------------------------------------------------
    def limit_set(self, fn: Callable[..., Any] | str, rate: str, timeout_s: float | None = None) -> bool:
        """At most ``rate`` (``10/s``, ``100/m``, ``1000/h``) starts of the task across the whole
        fleet; False when it was already so."""
        from poolfleet.client.client import task_name
        from poolfleet.master.ratelimit import parse_rate

        try:
            count, period_s = parse_rate(rate)
        except ValueError as exc:
            from poolfleet.common.errors import PoolfleetError

            raise PoolfleetError(str(exc)) from None
        body = {"action": "set", "name": task_name(fn), "count": count, "period_s": period_s}
        return bool(self._call(MsgKind.LIMIT_CONTROL, body, timeout_s)["changed"])

    def limits(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Every rate limit: ``name``, ``rate``, ``count``, ``period_s`` and ``in_window``
        (starts in the current window)."""
        return list(self._call(MsgKind.LIMIT_CONTROL, {"action": "list"}, timeout_s)["limits"])

    def limit_remove(self, fn: Callable[..., Any] | str, timeout_s: float | None = None) -> bool:
        from poolfleet.client.client import task_name

        body = {"action": "remove", "name": task_name(fn)}
        return bool(self._call(MsgKind.LIMIT_CONTROL, body, timeout_s)["changed"])
