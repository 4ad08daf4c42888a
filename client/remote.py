"""Remote failures as exceptions of their own type, without pickle.

A task that raised ``ValueError`` on a worker makes the client raise an
exception that ``except ValueError`` catches and that is also a poolfleet
:class:`TaskError`: an instance of a subclass of both, made once per type and
cached. Its ``__cause__`` is a :class:`multiprocessing.pool.RemoteTraceback`
carrying the worker's traceback text, as multiprocessing does.

The type is found by name only: built-in exceptions, and classes of modules
the client process has already imported (``sys.modules``). Nothing is ever
imported because a worker named it; an unknown type gives a plain
:class:`TaskError`. Timeouts, cancels and lost tasks get the types
multiprocessing and concurrent.futures users catch.
"""

from __future__ import annotations

import builtins
import multiprocessing
import sys
import threading
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import pool as _mp_pool
from typing import Any

from poolfleet.common import codec
from poolfleet.common.errors import EncodeError, TaskCancelled, TaskError, TaskTimeout
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import TaskState

# not in the type stubs, but public names of multiprocessing.pool
MaybeEncodingError: type[Exception] = _mp_pool.MaybeEncodingError  # type: ignore[attr-defined]
RemoteTraceback: type[Exception] = _mp_pool.RemoteTraceback  # type: ignore[attr-defined]


class TaskTimeoutError(TaskTimeout, multiprocessing.TimeoutError, TimeoutError):
    """The task ran longer than its timeout: also a ``TimeoutError`` and ``multiprocessing.TimeoutError``."""


class TaskCancelledError(TaskCancelled, CancelledError):
    """The task was cancelled on the cluster: also a ``concurrent.futures.CancelledError``."""


class TaskLostError(TaskError, BrokenProcessPool):
    """The pool child running the task died, or the task lost its worker too often.

    Also a ``concurrent.futures.process.BrokenProcessPool`` (a ``RuntimeError``), what a
    ``ProcessPoolExecutor`` user sees when a child dies; the cluster itself goes on.
    """


#: Error types the worker or master make for a task that lost its executor.
LOST_TYPES = frozenset({"ChildDied", "PoisonTask"})
#: Types never rebuilt: raising them in the client would stop iterations or the process.
NEVER_REBUILT: tuple[type[BaseException], ...] = (StopIteration, StopAsyncIteration)

_classes: dict[tuple[type[BaseException], ...], type[TaskError] | None] = {}
_lock = threading.Lock()


def _str(self: TaskError) -> str:
    return self.message


def _reduce(self: TaskError) -> tuple[Any, tuple[Any, ...]]:
    bases = type(self).__bases__[1:]
    names = tuple((b.__module__, b.__qualname__) for b in bases)
    return (_rebuild, (names, self.task_id, self.state, self.type, self.message, self.traceback, self.args))


def remote_class(*bases: type[BaseException]) -> type[TaskError] | None:
    """The cached subclass of TaskError and ``bases``, or None if Python cannot make one."""
    key = tuple(bases)
    with _lock:
        if key in _classes:
            return _classes[key]
        first = bases[0]
        try:
            cls: type[TaskError] | None = type(
                first.__name__,
                (TaskError, *bases),
                {
                    "__module__": first.__module__,
                    "__qualname__": first.__qualname__,
                    "__doc__": f"A task failure that is also a {first.__qualname__}.",
                    "__str__": _str,
                    "__reduce__": _reduce,
                },
            )
        except TypeError:  # layout conflict, a final class...
            cls = None
        _classes[key] = cls
        return cls


def find_class(module: str, qualname: str) -> type[BaseException] | None:
    """The exception class ``module.qualname`` if the client already has it, else None."""
    if module == "builtins":
        obj: Any = builtins
    else:
        obj = sys.modules.get(module)
        if obj is None:
            return None
    for part in qualname.split("."):
        if part.startswith("<"):
            return None  # a class made inside a function: not reachable by name
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if not isinstance(obj, type) or not issubclass(obj, Exception) or issubclass(obj, NEVER_REBUILT):
        return None
    return obj


