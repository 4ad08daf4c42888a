"""Tasks for the schedule, priority and rate-limit tests: each appends one line per run."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pf_coretasks import _line  # one line per write: runs on other slots never interleave

from poolfleet.common.logsetup import current_task


def stamp(path: str) -> str:
    """Append ``<this task's id in hex> <wall time>``; return the id."""
    task = current_task.get()
    tid = task[0].hex() if task else "?"
    _line(path, f"{tid} {time.time():.6f}")
    return tid


def started(path: str, tag: int) -> int:
    """Append ``<tag> <wall time> <pid>`` at the start; return ``tag``."""
    _line(path, f"{tag} {time.time():.6f} {os.getpid()}")
    return tag


def hold(path: str, tag: int, gate: str) -> int:
    """Append ``<tag> ...`` at the start, then wait (at most a minute) until ``gate`` exists."""
    started(path, tag)
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return tag
