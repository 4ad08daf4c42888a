"""Running one task and turning its outcome into data.

``execute`` runs in a pool thread (kind io) or, through ``run_in_child``, in a
process-pool child (kind cpu). The outcome is a plain tuple
``(state, value_bytes, error_map, duration_ms)``: the value is encoded where
it was made, so an unencodable result fails the task with a clear message and
the main thread never decodes or re-encodes payloads.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from contextvars import ContextVar
from multiprocessing.connection import Connection
from typing import Any

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, EncodeError
from poolfleet.common.logsetup import current_task
from poolfleet.common.protocol import TaskState
from poolfleet.worker.capture import ChildSender, TaskCapture, current_capture, install
from poolfleet.worker.registry import TaskRegistry

#: (state, value, error, duration_ms, extra): ``extra`` holds the captured output and the last
#: progress report (``output``, ``output_end``, ``progress``; see capture.py), or None.
Outcome = tuple[str, bytes | None, dict[str, Any] | None, float, dict[str, Any] | None]

#: The registry of the task running in this thread or pool child: the built-in that runs a
#: chunk of calls (``poolfleet.worker.builtins:starmap_chunk``) looks its function up there.
active_registry: ContextVar[TaskRegistry | None] = ContextVar("active_registry", default=None)

#: An exception's ``args`` travel with its error only up to this many encoded bytes.
MAX_ARGS_BYTES = 4 << 20


class ResultEncodeError(EncodeError):
    """A task returned a value msgpack cannot encode; ``value_repr`` shows the value."""

    def __init__(self, message: str, value_repr: str) -> None:
        super().__init__(message)
        self.value_repr = value_repr


def error_map(exc: BaseException) -> dict[str, Any]:
    """A remote failure as data: type, message, traceback, and what a client needs to rebuild it.

    ``module`` and ``qualname`` name the exception's class (a client that has that module
    imported raises the same type); ``args`` is the msgpack document of the exception's
    arguments when they encode; ``unencodable`` is set for a result msgpack cannot encode.
    """
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    out: dict[str, Any] = {
        "type": name,
        "message": _safe_str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "module": cls.__module__,
        "qualname": cls.__qualname__,
    }
    try:
        args = codec.pack_data(list(exc.args))
    except Exception:  # noqa: BLE001 - arguments msgpack cannot carry stay behind
        args = None
    if args is not None and len(args) <= MAX_ARGS_BYTES:
        out["args"] = args
    if isinstance(exc, ResultEncodeError):
        out["type"] = "poolfleet.common.errors.EncodeError"
        out["module"], out["qualname"] = "poolfleet.common.errors", "EncodeError"
        out["unencodable"] = exc.value_repr
    return out


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        return f"<{type(exc).__name__}: str() failed>"


def _short_repr(value: object, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The decoding limits task arguments are held to, as the master holds message bodies.
ARGUMENT_LIMITS = (
    f"at most {codec.MAX_BODY_ITEMS:,} array items and map entries in all, arrays and maps of "
    f"{codec.MAX_ARRAY_ITEMS:,} items, strings of {codec.MAX_STR_BYTES // 2**20} MiB, "
    f"binaries of {codec.MAX_BIN_BYTES // 2**20} MiB"
)


#: Payloads up to this size cannot break the item budget (see decode_call).
_UNBUDGETED_BYTES = min(64 * 1024, codec.MAX_BODY_ITEMS // 2)


def decode_call(payload: bytes) -> tuple[list[Any], dict[str, Any]]:
    """Decode a task's ``[args, kwargs]`` within the limits; raise :class:`DecodeError` naming them.

    Runs where the task runs (a pool child, an io or cmd thread), never on the worker's main
    loop. The item budget bounds memory (a 20 MB argument of nested empty arrays would
    otherwise become 1.5 GB of lists), and its hook, called for every array and map built,
    lets the interpreter hand the GIL to the main loop while an io or cmd thread decodes.
    """
    # Every array item, map entry and container header takes at least one byte, and the budget
    # counts each container once more: a payload of n bytes stays within a budget of 2n. So
    # small payloads (every ordinary call) skip the budget's Python call per array and map;
    # the largest of them decodes in about 10 ms, too short to hold up the main loop.
    budget = codec.MAX_BODY_ITEMS if len(payload) > _UNBUDGETED_BYTES else None
    try:
        doc = codec.unpack(payload, max_items=budget)
    except DecodeError as exc:
        raise DecodeError(
            f"task arguments exceed the worker's decoding limits: {exc} (the limits: {ARGUMENT_LIMITS})"
        ) from None
    if (
        not isinstance(doc, list)
        or len(doc) != 2
        or not isinstance(doc[0], list)
        or not isinstance(doc[1], dict)
    ):
        raise DecodeError("payload must be [args, kwargs]")
    return doc[0], doc[1]


def execute(
    registry: TaskRegistry,
    task_id: bytes,
    attempt: int,
    name: str,
    payload: bytes,
    code: tuple[bytes, bytes] | None = None,
    capture: TaskCapture | None = None,
) -> Outcome:
    """Run ``name`` with the arguments in ``payload``; never raises. ``code``: the (hash, pickle)
    of the shipped function the task calls (itself or in a chunk), on a worker that runs them.
    What the task writes and reports goes to ``capture``, whose final fields are the outcome's
    ``extra``."""
    start = time.perf_counter()
    token = current_task.set((task_id, name, attempt))  # log lines of the task name it
    reg_token = active_registry.set(registry)
    cap_token = current_capture.set(capture)
    state, data, error = TaskState.FAILED.value, None, None
    try:
        if code is not None:
            from poolfleet.worker.shipped import install

            install(code)
        fn = registry.get(name)
        args, kwargs = decode_call(payload)
        value = fn(*args, **kwargs)
        try:
            data = codec.pack_data(value)
        except EncodeError as exc:
            raise ResultEncodeError(
                f"task {name} returned a value msgpack cannot encode: {exc}", _short_repr(value)
            ) from None
        state = TaskState.SUCCEEDED.value
    except BaseException as exc:  # noqa: BLE001 - a task's failure is data, whatever it is
        error = error_map(exc)
    finally:
        current_capture.reset(cap_token)
        active_registry.reset(reg_token)
        current_task.reset(token)
    extra = capture.final() if capture is not None else None
    return (state, data, error, (time.perf_counter() - start) * 1000, extra)


class _ChildState:
    """Per-process state of a pool child, set once by its initializer."""

    registry: TaskRegistry | None = None
    started: Connection | None = None
    sender: ChildSender | None = None
    max_output: int = 0


#: Start notices of a chunk go in pieces this small, so that each is one atomic pipe write.
NOTICE_REFS = 32


def _ignore_signal(_signum: int, _frame: object) -> None:
    """Pool children leave SIGINT and SIGTERM to the worker."""


def init_child(modules: tuple[str, ...], started: Connection, log_level: str, max_output: int = 0) -> None:
    """Pool initializer: load the task registry once per child."""
    from poolfleet.common import logsetup

    # Ctrl-C in a terminal, and a SIGTERM to the worker's process group, reach every child:
    # the worker decides, not the child (it drains, then kills its children). A handler that
    # does nothing, not SIG_IGN: programs a task starts get the default actions back.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _ignore_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked where the forkserver started
    logsetup.configure(log_level, daemon="pworker-child")
    _ChildState.registry = TaskRegistry.load(modules)
    _ChildState.started = started
    _ChildState.max_output = max_output
    _ChildState.sender = ChildSender(started.send)
    install()  # after logsetup: the daemon's own log lines keep the real stderr


def run_in_child(
    task_id: bytes, attempt: int, name: str, payload: bytes, code: tuple[bytes, bytes] | None = None
) -> Outcome:
    """Entry point of a cpu task inside a pool child."""
    registry, started = _ChildState.registry, _ChildState.started
    if registry is None or started is None:
        raise RuntimeError("pool child was not initialised")
    # Tell the worker which child runs which task, so it can tell a death or kill for a timeout.
    started.send((task_id, attempt, os.getpid(), time.monotonic()))
    return execute(registry, task_id, attempt, name, payload, code, _child_capture(task_id, attempt))


def _child_capture(task_id: bytes, attempt: int) -> TaskCapture:
    sender = _ChildState.sender
    cap = TaskCapture(task_id, attempt, _ChildState.max_output, sender.dirty if sender else None)
    if sender is not None:
        sender.capture = cap
    return cap


def run_chunk_in_child(
    items: list[tuple[bytes, int, str, bytes, tuple[bytes, bytes] | None]],
) -> list[Outcome]:
    """Entry point of a chunk of tiny cpu tasks (see poolfleet.worker.pacing): one start notice."""
    registry, started = _ChildState.registry, _ChildState.started
    if registry is None or started is None:
        raise RuntimeError("pool child was not initialised")
    refs = [(item[0], item[1]) for item in items]
    now = time.monotonic()
    for i in range(0, len(refs), NOTICE_REFS):
        started.send((refs[i : i + NOTICE_REFS], os.getpid(), now))
    return [
        execute(registry, task_id, attempt, name, payload, code, _child_capture(task_id, attempt))
        for task_id, attempt, name, payload, code in items
    ]
