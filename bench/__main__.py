"""``python -m bench``: the benchmark table of docs/BENCHMARKS.md.

Runs every workload on a local multiprocessing.Pool(2) / ThreadPool(50) (the
yardstick) and through real pmaster and pworker processes on loopback, in the
same run, and prints ratios against the targets of the design.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import fleet, report, yardstick
from bench.daemons import ROOT, BenchCluster
from bench.report import Row
from bench.stats import median, percentile, spread
from bench.tasks import burn

N_NOOP = 5_000
N_NOOP_BIG = 50_000
N_RTT = 300
N_CPU, CPU_MS = 40, 15.0
N_IO, IO_S, IO_THREADS = 200, 0.05, 50


def calibrate(target_ms: float) -> tuple[int, float]:
    """Loop count for ``burn`` taking about ``target_ms``, and its measured time (ms, median of 10)."""
    burn(50_000)
    t0 = time.perf_counter()
    burn(200_000)
    per_loop = (time.perf_counter() - t0) / 200_000
    loops = max(1000, int(target_ms / 1000 / per_loop))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        burn(loops)
        times.append((time.perf_counter() - t0) * 1000)
    return loops, median(times)


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each workload (median and range) [3]")
    ap.add_argument("--quick", action="store_true", help="one run each, no 50,000-task and scale runs")
    ap.add_argument("--no-scale", action="store_true", help="skip the 100-worker / 1M-task scale run")
    ap.add_argument("--scale-tasks", type=int, default=1_000_000, help="pending tasks of the scale run")
    ap.add_argument("--scale-workers", type=int, default=100, help="simulated workers of the scale run")
    ap.add_argument("--only", default="", help="comma list: noop,rtt,cpu,io,big,four,scale")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    repeat = 1 if args.quick else max(1, args.repeat)
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        if only:
            return name in only
        if args.quick and name in ("big", "scale"):
            return False
        return not (name == "scale" and args.no_scale)

    started = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    loops, t1 = calibrate(CPU_MS)
    say(f"burn({loops}) takes {t1:.2f} ms here")

    # -- the yardstick ---------------------------------------------------------
    say("yardstick: local multiprocessing.Pool(2) and ThreadPool(50)")
    y: dict[str, list[float]] = {k: [] for k in ("noop", "big", "p50", "p99", "cpu", "io")}
    with yardstick.pool(2) as pool:
        for _ in range(repeat):
            if want("noop") or want("four"):
                y["noop"].append(yardstick.throughput(pool, N_NOOP))
            if want("rtt"):
                rt = yardstick.round_trips(pool, N_RTT)
                y["p50"].append(percentile(rt, 50))
                y["p99"].append(percentile(rt, 99))
            if want("cpu"):
                y["cpu"].append(N_CPU * t1 / 1000 / 2 / yardstick.cpu_time(pool, N_CPU, loops))
        if want("big"):
            y["big"].append(yardstick.throughput(pool, N_NOOP_BIG))
    if want("io"):
        for _ in range(repeat):
            y["io"].append(N_IO * IO_S / IO_THREADS / yardstick.io_time(IO_THREADS, N_IO, IO_S))

    # -- poolfleet -------------------------------------------------------------
    f: dict[str, list[float]] = {k: [] for k in ("noop", "big", "p50", "p99", "cpu", "io", "four", "four_big")}
    durations: list[float] = []
    if any(want(k) for k in ("noop", "rtt", "cpu", "io", "big", "four")):
        say("poolfleet: pmaster + 1 pworker (2 cpu slots, 50 io slots), journal on")
        with BenchCluster() as cluster:
            cluster.add_worker(cpu=2, io=IO_THREADS)
            client = fleet.Client(cluster.client_endpoint)
            try:
                client.status()
                fleet.warm_up(client)
                for _ in range(repeat):
                    if want("noop"):
                        f["noop"].append(fleet.throughput(client, N_NOOP))
                    if want("rtt"):
                        rt = fleet.round_trips(client, N_RTT)
                        f["p50"].append(percentile(rt, 50))
                        f["p99"].append(percentile(rt, 99))
                    if want("cpu"):
                        elapsed, d = fleet.cpu_time(client, N_CPU, loops)
                        durations += d
                        f["cpu"].append(N_CPU * t1 / 1000 / 2 / elapsed)
                    if want("io"):
                        f["io"].append(N_IO * IO_S / IO_THREADS / fleet.io_time(client, N_IO, IO_S))
                if want("big"):
                    f["big"].append(fleet.throughput(client, N_NOOP_BIG))
                if want("four"):
                    say("poolfleet: 3 more workers (4 in all)")
                    for _ in range(3):
                        cluster.add_worker(cpu=2, io=IO_THREADS)
                    fleet.warm_up(client)
                    for _ in range(repeat):
                        f["four"].append(fleet.throughput(client, N_NOOP))
                    if want("big"):
                        f["four_big"].append(fleet.throughput(client, N_NOOP_BIG))
            finally:
                client.close()

    # -- the table -------------------------------------------------------------
    def ratio_row(name: str, fk: str, yk: str, target: float) -> None:
        if not f[fk]:
            return
        r = [a / median(y[yk]) for a in f[fk]] if y[yk] else []
        rows.append(
            Row(
                name,
                spread(f[fk]) + " tasks/s",
                spread(y[yk]) + " tasks/s" if y[yk] else "-",
                spread(r, 2) + "x" if r else "-",
                f">= {target}x",
                median(r) >= target if r else None,
            )
        )

    ratio_row(f"no-op throughput, {N_NOOP:,} tasks, 1 worker", "noop", "noop", 0.5)
    if f["p50"]:
        rows.append(
            Row(
                f"round trip p50, {N_RTT} sequential",
                spread(f["p50"], 3) + " ms",
                spread(y["p50"], 3) + " ms",
                "-",
                "< 0.5 ms",
                median(f["p50"]) < 0.5,
            )
        )
        rows.append(
            Row(
                f"round trip p99, {N_RTT} sequential",
                spread(f["p99"], 3) + " ms",
                spread(y["p99"], 3) + " ms",
                "-",
                "< 2 ms",
                median(f["p99"]) < 2.0,
            )
        )
    for key, name in (
        ("cpu", f"cpu efficiency, {N_CPU} x {CPU_MS:g} ms on 2 slots"),
        ("io", f"io efficiency, {N_IO} x {IO_S * 1000:g} ms sleeps on {IO_THREADS} slots"),
    ):
        if f[key]:
            rows.append(
                Row(
                    name,
                    spread(f[key], 3),
                    spread(y[key], 3),
                    "-",
                    ">= 0.95",
                    median(f[key]) >= 0.95,
                )
            )
    ratio_row(f"no-op throughput, {N_NOOP_BIG:,} tasks, 1 worker", "big", "big", 0.5)
    ratio_row(f"no-op throughput, {N_NOOP:,} tasks, 4 workers", "four", "noop", 0.5)
    ratio_row(f"no-op throughput, {N_NOOP_BIG:,} tasks, 4 workers", "four_big", "big", 0.5)
    if durations:
        notes.append(
            f"cpu: ideal time = {N_CPU} x {t1:.2f} ms (median single-task time of `burn({loops})` "
            f"measured in the bench process in the same run) / 2 slots; median task time reported "
            f"by the worker during the run: {median(durations):.2f} ms."
        )
    if want("scale"):
        from bench import scale

        say(f"scale: {args.scale_workers} simulated workers, {args.scale_tasks:,} pending tasks")
        srows, snotes = scale.run(args.scale_workers, args.scale_tasks, say)
        rows += srows
        notes += snotes
    notes.append(
        f"Each workload ran {repeat} time(s): median (min-max). Whole run: "
        f"{time.monotonic() - started:.0f} s."
    )

    env = report.environment()
    print(report.table(rows))
    for n in notes:
        print(f"- {n}")
    if not args.no_write:
        report.write(args.out, report.section(rows, env, notes, report.command_line()))
        say(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
