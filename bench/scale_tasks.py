"""Scale check of task listings: a journal of N finished tasks (default 1,000,000; 1% FAILED,
names and queues spread), then the time of one page of 50 through the master core's TASKS
handler for several filters, and the cost of the partial index per finish.

    .venv/bin/python -m bench.scale_tasks [--rows 1000000] [--dir /tmp/pf-scale]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from poolfleet.common.ids import new_task_ids
from poolfleet.common.protocol import TaskState
from poolfleet.master.core import MasterCore
from poolfleet.master.journal import Journal
from poolfleet.master.settings import MasterSettings


def fill(path: Path, rows: int) -> None:
    j = Journal(path)
    rng = random.Random(1)
    t0 = time.time() - rows / 1000
    done = 0
    while done < rows:
        n = min(20_000, rows - done)
        for i, tid in enumerate(new_task_ids(n)):
            k = done + i
            name = f"mod:f{k % 20}"
            j.stage_insert(tid, name, f"q{k % 5}", "cpu", b"\x92\x91\x01\x80", None, None, t0 + k / 1000)
            state = TaskState.FAILED if rng.random() < 0.01 else TaskState.SUCCEEDED
            j.stage_finish(tid, state, 1, b"\x01", None, t0 + k / 1000, t0 + 86400, f"w{k % 8}", 1.0)
        j.commit()
        done += n
    j.close()


def finish_cost(tmp: Path, n: int = 100_000) -> tuple[float, float]:
    """us per insert+start+finish, without and with the partial index."""
    out = []
    for with_index in (False, True):
        p = tmp / f"cost-{with_index}.sqlite3"
        j = Journal(p)
        if not with_index:
            j.db.execute("DROP INDEX tasks_finished")
        ids = new_task_ids(n)
        t = time.perf_counter()
        for i in range(0, n, 1000):
            part = ids[i : i + 1000]
            for tid in part:
                j.stage_insert(tid, "mod:f", "default", "cpu", b"\x92\x90\x80", None, None, 1.0)
            j.commit()
            for tid in part:
                j.stage_start(tid, 1)
            j.commit()
            for tid in part:
                j.stage_finish(tid, TaskState.SUCCEEDED, 1, b"\x01", None, 2.0, 3.0, "w", 1.0)
            j.commit()
        out.append((time.perf_counter() - t) / n * 1e6)
        j.close()
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="pf-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "journal.sqlite3"
    if not path.exists():
        t = time.perf_counter()
        fill(path, args.rows)
        print(
            f"filled {args.rows:,} rows in {time.perf_counter() - t:.0f} s ({os.path.getsize(path) >> 20} MiB)"
        )
    db = sqlite3.connect(path)
    print("rows:", db.execute("SELECT count(*) FROM tasks").fetchone()[0])
    db.close()
    j = Journal(path)
    core = MasterCore(MasterSettings(data_dir=tmp), j, "scale")
    cases = {
        "no filter": {},
        "--state FAILED": {"states": ["FAILED"]},
        "--state SUCCEEDED --state FAILED": {"states": ["SUCCEEDED", "FAILED"]},
        "--name mod:f3": {"name": "mod:f3"},
        "--queue q2 --worker w4": {"queue": "q2", "worker": "w4"},
        "--state FAILED --name mod:f3": {"states": ["FAILED"], "name": "mod:f3"},
        "--since 10m": {"since": time.time() - 600},
    }
    for label, body in cases.items():
        times, pages, got = [], [], 0
        for _ in range(5):
            t = time.perf_counter()
            req = dict(body, limit=50)
            n, requests = 0, 0
            while True:  # what ptask does: follow the cursor until the page is full
                reply = core.tasks_list(1, req)
                requests += 1
                n += len(reply["tasks"])
                if "next" not in reply or n >= 50:
                    break
                req = dict(req, before=reply["next"], limit=50 - n)
            times.append((time.perf_counter() - t) * 1000)
            pages.append(requests)
            got = n
        print(
            f"{label:38s} page of {got}: median {statistics.median(times):6.1f} ms, "
            f"max {max(times):6.1f} ms, {pages[0]} request(s)"
        )
    j.close()
    plain, indexed = finish_cost(tmp)
    print(f"insert+start+finish per task: {plain:.1f} us without tasks_finished, {indexed:.1f} us with it")


if __name__ == "__main__":
    main()
