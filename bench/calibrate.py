"""How many turns of ``bench.tasks.burn`` make a task of a given length on this machine, now.

Standard library only: the peers' benchmark (bench/peers/) runs it in its own environment too.
"""

from __future__ import annotations

import time

from bench.stats import median
from bench.tasks import burn


def calibrate(target_ms: float) -> tuple[int, float]:
    """Loop count for ``burn`` taking about ``target_ms``, and its measured time (ms)."""
    burn(50_000)
    t0 = time.perf_counter()
    burn(200_000)
    per_loop = (time.perf_counter() - t0) / 200_000
    loops = max(1000, int(target_ms / 1000 / per_loop))
    return loops, single_task_ms(loops)


def single_task_ms(loops: int, n: int = 7) -> float:
    """Median time of ``burn(loops)`` run alone in this process, now."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        burn(loops)
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)
