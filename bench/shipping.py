"""``python -m bench.shipping``: what shipping a function costs against naming it.

Through real daemons on loopback (one worker with ``--run-shipped-code``, 2 cpu slots):
``Pool.map`` of N tiny calls, and N ``apply_async`` calls, of ``bench.tasks:square`` by name
and of the same function shipped (a lambda defined here), each best of R runs. The shipped
function is pickled on every submit call and sent once (the hash is the same).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from bench.daemons import BenchCluster
from bench.tasks import square

N_MAP = 20_000
N_APPLY = 2_000
RUNS = 3


def best(fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    from poolfleet.client import Client, Pool

    shipped = lambda x: x * x  # noqa: E731 - a lambda is the point: it cannot be named
    with BenchCluster() as cluster:
        cluster.add_worker(cpu=2, io=4, extra=("--run-shipped-code",))
        client = Client(cluster.client_endpoint, ship_code=True)
        pool = Pool(client=client)
        try:
            rows = []
            for label, fn in (("by name", square), ("shipped", shipped)):
                t_map = best(lambda fn=fn: pool.map(fn, range(N_MAP)))
                t_apply = best(
                    lambda fn=fn: [r.get(120) for r in [pool.apply_async(fn, (i,)) for i in range(N_APPLY)]]
                )
                rows.append((label, N_MAP / t_map, N_APPLY / t_apply))
            counters = client.status()["code"]
        finally:
            pool.close()
            pool.join()
            client.shutdown()
    print(f"{'function':<10} {'Pool.map calls/s':>18} {'apply_async tasks/s':>21}")
    for label, m, a in rows:
        print(f"{label:<10} {m:>18,.0f} {a:>21,.0f}")
    print(f"code: {counters}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
