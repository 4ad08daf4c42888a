"""Tasks for the workflow tests: small arithmetic, a failure, a gate on a file, and a stamp."""

from __future__ import annotations

import os
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def total(values: list[int]) -> int:
    return sum(values)


def add(a: int, b: int) -> int:
    return a + b


def boom(x: Any) -> Any:
    raise ValueError(f"boom on {x!r}")


def gate(path: str, limit_s: float = 120.0) -> str:
    """Wait (at most ``limit_s``) until ``path`` exists; return its text."""
    end = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)
    with open(path) as f:
        return f.read()


def stamp(path: str, tag: str) -> float:
    """Append ``TAG WALLTIME`` to ``path``; return the wall time."""
    now = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {now}\n".encode())
    finally:
        os.close(fd)
    return now


def echo(value: Any) -> Any:
    return value
