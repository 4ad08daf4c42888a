"""Soak run: many tiny tasks through real daemons; samples master RSS and journal size.

    python -m bench.soak --tasks 1000000 --ttl 10

Shows that neither the journal file nor the master's memory grows without bound
when results expire (figures in docs/OPERATIONS.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.daemons import BenchCluster


def disk_mib(data: Path) -> float:
    return sum(p.stat().st_size for p in data.glob("journal.sqlite3*")) / (1024 * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=20_000, help="tasks in flight at once")
    ap.add_argument("--ttl", type=float, default=10.0, help="result TTL in seconds")
    ap.add_argument("--sample-s", type=float, default=10.0)
    args = ap.parse_args()

    from poolfleet.client import Client

    cluster = BenchCluster(master_args=("--result-ttl-s", str(args.ttl)))
    keep = False
    try:
        cluster.add_worker(cpu=2)
        data = cluster.tmp / "data"
        rows: list[tuple[int, float, float, float]] = []
        t0 = time.monotonic()
        last_sample = 0.0
        done = 0
        with Client(cluster.client_endpoint) as c:
            while done < args.tasks:
                n = min(args.window, args.tasks - done)
                futs = c.submit_many("poolfleet.worker.builtins:noop", [((), {})] * n)
                for f in futs:
                    try:
                        f.result(300)
                    except TimeoutError:
                        state = c.results([f.task_id]).get(f.task_id)
                        print(f"task {f.task_id} has no result after 300 s; master says {state}", flush=True)
                        keep = True
                        raise
                done += n
                now = time.monotonic()
                if now - last_sample >= args.sample_s or done >= args.tasks:
                    last_sample = now
                    row = (done, round(now - t0, 1), cluster.master.rss_mb(), disk_mib(data))
                    rows.append(row)
                    print(
                        "tasks={} elapsed_s={} master_rss_mib={:.1f} journal_mib={:.1f}".format(*row),
                        flush=True,
                    )
        print("\n| tasks done | elapsed s | master RSS MiB | journal + WAL MiB |")
        print("|---:|---:|---:|---:|")
        for done_n, el, rss, disk in rows:
            print(f"| {done_n:,} | {el} | {rss:.1f} | {disk:.1f} |")
        total = time.monotonic() - t0
        print(
            f"\n{args.tasks:,} tasks in {total:.0f} s ({args.tasks / total:,.0f} tasks/s),"
            f" result TTL {args.ttl} s"
        )
    finally:
        cluster.close(keep_logs=keep)
        if keep:
            print(f"logs kept in {cluster.tmp}")


if __name__ == "__main__":
    main()
