"""Task functions of the ported CPython executor tests (``--tasks pf_cftasks``).

The functions of CPython's ``Lib/test/test_concurrent_futures`` moved into a module the
workers load, and the built-ins the tests submit (``pow``, ``divmod``, ``str``, ``abs``,
``time.sleep``) as tasks of the same name. An event the tests share with a task is a file:
``wait_event`` returns once it exists (the test's ``event.set()`` makes it).
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from typing import Any

#: How long a task waits for its event at most (a test that never sets it must not hang a slot).
EVENT_WAIT_S = 120.0


def pow(x: Any, y: Any) -> Any:
    return builtins.pow(x, y)


def divmod(x: Any, y: Any) -> Any:
    return builtins.divmod(x, y)


def str(x: Any) -> Any:
    return builtins.str(x)


def abs(x: Any) -> Any:
    return builtins.abs(x)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def mul(x: Any, y: Any) -> Any:
    return x * y


def capture(*args: Any, **kwargs: Any) -> Any:
    return args, kwargs


def wait_event(path: builtins.str) -> bool:
    """``threading.Event.wait`` of an event that is a file: True once the file exists."""
    deadline = time.monotonic() + EVENT_WAIT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_and_raise(e: builtins.str) -> None:
    wait_event(e)
    raise Exception("this is an exception")


def sleep_and_print(t: float, msg: builtins.str) -> None:
    time.sleep(t)
    print(msg)
    sys.stdout.flush()
