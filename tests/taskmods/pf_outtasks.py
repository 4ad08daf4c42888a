"""Task functions that write output and report progress (``--tasks pf_outtasks``)."""

from __future__ import annotations

import logging
import os
import sys
import time

from poolfleet.worker import progress

log = logging.getLogger("pf_outtasks")


def chatty(n: int) -> int:
    """Write to stdout, stderr and logging, in that order, ``n`` times."""
    for i in range(n):
        print(f"out {i}")
        sys.stderr.write(f"err {i}\n")
        log.info("log %d", i)
    return n


def big_output(chars: int) -> int:
    """Write ``chars`` characters: digits 0-9 over and over, then a newline."""
    sys.stdout.write("".join(str(i % 10) for i in range(chars - 1)) + "\n")
    return chars


def gated(path: str) -> str:
    """Write and report half-way, then wait (up to a minute) for ``path`` to exist, then finish."""
    print("before the gate", flush=True)
    for i in range(1000):  # a tight loop of reports costs little; the last one stands
        progress(i / 2000, f"step {i}")
    progress(0.5, "waiting at the gate")
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("after the gate")
    progress(1.0, "through")
    return "done"
