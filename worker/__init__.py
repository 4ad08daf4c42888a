"""The pworker daemon, the ``@task`` decorator task authors use, and ``progress`` for reports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poolfleet.worker.decorator import TaskOptions, task

if TYPE_CHECKING:
    from poolfleet.worker.capture import progress

__all__ = ["TaskOptions", "progress", "task"]


def __getattr__(name: str) -> Any:
    # progress is loaded when first asked for: importing the package stays light (no threads)
    if name == "progress":
        from poolfleet.worker.capture import progress

        return progress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
