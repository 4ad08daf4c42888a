"""``python -m bench.peers`` (``make bench-peers``): poolfleet, the local pool and the peers
(Ray, Dask distributed, Celery + Redis, RQ) through the workloads of ``make bench``, in one run,
one table, written to docs/BENCHMARKS.md.

This process (the project's environment) runs the local pool and poolfleet with bench's own
code; each peer runs in a process of the peers' environment (.venv-peers, made by the make
target) as ``python -m bench.peers.<peer>_peer`` and hands back its figures as JSON. Celery and
RQ share one redis-server started here on a free loopback port, and stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench import report
from bench.__main__ import (
    CPU_MS,
    IO_S,
    IO_THREADS,
    N_CPU,
    N_IO,
    N_NOOP,
    N_RTT,
    Plan,
    exit_on_sigterm,
    run_pairs,
    say,
)
from bench.calibrate import calibrate
from bench.daemons import ROOT
from bench.peers import procs, table
from bench.peers.common import PeerResult, Spec
from bench.peers.redis_server import RedisServer

# name: (module, the system's name in the table, needs redis)
PEERS = {
    "ray": ("bench.peers.ray_peer", "Ray", False),
    "dask": ("bench.peers.dask_peer", "Dask distributed", False),
    "celery": ("bench.peers.celery_peer", "Celery + Redis", True),
    "rq": ("bench.peers.rq_peer", "RQ", True),
}
# nothing phones home: Ray's usage stats off, and its node on 127.0.0.1 (see ray_peer.py)
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DO_NOT_TRACK": "1"}


def ours(spec: Spec) -> list[PeerResult]:
    """The local pool and poolfleet (1 worker), with bench's own code, ``spec.repeat`` times."""
    plan = Plan(argparse.Namespace(only="noop,rtt,cpu,io", quick=False, no_scale=True, repeat=spec.repeat))
    y, f, _ = run_pairs(plan, spec.loops, [])
    python = {"python": platform.python_version()}
    local = PeerResult(
        "local multiprocessing.Pool(2)",
        f"one `apply_async` per task; io on `ThreadPool({IO_THREADS})`",
        python,
        y["noop"],
        y["p50"],
        y["p99"],
        y["cpu"],
        y["io"],
    )
    env = report.environment()
    fleet = PeerResult(
        "poolfleet",
        f"pmaster (SQLite journal on) + 1 pworker `--cpu 2 --io {IO_THREADS}`, `Client.submit_many`",
        {
            "poolfleet": importlib.metadata.version("poolfleet"),
            **python,
            "pyzmq": env["pyzmq"],
            "msgpack": env["msgpack"],
        },
        f["noop"],
        f["p50"],
        f["p99"],
        f["cpu"],
        f["io"],
    )
    return [local, fleet]


