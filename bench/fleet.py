"""The workloads through real daemons, driven by the Python client."""

from __future__ import annotations

import gc
import time
from concurrent.futures import Future
from typing import Any

from poolfleet.client import Client, Pool

NOOP = "poolfleet.worker.builtins:noop"
SLEEP = "poolfleet.worker.builtins:sleep"
BURN = "bench.tasks:burn"
SQUARE = "bench.tasks:square"
LIMIT_S = 300.0

__all__ = ["BURN", "NOOP", "SLEEP", "Client"]


def _all_back(futures: list[Future[Any]], what: str) -> None:
    """Wait for every result in order, as the yardstick does with ``AsyncResult.get``."""
    deadline = time.monotonic() + LIMIT_S
    for f in futures:
        try:
            f.result(max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            raise RuntimeError(f"{what}: a task failed or did not finish: {exc!r}") from exc


def throughput(client: Client, n: int) -> float:
    """Tasks/s for ``n`` no-op tasks submitted at once, until every result is back."""
    gc.collect()  # start both sides with the same clean heap
    t0 = time.perf_counter()
    futures = client.submit_many(NOOP, [((), {})] * n)
    _all_back(list(futures), "no-op throughput")
    return n / (time.perf_counter() - t0)


def apply_async_throughput(client: Client, n: int) -> float:
    """Tasks/s for ``n`` no-op ``Pool.apply_async`` calls (one call per task, like the yardstick)."""
    pool = Pool(client=client)
    t0 = time.perf_counter()
    results = [pool.apply_async(NOOP) for _ in range(n)]
    for r in results:
        r.get(LIMIT_S)
    return n / (time.perf_counter() - t0)


def map_time(client: Client, n: int) -> float:
    """Seconds of ``Pool.map(square, range(n))`` with the default chunk size."""
    pool = Pool(client=client)
    t0 = time.perf_counter()
    out = pool.map(SQUARE, range(n))
    elapsed = time.perf_counter() - t0
    if len(out) != n or out[-1] != (n - 1) ** 2:
        raise RuntimeError("Pool.map: wrong results")
    return elapsed


def round_trips(client: Client, n: int) -> list[float]:
    """Milliseconds of ``n`` sequential single-task calls."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.submit(NOOP).result(30)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def cpu_time(client: Client, n_tasks: int, loops: int) -> tuple[float, list[float]]:
    """Seconds to run ``n_tasks`` calls of ``burn(loops)``, and the per-task durations (ms)."""
    t0 = time.perf_counter()
    futures = client.submit_many(BURN, [((loops,), {})] * n_tasks)
    _all_back(list(futures), "cpu efficiency")
    elapsed = time.perf_counter() - t0
    return elapsed, [float(f.info.get("duration_ms") or 0.0) for f in futures]


def io_time(client: Client, n_tasks: int, seconds: float) -> float:
    """Seconds to run ``n_tasks`` io sleeps."""
    t0 = time.perf_counter()
    futures = client.submit_many(SLEEP, [((seconds,), {})] * n_tasks)
    _all_back(list(futures), "io efficiency")
    return time.perf_counter() - t0


def warm_up(client: Client) -> None:
    """Fill the pools, connections and caches before measuring."""
    _all_back(list(client.submit_many(NOOP, [((), {})] * 500)), "warm-up")
    _all_back(list(client.submit_many(SLEEP, [((0.001,), {})] * 100)), "warm-up")
    for _ in range(20):
        client.submit(NOOP).result(30)
