"""Tasks for the master-core tests: one that keeps a record of every execution, one that waits."""

from __future__ import annotations

import os
import time


def _line(path: str, text: str) -> None:
    # one write of one short line to a file opened for appending: lines of concurrent
    # executions (other pool children, other workers) never interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def mark(path: str, tag: int, seconds: float) -> int:
    """Append ``start TAG PID`` to ``path``, wait ``seconds``, append ``end TAG PID``; return ``tag``."""
    _line(path, f"start {tag} {os.getpid()}")
    time.sleep(seconds)
    _line(path, f"end {tag} {os.getpid()}")
    return tag


def nap(seconds: float) -> int:
    """A cpu task (process pool) that takes ``seconds`` without using the cpu; returns its pid."""
    time.sleep(seconds)
    return os.getpid()


def quick(x: int) -> int:
    return x
