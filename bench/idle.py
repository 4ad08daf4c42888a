"""The master's CPU with N simulated workers connected and nothing to do: the fixed cost of
a fleet (heartbeats both ways, liveness scans), without tasks or STATUS probes.

    python -m bench.idle --workers 1000 [--seconds 8] [-- pmaster options...]

Prints the master's and the simulating processes' CPU as a percentage of one core.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

from bench.daemons import BenchCluster
from bench.scale import SimulatedFleet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("master_args", nargs="*", help="passed to pmaster (after --)")
    args = ap.parse_args()
    mp = multiprocessing.get_context("spawn")
    with BenchCluster(tuple(args.master_args)) as cluster:
        sim = SimulatedFleet(mp, cluster.worker_endpoint, args.workers)
        sim.start()
        try:
            if not sim.welcomed(60):
                raise SystemExit("the simulated workers did not register")
            time.sleep(2.0)  # past the first intervals the fleet's size changed
            c0, s0, t0 = cluster.master.cpu_s(), sim.cpu_s(), time.monotonic()
            time.sleep(args.seconds)
            dt = time.monotonic() - t0
            master = 100 * (cluster.master.cpu_s() - c0) / dt
            sims = 100 * (sim.cpu_s() - s0) / dt
            print(
                f"{args.workers} workers connected, idle: master {master:.1f} % of a core, simulated workers {sims:.1f} %"
            )
            sim.stop()
        finally:
            sim.kill()


if __name__ == "__main__":
    main()
