"""Scale: what one dispatch costs with a million pending tasks, with and without priorities.

The master's scheduler alone, in this process (no sockets, no journal): a million PENDING tasks
of one name and queue, their priorities spread over 1, 21 or 201 levels (-100 ... 100), drained
through a worker with a thousand free slots, one dispatch round (at most 1,000 tasks) after the
other, as the master's loop does. A round merges the heads of one FIFO per priority in a heap,
so a task costs O(log levels), whatever the number pending: the same per task at 10,000
pending as at 1,000,000 shows it. Timed in process CPU time, which other load on a shared
host disturbs less than the wall clock.

    python -m bench.scale_priorities [--tasks N]
"""

from __future__ import annotations

import argparse
import gc
import time

from bench.report import Row
from poolfleet.common.protocol import Kind
from poolfleet.master.registry import WorkerInfo
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.state import TaskRecord

LEVELS = (1, 21, 201)


def dispatch_us(n: int, levels: int) -> float:
    """Microseconds per task to plan ``n`` pending tasks over ``levels`` priorities."""
    s = Scheduler(prefetch=0)
    low = -(levels // 2)
    for i in range(n):
        rec = TaskRecord(
            id=i.to_bytes(16, "big"), name="m:f", queue="default", kind=Kind.CPU, payload=b"",
            timeout_s=None, retries=None, created_at=0.0, priority=low + i % levels,
        )  # fmt: skip
        s.push(rec, 0.0)
    w = WorkerInfo(
        identity=b"w", worker_id="w", host="h", pid=1, queues=("default",), slots={Kind.CPU: 1000},
        connected_at=0.0, last_seen=0.0, offers=None,
    )  # fmt: skip
    gc.collect()
    planned = 0
    t0 = time.process_time()
    last_priority = 101
    while planned < n:
        w.wants = True  # the worker is never given the tasks: as if each round's had finished
        plan = s.assign([w], 0.0)
        batch = plan.get(b"w", [])
        if not batch:
            raise RuntimeError("a round planned nothing with tasks pending")
        planned += len(batch)
        if batch[0].priority > last_priority or batch[-1].priority > batch[0].priority:
            raise RuntimeError("a lower priority went before a higher one")
        last_priority = batch[-1].priority
    return (time.process_time() - t0) / n * 1e6


def rows(n: int) -> list[Row]:
    """A row per number of levels: the cost at ``n`` pending against that at 10,000."""
    out = []
    for levels in LEVELS:
        small = sorted(dispatch_us(10_000, levels) for _ in range(3))[1]  # a median: the host is shared
        big = dispatch_us(n, levels)
        out.append(
            Row(
                f"scale: scheduler dispatch at {n:,} pending, {levels} priority level{'s' * (levels > 1)}",
                f"{big:.2f} us/task (at 10,000 pending: {small:.2f} us/task)",
                "-",
                f"{big / small:.2f}x",
                "flat in pending (O(log levels))",
                big <= 2.0 * small,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.scale_priorities", description=__doc__)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    args = ap.parse_args()
    for r in rows(args.tasks):
        print(f"{r.workload}: {r.poolfleet} ({r.ratio}, {'ok' if r.ok else 'NOT OK'})")


if __name__ == "__main__":
    main()
