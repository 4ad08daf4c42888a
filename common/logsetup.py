"""structlog setup: JSON lines when stderr is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import structlog

from poolfleet.common.ids import format_id

#: The task a pool thread or child runs now: (task id, task name, attempt). One variable set
#: per task, turned into log fields only when something is logged (binding three structlog
#: context variables for every task cost more than a tiny task itself).
current_task: ContextVar[tuple[bytes, str, int] | None] = ContextVar("poolfleet_task", default=None)


def add_task_context(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: task_id, task_name and attempt of the task being run, if any."""
    task = current_task.get()
    if task is not None:
        event.setdefault("task_id", format_id(task[0]))
        event.setdefault("task_name", task[1])
        event.setdefault("attempt", task[2])
    return event


def configure(level: str = "info", json: bool | None = None, **context: Any) -> None:
    """Configure structlog once at an entry point; ``context`` is bound to every event."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_task_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if context:
        processors.append(_Bind(context))
    processors += [structlog.processors.format_exc_info, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class _Bind:
    """Add fixed keys (daemon name, worker id) to every event."""

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in self.context.items():
            event.setdefault(key, value)
        return event
