"""``python -m bench.profile``: sample the daemons with py-spy during a no-op run.

Starts a master and one worker like the benchmark, attaches ``py-spy record``
(collapsed-stack output) to the master, the worker and the worker's pool
children, runs the no-op workload, and prints the functions holding the most
samples per process (own time and inclusive time).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import fleet
from bench.daemons import BenchCluster


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().split(") ", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        frames = [f for f in stack.split(";") if f]
        # drop the thread frame py-spy puts first
        total += count
        if frames:
            own[frames[-1]] += count
            for f in set(frames):
                incl[f] += count
    lines = [f"  {total} samples"]
    lines.append("  own time:")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("--tasks", type=int, default=20_000, help="no-op tasks to run while sampling")
    ap.add_argument("--rtt", type=int, default=0, help="sequential round trips instead of a batch")
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) samples")
    ap.add_argument("--master-args", default="", help="extra pmaster flags, space separated")
    ap.add_argument("--cpu-only", action="store_true", help="no sampling: CPU time per task per process")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="poolfleet-prof-"))
    with BenchCluster(tuple(args.master_args.split())) as cluster:
        w = cluster.add_worker()
        client = fleet.Client(cluster.client_endpoint)
        client.status()
        fleet.warm_up(client)
        targets = {"master": cluster.master.pid, "worker": w.pid, "client": os.getpid()}
        # the worker's direct children: forkserver and resource tracker; the pool children hang off
        # the forkserver
        for c in children(w.pid):
            for g in children(c):
                targets[f"child-{g}"] = g
        procs = []
        for name, pid in targets.items():
            if args.cpu_only:
                break
            cmd = [spy, "record", "-p", str(pid), "-r", str(args.rate), "-f", "raw"]
            cmd += ["-o", str(tmp / f"{name}.txt"), "--nonblocking"]
            if args.idle:
                cmd.append("--idle")
            if name == "worker":
                cmd.append("--threads")
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        cpu0 = {name: cpu_seconds(pid) for name, pid in targets.items()}
        t0 = time.perf_counter()
        if args.rtt:
            for _ in range(args.rtt):
                client.submit(fleet.NOOP).result(30)
            print(f"{args.rtt} round trips in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        else:
            rate = fleet.throughput(client, args.tasks)
            print(f"{args.tasks} no-op tasks: {rate:,.0f} tasks/s", file=sys.stderr)
        n = args.rtt or args.tasks
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) * 1e6 / n for name, pid in targets.items()}
        print("CPU per task: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()), file=sys.stderr)
        print(f"CPU per task, all processes: {sum(cpu.values()):.0f} us", file=sys.stderr)
        for p in procs:
            p.send_signal(2)
        for p in procs:
            p.wait(30)
        client.close()
    threading.Event().wait(0.1)
    for name in targets:
        path = tmp / f"{name}.txt"
        if path.exists() and path.stat().st_size:
            print(f"== {name}")
            print(summarize(path, args.top))
    print(f"(raw collapsed stacks in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
