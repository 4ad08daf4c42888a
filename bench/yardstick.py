"""The yardstick: the same workloads on a local multiprocessing.Pool(2) and ThreadPool(50)."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import time
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool

from bench.tasks import burn, square
from poolfleet.worker.builtins import noop


def throughput(pool: multiprocessing.pool.Pool, n: int) -> float:
    """Tasks/s for ``n`` no-op ``apply_async`` calls until every result is back."""
    gc.collect()  # start both sides with the same clean heap
    t0 = time.perf_counter()
    results = [pool.apply_async(noop) for _ in range(n)]
    for r in results:
        r.get()
    return n / (time.perf_counter() - t0)


def round_trips(pool: multiprocessing.pool.Pool, n: int) -> list[float]:
    """Milliseconds of ``n`` sequential ``apply`` calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        pool.apply(noop)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def cpu_time(pool: multiprocessing.pool.Pool, n_tasks: int, loops: int) -> float:
    """Seconds to run ``n_tasks`` calls of ``burn(loops)``."""
    t0 = time.perf_counter()
    results = [pool.apply_async(burn, (loops,)) for _ in range(n_tasks)]
    for r in results:
        r.get()
    return time.perf_counter() - t0


def io_time(threads: int, n_tasks: int, seconds: float) -> float:
    """Seconds to run ``n_tasks`` sleeps on a ThreadPool of ``threads``."""
    tp = ThreadPool(threads)
    try:
        t0 = time.perf_counter()
        results = [tp.apply_async(time.sleep, (seconds,)) for _ in range(n_tasks)]
        for r in results:
            r.get()
        return time.perf_counter() - t0
    finally:
        # close + join, not the context manager's terminate: terminate leaves the threads to
        # exit on their own, and 50 of them exiting took the GIL from whatever ran next
        # in this process (poolfleet's client, 1-3 ms of its io run)
        tp.close()
        tp.join()


def map_time(pool: multiprocessing.pool.Pool, n: int) -> float:
    """Seconds of ``pool.map(square, range(n))`` with multiprocessing's default chunk size."""
    t0 = time.perf_counter()
    pool.map(square, range(n))
    return time.perf_counter() - t0


@contextlib.contextmanager
def pool(processes: int = 2) -> Iterator[multiprocessing.pool.Pool]:
    """A warmed-up local process pool, closed and joined at the end. Not the pool's own
    ``__exit__``: its ``terminate`` raced the pool's worker handler, which could fork a
    replacement child after the kill loop; that child then waited for ever on the task queue's
    lock a killed child held, and ``terminate`` for ever on it (about one ``bench --quick`` run
    in twelve hung so)."""
    p = multiprocessing.Pool(processes)
    try:
        for r in [p.apply_async(noop) for _ in range(100)]:
            r.get()
        yield p
    finally:
        p.close()
        p.join()
