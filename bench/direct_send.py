"""``python -m bench.direct_send``: the client's caller-thread shortcut for a submit, on and off.

One master and one worker on loopback; blocks of sequential no-op round trips alternate
between the client as shipped (a submit made while nothing is in flight leaves from the
caller's thread, see client/connection.py ``_send_now``) and the same client with the shortcut
off (every submit handed to the connection's thread). Prints the median of each block and the
median of the medians, for each.
"""

from __future__ import annotations

import argparse
import statistics

from bench import fleet
from bench.daemons import BenchCluster
from poolfleet.client.connection import Connection


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.direct_send", description=__doc__)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    with BenchCluster() as cluster:
        cluster.add_worker(cpu=2, io=50)
        client = fleet.Client(cluster.client_endpoint)
        client.status()
        fleet.warm_up(client)
        shipped = Connection._send_now
        out: dict[str, list[float]] = {"caller's thread": [], "connection's thread": []}
        try:
            for _ in range(args.blocks):
                for mode in out:
                    Connection._send_now = shipped if mode == "caller's thread" else (lambda *_a: False)  # type: ignore[method-assign,assignment]
                    out[mode].append(statistics.median(fleet.round_trips(client, args.calls)))
        finally:
            Connection._send_now = shipped  # type: ignore[method-assign]
            client.close()
    for mode, blocks in out.items():
        print(
            f"submit from the {mode}: p50 per block {' '.join(f'{b:.3f}' for b in blocks)} ms; "
            f"median {statistics.median(blocks):.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
