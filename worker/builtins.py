"""Tasks every worker offers, useful for checks and benchmarks."""

from __future__ import annotations

import itertools
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


def starmap_chunk(name: str, arglists: list[list[Any]]) -> list[Any]:
    """Run the task ``name`` once per argument list, in order; return the list of results.

    This is how a client's ``map`` with a chunk size sends many calls as one task. ``name``
    must be a task this worker offers (looked up in its task registry, as any task is); the
    first call that raises fails the whole chunk with that exception.
    """
    fn = _chunk_function(name)
    return list(itertools.starmap(fn, arglists))


def map_chunk(name: str, items: list[Any]) -> list[Any]:
    """Run the task ``name`` once per item (its one argument), in order; return the results.

    ``starmap_chunk`` for functions of one argument, without a list around each.
    """
    fn = _chunk_function(name)
    return list(map(fn, items))


#: The names clients submit chunks under.
CHUNK_TASK_NAME = f"{__name__}:starmap_chunk"
MAP_CHUNK_TASK_NAME = f"{__name__}:map_chunk"


def _chunk_function(name: str) -> Any:
    """The function of task ``name`` from the running worker's registry: only a task it offers."""
    from poolfleet.common.protocol import CMD_TASK_NAME
    from poolfleet.worker.registry import UnknownTask
    from poolfleet.worker.runner import active_registry

    registry = active_registry.get()
    if registry is None:
        raise RuntimeError("chunks run only as tasks on a worker")
    if name in (CHUNK_TASK_NAME, MAP_CHUNK_TASK_NAME, CMD_TASK_NAME):
        raise UnknownTask(f"{name!r} cannot run inside a chunk")
    return registry.get(name)


def command(
    argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None, cwd: str | None = None
) -> dict[str, Any]:
    """Stands for kind=cmd tasks; the worker runs the program itself, never this function."""
    raise RuntimeError("command tasks run as kind cmd on a worker that allows the program")
