"""Soak run: many tiny tasks through real daemons; samples master RSS and journal size.

    python -m bench.soak --tasks 1000000 --ttl 10

Shows that neither the journal file nor the master's memory grows without bound
when results expire (figures in docs/OPERATIONS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def disk_kib(data: Path) -> int:
    return sum(p.stat().st_size for p in data.glob("journal.sqlite3*")) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=20_000, help="tasks in flight at once")
    ap.add_argument("--ttl", type=float, default=10.0, help="result TTL in seconds")
    ap.add_argument("--sample-s", type=float, default=10.0)
    args = ap.parse_args()

    from poolfleet.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="pf-soak-"))
    data = tmp / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLFLEET_")}
    mlog, wlog = tmp / "master.log", tmp / "worker.log"
    master = subprocess.Popen(
        [
            str(BIN / "pmaster"),
            "--clients",
            "tcp://127.0.0.1:0",
            "--workers",
            "tcp://127.0.0.1:0",
            "--data-dir",
            str(data),
            "--result-ttl-s",
            str(args.ttl),
        ],
        stdout=mlog.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    procs = [master]
    keep = False
    try:
        started = _endpoints(mlog)
        worker = subprocess.Popen(
            [
                str(BIN / "pworker"),
                "--master",
                started["workers_endpoint"],
                "--cpu",
                "2",
                "--log-level",
                "info",
            ],
            stdout=wlog.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        procs.append(worker)
        rows = []
        t0 = time.monotonic()
        last_sample = 0.0
        done = 0
        with Client(str(started["clients_endpoint"])) as c:
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
                    row = (done, round(now - t0, 1), rss_kib(master.pid), disk_kib(data))
                    rows.append(row)
                    print("tasks={} elapsed_s={} master_rss_kib={} journal_kib={}".format(*row), flush=True)
        print("\n| tasks done | elapsed s | master RSS MiB | journal + WAL MiB |")
        print("|---:|---:|---:|---:|")
        for done_n, el, rss, disk in rows:
            print(f"| {done_n:,} | {el} | {rss / 1024:.1f} | {disk / 1024:.1f} |")
        total = time.monotonic() - t0
        print(
            f"\n{args.tasks:,} tasks in {total:.0f} s ({args.tasks / total:,.0f} tasks/s),"
            f" result TTL {args.ttl} s"
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _endpoints(log: Path) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"master_started"' in line:
                return dict(json.loads(line))
        time.sleep(0.05)
    raise SystemExit("master did not start")


if __name__ == "__main__":
    main()