def _remote_traceback(text: str) -> Exception:
    return RemoteTraceback(f'\n"""\n{text}"""')


def _decode_args(raw: object) -> tuple[Any, ...] | None:
    if not isinstance(raw, bytes):
        return None
    try:
        args = codec.unpack(raw)
    except Exception:  # noqa: BLE001 - undecodable arguments: keep the message only
        return None
    return tuple(args) if isinstance(args, list) else None


def build(
    task_id: str,
    state: str,
    err: dict[str, Any],
) -> TaskError:
    """The exception for a task that ended in ``state`` with the error map ``err``."""
    type_name = str(err.get("type", "Error"))
    message = str(err.get("message", ""))
    tb = str(err.get("traceback", "") or "")
    exc: TaskError | None = None
    if state == TaskState.TIMED_OUT:
        exc = TaskTimeoutError(task_id, state, type_name, message, tb)
    elif state == TaskState.CANCELLED:
        exc = TaskCancelledError(task_id, state, type_name, message, tb)
    elif type_name in LOST_TYPES:
        exc = TaskLostError(task_id, state, type_name, message, tb)
    elif isinstance(err.get("unencodable"), str):
        exc = _rebuilt(
            (EncodeError, MaybeEncodingError), (message, str(err["unencodable"])), err, task_id, state
        )
    else:
        module, qualname = err.get("module"), err.get("qualname")
        base = find_class(module, qualname) if isinstance(module, str) and isinstance(qualname, str) else None
        if base is not None and not issubclass(base, TaskError):
            exc = _rebuilt((base,), _decode_args(err.get("args")), err, task_id, state)
    if exc is None:
        exc = TaskError(task_id, state, type_name, message, tb)
    if tb:
        exc.__cause__ = _remote_traceback(tb)
    return exc


def _rebuilt(
    bases: tuple[type[BaseException], ...],
    args: tuple[Any, ...] | None,
    err: dict[str, Any],
    task_id: str,
    state: str,
) -> TaskError | None:
    cls = remote_class(*bases)
    if cls is None:
        return None
    message = str(err.get("message", ""))
    call_args = args if args is not None else (message,)
    try:
        exc = cls.__new__(cls, *call_args)
    except Exception:  # noqa: BLE001 - a class that will not be made this way: plain TaskError
        return None
    try:
        # the class's own __init__ with the remote arguments, as unpickling would call it
        # (OSError sets errno and filename this way, MaybeEncodingError its exc and value)
        bases[-1].__init__(exc, *call_args)
    except Exception:  # noqa: BLE001 - an __init__ that wants other arguments: args only
        BaseException.__init__(exc, *call_args)
    exc.task_id = task_id
    exc.state = state
    exc.type = str(err.get("type", bases[0].__qualname__))
    exc.message = message
    exc.traceback = str(err.get("traceback", "") or "")
    return exc


def _rebuild(
    names: tuple[tuple[str, str], ...],
    task_id: str,
    state: str,
    type_name: str,
    message: str,
    tb: str,
    args: tuple[Any, ...],
) -> TaskError:
    """Unpickle a rebuilt exception (for users who pass it between their own processes)."""
    bases = [find_class(m, q) for m, q in names]
    if all(b is not None for b in bases):
        cls = remote_class(*[b for b in bases if b is not None])
        if cls is not None:
            exc = cls.__new__(cls, *args)
            BaseException.__init__(exc, *args)
            exc.task_id, exc.state, exc.type, exc.message, exc.traceback = (
                task_id,
                state,
                type_name,
                message,
                tb,
            )
            return exc
    return TaskError(task_id, state, type_name, message, tb)


def from_entry(entry: dict[str, Any]) -> TaskError:
    """The exception for a result entry whose state is not SUCCEEDED."""
    return build(format_id(entry["id"]), str(entry.get("state")), entry.get("error") or {})
