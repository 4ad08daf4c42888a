"""Task functions of the ported CPython Pool tests (``--tasks pf_mptasks``).

The same functions as in CPython's ``Lib/test/_test_multiprocessing.py``, moved into a
module the workers load; built-ins the tests map (``int``, ``time.sleep``) are wrapped.
"""

from __future__ import annotations

import os
import time
from typing import Any

from poolfleet.worker import task


def sqr(x: int, wait: float = 0.0, event: None = None) -> int:
    if event is None:
        time.sleep(wait)
    else:
        event.wait(wait)
    return x * x


def mul(x: int, y: int) -> int:
    return x * y


def raise_large_valuerror(wait: float) -> None:
    time.sleep(wait)
    raise ValueError("x" * 1024**2)


def identity(x: Any) -> Any:
    return x


def raising() -> None:
    raise KeyError("key")


def unpickleable_result() -> Any:
    return lambda: 42


def to_int(x: Any) -> int:
    """``int`` as a task (a built-in is not a task a worker offers)."""
    return int(x)


def sleep(seconds: float) -> None:
    """``time.sleep`` as a cpu task, so that cancelling it kills its pool child."""
    time.sleep(seconds)


def traceback_task() -> None:
    raise RuntimeError(123)  # some comment


def wrapped_exception() -> None:
    raise RuntimeError("foo")


@task(kind="io")
def io_square(x: int) -> int:
    return x * x


def flaky_item(x: int) -> int:
    if x == 13:
        raise ValueError(f"item {x} fails")
    return x


def to_float(x: Any) -> float:
    """``float`` as a task."""
    return float(x)


class CustomError(Exception):
    """An exception of a task module (a client that imports the module gets this type back)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code


def raise_custom(code: int) -> None:
    raise CustomError(code, "custom failure")


def raise_with_object() -> None:
    raise ValueError(object())


def pid(_x: Any = None) -> int:
    return os.getpid()


@task(kind="io")
def io_pid(_x: Any = None) -> int:
    return os.getpid()