def peer_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLFLEET_")}
    env.update(QUIET_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        env["BENCH_REDIS_URL"] = redis_url
    return env


def run_one(python: Path, name: str, spec: Spec, timeout_s: float) -> PeerResult:
    """One peer in its own process (session); what it could not do becomes a reason."""
    module, system, _ = PEERS[name]
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    out, log = tmp / "result.json", tmp / "peer.log"
    argv = [str(python), "-m", module, "--spec", json.dumps(asdict(spec)), "--out", str(out)]
    proc = procs.start(argv, log, peer_env(spec.redis_url), cwd=ROOT)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return table.failed(system, f"did not finish within {timeout_s:g} s")
    finally:
        # SIGTERM to the peer's session (the peer and its workers), SIGKILL to what is left
        procs.stop(proc, grace_s=30)
        text = log.read_text(errors="replace")
        try:
            data = json.loads(out.read_text()) if out.exists() else {}
        except ValueError:  # cut off while it was written
            data = {}
        shutil.rmtree(tmp, ignore_errors=True)
    if "error" in data or not data:
        say(f"{name} failed; the end of its output:\n{text[-3000:]}")
        return table.failed(system, data.get("error") or f"exited with {proc.returncode}")
    return PeerResult.from_json(data)


def peers(args: argparse.Namespace, spec: Spec, extra: list[str]) -> list[PeerResult]:
    names = [n for n in PEERS if n in args.only]
    if not args.python.exists():
        reason = f"no peers' environment at {args.python} (`make bench-peers` makes it)"
        return [table.failed(PEERS[n][1], reason) for n in names]
    redis: RedisServer | None = None
    results: list[PeerResult] = []
    try:
        if any(PEERS[n][2] for n in names):
            try:
                redis = RedisServer()
                extra.append(f"redis-server {redis.version} on 127.0.0.1, `--save ''`, no append-only file.")
            except RuntimeError as exc:
                say(f"{exc}: Celery and RQ are left out")
                extra.append(f"Celery and RQ left out: {exc}.")
        for n in names:
            _, system, needs_redis = PEERS[n]
            if needs_redis and redis is None:
                results.append(table.failed(system, "no redis-server"))
                continue
            say(f"{system}")
            s = Spec(**{**asdict(spec), "redis_url": redis.url if needs_redis and redis else ""})
            results.append(run_one(args.python, n, s, args.timeout))
    finally:
        if redis is not None:
            redis.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    ap.add_argument("--python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python")
    ap.add_argument("--only", default=",".join(PEERS), help=f"comma list of: {', '.join(PEERS)}")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each workload [1]")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds each peer may take [600]")
    ap.add_argument("--note", default="", help="a note for the section (e.g. what else loaded the machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    args.only = set(filter(None, args.only.split(",")))
    if args.only - set(PEERS):
        raise SystemExit(f"unknown peer(s) {sorted(args.only - set(PEERS))}; choose from {', '.join(PEERS)}")
    exit_on_sigterm()

    started, load0 = time.monotonic(), os.getloadavg()[0]
    loops, t1 = calibrate(CPU_MS)
    say(f"burn({loops}) takes {t1:.2f} ms here")
    spec = Spec(N_NOOP, N_RTT, N_CPU, loops, N_IO, IO_S, IO_THREADS, repeat=max(1, args.repeat))
    extra: list[str] = []
    results = ours(spec) + peers(args, spec, extra)
    extra.append(
        f"Workloads as in `make bench`: {N_NOOP:,} no-ops submitted at once until every result is "
        f"back; {N_RTT} sequential round trips; {N_CPU} x `burn({loops})` (calibrated to {CPU_MS:g} ms; "
        f"{t1:.1f} ms alone at the start) on 2 "
        f"slots, ideal time = {N_CPU} x the single-task time measured right before / 2; "
        f"{N_IO} x {IO_S * 1000:g} ms sleeps on {IO_THREADS} slots, ideal {N_IO * IO_S / IO_THREADS:g} s. "
        f"Each ran {spec.repeat} time(s) (median (min-max) where more than one)."
    )
    extra.append(
        f"Load average (1 min) at the start {load0:.1f}, at the end {os.getloadavg()[0]:.1f}, on "
        f"{os.cpu_count()} cores; whole run {time.monotonic() - started:.0f} s. Compare rows of "
        "one run only."
    )
    over = [table.title(r) for r in results if any(v > 1 for v in r.cpu)]
    if over:
        extra.append(
            f"cpu efficiency above 1 ({', '.join(over)}): the single-task time taken right before "
            "the run was slowed by other load more than the run itself; the ideal is only as good "
            "as the machine is quiet."
        )
    if args.note:
        extra.append(args.note)
    env = report.environment()
    heading = table.Heading(
        "make bench-peers",
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        f"{env['cores']} cores ({env['cpu']}), {env['os']}",
        env["python"],
    )
    text = table.section(results, heading, extra)
    print(text)
    if not args.no_write:
        report.write(args.out, text, table.BEGIN, table.END)
        say(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
