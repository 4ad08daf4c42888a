"""Running one task and turning its outcome into data.

``execute`` runs in a pool thread (kind io) or, through ``run_in_child``, in a
process-pool child (kind cpu). The outcome is a plain tuple
``(state, value_bytes, error_map, duration_ms)``: the value is encoded where
it was made, so an unencodable result fails the task with a clear message and
the main thread never decodes or re-encodes payloads.
"""

from __future__ import annotations

import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, EncodeError
from poolfleet.common.logsetup import current_task
from poolfleet.common.protocol import TaskState
from poolfleet.worker.registry import TaskRegistry, UnknownTask

Outcome = tuple[str, bytes | None, dict[str, Any] | None, float]


def error_map(exc: BaseException) -> dict[str, Any]:
    """A remote failure as data: qualified type, message, formatted traceback."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return {
        "type": name,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def execute(registry: TaskRegistry, task_id: bytes, attempt: int, name: str, payload: bytes) -> Outcome:
    """Run ``name`` with the arguments in ``payload``; never raises."""
    start = time.perf_counter()
    token = current_task.set((task_id, name, attempt))  # log lines of the task name it
    try:
        fn = registry.get(name)
        args, kwargs = codec.unpack_call(payload)
        value = fn(*args, **kwargs)
        try:
            data = codec.pack_data(value)
        except EncodeError as exc:
            raise EncodeError(f"task {name} returned a value msgpack cannot encode: {exc}") from None
        return (TaskState.SUCCEEDED.value, data, None, (time.perf_counter() - start) * 1000)
    except (UnknownTask, DecodeError) as exc:
        return (TaskState.FAILED.value, None, error_map(exc), (time.perf_counter() - start) * 1000)
    except BaseException as exc:  # noqa: BLE001 - a task's failure is data, whatever it is
        return (TaskState.FAILED.value, None, error_map(exc), (time.perf_counter() - start) * 1000)
    finally:
        current_task.reset(token)


def init_child(modules: tuple[str, ...], log_level: str) -> TaskRegistry:
    """Set up a pool child once: signals, logging, the task registry."""
    from poolfleet.common import logsetup

    # Ctrl-C in a terminal reaches the whole process group: the worker decides, not the child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logsetup.configure(log_level, daemon="pworker-child")
    return TaskRegistry.load(modules)


def child_main(conn: Connection, modules: tuple[str, ...], log_level: str, max_tasks: int | None) -> None:
    """The loop of a pool child: a call (one task, or a chunk of tiny ones) in, its outcomes out.

    Calls come in order on the child's own pipe and are answered in order, so the worker
    knows which call a child runs: the oldest one it has not answered. ``None`` asks the
    child to stop; after ``max_tasks`` tasks it stops by itself (the worker sends no more).
    """
    registry = init_child(modules, log_level)
    done = 0
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):
            return
        if items is None:
            return
        conn.send([execute(registry, tid, attempt, name, payload) for tid, attempt, name, payload in items])
        done += len(items)
        if max_tasks is not None and done >= max_tasks:
            return
