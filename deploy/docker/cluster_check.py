"""Submit a batch to a poolfleet cluster and check every result (the compose `client` service).

Waits until ``--workers`` workers are connected, submits ``--count`` echo tasks
(io slots) and ``--count`` spin tasks (cpu slots) from poolfleet's built-ins,
checks each result, and prints one JSON line: tasks per worker and the outcome.
Exit status 0 when every result is right and the tasks ran on at least
``--workers`` workers, 1 otherwise.

The master's client endpoint comes from --master or POOLFLEET_MASTER.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from poolfleet.client import Client

ECHO = "poolfleet.worker.builtins:echo"
SPIN = "poolfleet.worker.builtins:spin"


def wait_for_workers(client: Client, want: int, deadline: float) -> list[str]:
    names: list[str] = []
    while time.monotonic() < deadline:
        try:
            names = sorted(str(w.get("worker_id")) for w in client.workers(timeout_s=5))
        except Exception as exc:  # noqa: BLE001 - the master may still be starting
            print(json.dumps({"event": "waiting_for_master", "error": str(exc)}), flush=True)
            names = []
        if len(names) >= want:
            return names
        time.sleep(0.2)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--master", default=None, help="client endpoint [POOLFLEET_MASTER]")
    ap.add_argument("--count", type=int, default=40, help="tasks of each kind [40]")
    ap.add_argument("--spin-ms", type=float, default=50.0, help="CPU time of each spin task [50]")
    ap.add_argument("--workers", type=int, default=2, help="workers that must take part [2]")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole check [120]")
    args = ap.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    problems: list[str] = []
    with Client(args.master, timeout_s=10) as client:
        connected = wait_for_workers(client, args.workers, deadline)
        if len(connected) < args.workers:
            problems.append(f"only {len(connected)} of {args.workers} workers connected: {connected}")
        echo = client.submit_many(ECHO, [((i, f"item-{i}"), {}) for i in range(args.count)])
        spin = client.submit_many(SPIN, [((args.spin_ms,), {}) for _ in range(args.count)])
        by_worker: collections.Counter[str] = collections.Counter()
        for i, f in enumerate(echo):
            value = f.result(max(1.0, deadline - time.monotonic()))
            if value != [i, f"item-{i}"]:
                problems.append(f"echo {i} returned {value!r}")
            by_worker[str(f.info.get("worker_id"))] += 1
        for f in spin:
            value = f.result(max(1.0, deadline - time.monotonic()))
            if not isinstance(value, int) or value <= 0:
                problems.append(f"spin returned {value!r}")
            by_worker[str(f.info.get("worker_id"))] += 1
    if len(by_worker) < args.workers:
        problems.append(f"tasks ran on {len(by_worker)} worker(s), expected {args.workers}")
    print(
        json.dumps(
            {
                "event": "cluster_checked",
                "ok": not problems,
                "tasks": 2 * args.count,
                "by_worker": dict(sorted(by_worker.items())),
                "problems": problems[:20],
            }
        ),
        flush=True,
    )
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
