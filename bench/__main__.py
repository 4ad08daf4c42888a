"""``python -m bench``: the benchmark table of docs/BENCHMARKS.md.

Runs every workload on a local multiprocessing.Pool(2) / ThreadPool(50) (the
yardstick) and through real pmaster and pworker processes on loopback, in the
same run, and prints ratios against the targets of the design.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import fleet, floor, report, yardstick
from bench.calibrate import calibrate, single_task_ms
from bench.daemons import ROOT, BenchCluster
from bench.report import Row
from bench.stats import median, percentile, spread

N_NOOP = 5_000
N_NOOP_BIG = 50_000
N_RTT = 300
N_CPU, CPU_MS = 40, 15.0
N_IO, IO_S, IO_THREADS = 200, 0.05, 50
N_MAP = 100_000

Series = dict[str, list[float]]


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """A SIGTERM (timeout, Ctrl-C in a pipeline) stops the daemons through the context managers.

    Only in this process: the local pool's forked children inherit the handler, and the SIGTERM
    of ``Pool.terminate`` then raised SystemExit inside a child that held a lock, which hung the
    pool's exit (seen under load); a child dies at once, as without the handler.
    """
    main_pid = os.getpid()

    def on_term(*_: object) -> None:
        if os.getpid() != main_pid:
            os._exit(143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)


class Plan:
    """What to run: ``--only`` names, minus what ``--quick`` and ``--no-scale`` leave out."""

    NAMES = ("noop", "rtt", "cpu", "io", "map", "big", "four", "apply", "floor", "journals", "scale")

    def __init__(self, args: argparse.Namespace) -> None:
        self.only = set(filter(None, args.only.split(",")))
        unknown = self.only - set(self.NAMES)
        if unknown:
            raise SystemExit(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(self.NAMES)}")
        self.quick = args.quick
        self.no_scale = args.no_scale
        self.repeat = 1 if args.quick else max(1, args.repeat)

    def __call__(self, name: str) -> bool:
        if self.only:
            return name in self.only
        if self.quick and name in ("big", "journals", "scale"):
            return False
        return not (name == "scale" and self.no_scale)


def run_pairs(want: Plan, loops: int, singles: list[float]) -> tuple[Series, Series, list[float]]:
    """Each workload on the yardstick, then through poolfleet, back to back, ``repeat`` times.

    Pairs, not two blocks, so that both sides of a ratio see the same load on a shared machine.
    """
    y: Series = {k: [] for k in ("noop", "big", "p50", "p99", "cpu", "io", "map")}
    f: Series = {
        k: [] for k in ("noop", "big", "p50", "p99", "cpu", "io", "four", "four_big", "apply", "map")
    }
    durations: list[float] = []
    if not any(want(k) for k in ("noop", "rtt", "cpu", "io", "map", "big", "four", "apply")):
        return y, f, durations
    say("yardstick: local multiprocessing.Pool(2) and ThreadPool(50); poolfleet: pmaster + 1 pworker")
    # the local pool forks its children before any client thread exists
    with yardstick.pool(2) as pool, BenchCluster() as cluster:
        cluster.add_worker(cpu=2, io=IO_THREADS)
        client = fleet.Client(cluster.client_endpoint)
        try:
            client.status()
            fleet.warm_up(client)
            for _ in range(want.repeat):
                if want("noop") or want("four") or want("apply"):
                    y["noop"].append(yardstick.throughput(pool, N_NOOP))
                if want("noop"):
                    f["noop"].append(fleet.throughput(client, N_NOOP))
                if want("rtt"):
                    rt = yardstick.round_trips(pool, N_RTT)
                    y["p50"].append(percentile(rt, 50))
                    y["p99"].append(percentile(rt, 99))
                    rt = fleet.round_trips(client, N_RTT)
                    f["p50"].append(percentile(rt, 50))
                    f["p99"].append(percentile(rt, 99))
                if want("cpu"):
                    # the ideal of this pair: the single-task time measured right before it
                    t1 = single_task_ms(loops)
                    singles.append(t1)
                    y["cpu"].append(N_CPU * t1 / 1000 / 2 / yardstick.cpu_time(pool, N_CPU, loops))
                    elapsed, d = fleet.cpu_time(client, N_CPU, loops)
                    durations += d
                    f["cpu"].append(N_CPU * t1 / 1000 / 2 / elapsed)
                if want("io"):
                    y["io"].append(N_IO * IO_S / IO_THREADS / yardstick.io_time(IO_THREADS, N_IO, IO_S))
                    f["io"].append(N_IO * IO_S / IO_THREADS / fleet.io_time(client, N_IO, IO_S))
                if want("map"):
                    # calls per second of Pool.map(square, range(N_MAP)), default chunk size
                    y["map"].append(N_MAP / yardstick.map_time(pool, N_MAP))
                    f["map"].append(N_MAP / fleet.map_time(client, N_MAP))
                if want("apply"):
                    f["apply"].append(fleet.apply_async_throughput(client, N_NOOP))
            if want("big"):
                y["big"].append(yardstick.throughput(pool, N_NOOP_BIG))
                f["big"].append(fleet.throughput(client, N_NOOP_BIG))
            if want("four"):
                say("poolfleet: 3 more workers (4 in all)")
                for _ in range(3):
                    cluster.add_worker(cpu=2, io=IO_THREADS)
                fleet.warm_up(client)
                for _ in range(want.repeat):
                    f["four"].append(fleet.throughput(client, N_NOOP))
                if want("big"):
                    f["four_big"].append(fleet.throughput(client, N_NOOP_BIG))
        finally:
            client.close()
    return y, f, durations


def table_rows(f: Series, y: Series, fl: Series) -> list[Row]:
    rows: list[Row] = []

    def ratio_row(name: str, fk: str, yk: str, target: float | None) -> None:
        if not f[fk]:
            return
        r = [a / median(y[yk]) for a in f[fk]] if y[yk] else []
        rows.append(
            Row(
                name,
                spread(f[fk]) + " tasks/s",
                spread(y[yk]) + " tasks/s" if y[yk] else "-",
                spread(r, 2) + "x" if r else "-",
                f">= {target}x" if target else "report",
                (median(r) >= target if r else None) if target else None,
            )
        )

    # the targets of the performance issue (fourth round): the local pool's own throughput,
    # a round trip within 0.5 ms at the median and 1.5 ms at the 99th percentile
    ratio_row(f"no-op throughput, {N_NOOP:,} tasks, 1 worker", "noop", "noop", 1.0)
    for key, name, limit in (("p50", "round trip p50", 0.5), ("p99", "round trip p99", 1.5)):
        if f[key]:
            rows.append(
                Row(
                    f"{name}, {N_RTT} sequential",
                    spread(f[key], 3) + " ms",
                    spread(y[key], 3) + " ms" if y[key] else "-",
                    "-",
                    f"< {limit:g} ms",
                    median(f[key]) < limit,
                )
            )
    if fl["p50"]:
        rows.append(
            Row(
                "round trip floor: 4 ZeroMQ hops, 3 processes, no work",
                f"p50 {spread(fl['p50'], 3)} ms, p99 {spread(fl['p99'], 3)} ms",
                "-",
                "-",
                "reference",
                None,
            )
        )
    if f["cpu"]:  # at least the local pool's efficiency in the same pairs of runs
        rows.append(
            Row(
                f"cpu efficiency, {N_CPU} x {CPU_MS:g} ms on 2 slots",
                spread(f["cpu"], 3),
                spread(y["cpu"], 3),
                "-",
                ">= local",
                median(f["cpu"]) >= median(y["cpu"]) if y["cpu"] else None,
            )
        )
    if f["io"]:
        rows.append(
            Row(
                f"io efficiency, {N_IO} x {IO_S * 1000:g} ms sleeps on {IO_THREADS} slots",
                spread(f["io"], 3),
                spread(y["io"], 3),
                "-",
                ">= 0.97",
                median(f["io"]) >= 0.97,
            )
        )
    ratio_row(f"Pool.map of {N_MAP:,} tiny calls, default chunk size, 1 worker", "map", "map", 0.5)
    ratio_row(f"no-op throughput, {N_NOOP_BIG:,} tasks, 1 worker", "big", "big", 1.0)
    ratio_row(f"no-op throughput, {N_NOOP:,} tasks, 4 workers", "four", "noop", 1.0)
    ratio_row(f"no-op throughput, {N_NOOP_BIG:,} tasks, 4 workers", "four_big", "big", 1.0)
    ratio_row(f"no-op, {N_NOOP:,} x Pool.apply_async (one call per task)", "apply", "noop", None)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each workload (median and range) [3]")
    ap.add_argument(
        "--quick", action="store_true", help="one run each, no 50,000-task, journals and scale runs"
    )
    ap.add_argument("--no-scale", action="store_true", help="skip the 100-worker / 1M-task scale run")
    ap.add_argument("--scale-tasks", type=int, default=1_000_000, help="pending tasks of the scale run")
    ap.add_argument("--scale-workers", type=int, default=100, help="simulated workers of the scale run")
    ap.add_argument(
        "--scale-per-process",
        type=int,
        default=None,
        help="simulated workers per simulating process, at most [125]",
    )
    ap.add_argument(
        "--scale-held",
        type=int,
        default=100_000,
        help="tasks of the scale run that each depend on one other, and as many delayed ones",
    )
    ap.add_argument(
        "--scale-priorities", type=int, default=1, help="priority levels of the scale run's tasks [1: all 0]"
    )
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(Plan.NAMES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    if args.scale_per_process is not None and args.scale_per_process < 1:
        ap.error("--scale-per-process must be at least 1")
    want = Plan(args)
    exit_on_sigterm()

    started = time.monotonic()
    loops, t1 = calibrate(CPU_MS)
    say(f"burn({loops}) takes {t1:.2f} ms here")
    fl: Series = {"p50": [], "p99": []}
    if want("floor") or want("rtt"):
        for _ in range(want.repeat):
            rt = floor.round_trips(N_RTT)
            fl["p50"].append(percentile(rt, 50))
            fl["p99"].append(percentile(rt, 99))
    singles: list[float] = []
    y, f, durations = run_pairs(want, loops, singles)
    rows = table_rows(f, y, fl)
    notes: list[str] = []
    if durations:
        notes.append(
            f"cpu: ideal time = {N_CPU} x the single-task time of `burn({loops})` / 2 slots; the "
            f"single-task time is measured alone in the bench process right before each pair of runs "
            f"({spread(singles, 2)} ms). Median task time the worker reported during its runs: "
            f"{median(durations):.2f} ms: where it exceeds the single-task time, the two children "
            "were slowed by each other or by other load, which no scheduler can win back."
        )
    if want("journals"):
        from bench import journals

        jrows, jnotes = journals.run(want.repeat, N_NOOP, N_RTT, say)
        rows += jrows
        notes += jnotes
    if want("scale"):
        from bench import scale, scale_priorities

        say(f"scale: {args.scale_workers} simulated workers, {args.scale_tasks:,} pending tasks")
        srows, snotes = scale.run(
            args.scale_workers,
            args.scale_tasks,
            say,
            held=args.scale_held,
            priorities=args.scale_priorities,
            per_process=args.scale_per_process or scale.WORKERS_PER_PROCESS,
        )
        rows += srows
        say(f"scale: the scheduler alone, {args.scale_tasks:,} pending, by priority levels")
        rows += scale_priorities.rows(args.scale_tasks)
        notes += snotes
    notes.append(
        f"Each workload ran {want.repeat} time(s): median (min-max). Whole run: "
        f"{time.monotonic() - started:.0f} s."
    )
    emit(rows, notes, args)
    return 0


def emit(
    rows: list[Row], notes: list[str], args: argparse.Namespace, out: Callable[[str], None] = print
) -> None:
    out(report.table(rows))
    for n in notes:
        out(f"- {n}")
    if not args.no_write:
        env = report.environment()
        report.write(args.out, report.section(rows, env, notes, report.command_line()))
        say(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    sys.exit(main())
