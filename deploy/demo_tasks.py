"""Tasks of the demo (``make demo``): the workers load them with ``--tasks demo_tasks``."""

from __future__ import annotations

import os
import time

from poolfleet.worker import task


def count_primes(limit: int) -> int:
    """CPU work: count the primes below ``limit`` by trial division (runs in the process pool)."""
    count = 0
    for n in range(2, int(limit)):
        d = 2
        while d * d <= n:
            if n % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


@task(kind="io", timeout_s=10)
def fetch(url: str, delay_s: float = 0.2) -> dict[str, object]:
    """IO work (simulated): wait as a download would, on the thread pool, and report it."""
    start = time.monotonic()
    time.sleep(delay_s)
    return {"url": url, "bytes": 1024 * len(url), "waited_s": round(time.monotonic() - start, 2)}


def where() -> dict[str, int]:
    """The pool process a cpu task ran in."""
    return {"pid": os.getpid()}
