"""Task functions the test suite's workers load (``--tasks pf_testtasks``)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from typing import Any

from poolfleet.worker import task


def add(a: int, b: int) -> int:
    return a + b


def pid_and_host() -> list[Any]:
    return [os.getpid(), socket.gethostname()]


def boom(message: str) -> None:
    raise ValueError(message)


def square(x: int) -> int:
    return x * x


@task(kind="io")
def io_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds}"


@task(kind="cpu", timeout_s=30, retries=2)
def decorated_cpu(x: int) -> dict[str, int]:
    return {"x": x, "pid": os.getpid()}


def unencodable_result() -> object:
    return object()


def kill_self(how: str) -> None:
    """Die in the middle of a cpu task: by SIGKILL, os._exit or a segfault."""
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(7)
    elif how == "segfault":
        ctypes.string_at(0)
    time.sleep(60)


def spin_for(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def flaky(marker_dir: str, fail_times: int) -> int:
    """Fail ``fail_times`` times (counted in files), then succeed; returns the attempt count."""
    os.makedirs(marker_dir, exist_ok=True)
    count = len(os.listdir(marker_dir)) + 1
    with open(os.path.join(marker_dir, f"attempt-{count}"), "w") as fh:
        fh.write(str(os.getpid()))
    if count <= fail_times:
        raise RuntimeError(f"attempt {count} fails on purpose")
    return count


def long_time_wait(name: Any) -> str:
    """The seed document's Pool example function."""
    import random

    print("Run task %s, pid is %s" % (name, os.getpid()))
    start_time = time.time()
    time.sleep(random.random() * 0.3)
    end_time = time.time()
    print("Task %s runs %0.2f sec" % (name, (end_time - start_time)))
    return f"hello {name}"


def span(seconds: float) -> list[float]:
    """Busy for ``seconds``; return [pid, start, end] (wall clock) to show overlap."""
    start = time.time()
    spin_for(seconds)
    return [os.getpid(), start, time.time()]


def int_keys() -> dict[int, str]:
    """A value msgpack encodes but the decoder refuses (map keys must be strings)."""
    return {1: "a"}


def die_on(x: int, bad: int) -> int:
    """A tiny task that kills its pool child when ``x == bad`` (for the chunked fast path)."""
    if x == bad:
        os._exit(9)
    return x


def log_fields() -> dict[str, Any]:
    """The fields poolfleet adds to a log line made by this task, as structlog would add them."""
    from poolfleet.common.logsetup import add_task_context

    return add_task_context(None, "info", {})


def echo_big(blob: bytes, tag: int) -> list[Any]:
    """Return a value as big as the argument (exercises big payloads both ways)."""
    return [tag, blob[::-1]]


def start_sleeper(seconds: float) -> int:
    """Start a program in a session of its own that outlives the task; return its pid."""
    import subprocess

    proc = subprocess.Popen(["sleep", str(seconds)], start_new_session=True)
    return proc.pid


@task(kind="io")
def wait_file(path: str, size: int) -> bytes:
    """Wait (at most two minutes) until ``path`` exists; return ``size`` bytes."""
    end = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.02)
    return b"r" * size
