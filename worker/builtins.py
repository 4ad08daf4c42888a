"""Tasks every worker offers, useful for checks and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from poolfleet.worker.decorator import task


def noop() -> None:
    """Do nothing (measures the overhead of a task)."""


def echo(*args: Any, **kwargs: Any) -> Any:
    """Return the arguments: a single one as is, several as a list, keywords as a map."""
    if kwargs:
        return {"args": list(args), "kwargs": kwargs}
    return args[0] if len(args) == 1 else list(args)


@task(kind="io")
def sleep(seconds: float) -> float:
    """Sleep on an io slot; return the seconds slept."""
    start = time.monotonic()
    time.sleep(float(seconds))
    return time.monotonic() - start


def spin(ms: float) -> int:
    """Burn about ``ms`` milliseconds of pure-Python CPU; return the loop count."""
    end = time.perf_counter() + float(ms) / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def fail(message: str = "failed on purpose") -> None:
    """Raise RuntimeError(message)."""
    raise RuntimeError(message)


def command(
    argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None, cwd: str | None = None
) -> dict[str, Any]:
    """Stands for kind=cmd tasks; the worker runs the program itself, never this function."""
    raise RuntimeError("command tasks run as kind cmd on a worker that allows the program")
