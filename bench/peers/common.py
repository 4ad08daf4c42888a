"""What every peer's run shares: the spec it is given, the workloads' measurement, the result file.

A peer module (``python -m bench.peers.ray_peer --spec JSON --out FILE``) runs in the peers'
own environment (.venv-peers), which has no poolfleet: this module and what it imports use
the standard library only. The peer gives a ``Driver`` (set up on enter, torn down on exit);
``run_peer`` measures the workloads of ``make bench`` through it, as bench/fleet.py does for
poolfleet, and writes the figures as JSON for ``python -m bench.peers`` to put in its table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.calibrate import single_task_ms
from bench.stats import percentile

LIMIT_S = 180.0


@dataclass(frozen=True)
class Spec:
    """The workloads, as ``make bench`` runs them, and where the peer's services are."""

    n_noop: int
    n_rtt: int
    n_cpu: int
    loops: int
    n_io: int
    io_s: float
    io_slots: int
    cpu_slots: int = 2
    repeat: int = 1
    redis_url: str = ""


@dataclass
class PeerResult:
    """Figures of one peer: lists of one value per repeat; ``skipped`` maps a workload to why."""

    system: str
    setup: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    noop: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    io: list[float] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Driver(Protocol):
    """One peer, set up by ``__enter__`` and stopped by ``__exit__``.

    Each batch method submits its tasks at once and returns the seconds until every result is
    back; ``io_batch`` returns None where the peer cannot run the io workload (the reason is in
    ``skipped``).
    """

    system: str
    setup: str
    skipped: dict[str, str]

    def __enter__(self) -> Driver: ...
    def __exit__(self, *exc: object) -> None: ...
    def versions(self) -> dict[str, str]: ...
    def warm_up(self) -> None: ...
    def noop_batch(self, n: int) -> float: ...
    def one_trip(self) -> None: ...
    def cpu_batch(self, n: int, loops: int) -> float: ...
    def io_batch(self, n: int, seconds: float) -> float | None: ...


def timed(run: Callable[[], object]) -> float:
    """Seconds that ``run()`` takes."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def measure(driver: Driver, spec: Spec) -> PeerResult:
    """The four workloads through ``driver``, ``spec.repeat`` times."""
    res = PeerResult(driver.system, driver.setup, {"python": platform.python_version(), **driver.versions()})
    driver.warm_up()
    for _ in range(spec.repeat):
        gc.collect()  # as bench does before each throughput run
        res.noop.append(spec.n_noop / driver.noop_batch(spec.n_noop))
        trips = []
        for _ in range(spec.n_rtt):
            trips.append(timed(driver.one_trip) * 1000)
        res.p50.append(percentile(trips, 50))
        res.p99.append(percentile(trips, 99))
        # the ideal, as in bench: the single-task time measured alone right before the run
        t1 = single_task_ms(spec.loops)
        res.cpu.append(spec.n_cpu * t1 / 1000 / spec.cpu_slots / driver.cpu_batch(spec.n_cpu, spec.loops))
        io = driver.io_batch(spec.n_io, spec.io_s)
        if io is not None:
            res.io.append(spec.n_io * spec.io_s / spec.io_slots / io)
    res.skipped.update(driver.skipped)
    return res


def run_peer(make: Callable[[Spec], Driver], argv: list[str] | None = None) -> int:
    """Entry point of a peer module: ``--spec JSON --out FILE``; the result (or the error) as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True, help="the Spec as JSON")
    ap.add_argument("--out", required=True, type=Path, help="where to write the result JSON")
    args = ap.parse_args(argv)
    spec = Spec(**json.loads(args.spec))
    # stopped from outside (python -m bench.peers on a timeout or its own SIGTERM): leave through
    # the driver's __exit__, which stops the worker processes and servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with make(spec) as driver:
            result: dict[str, Any] = asdict(measure(driver, spec))
    except Exception as exc:  # noqa: BLE001 - whatever stopped the peer is its row's reason
        traceback.print_exc()
        args.out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    args.out.write_text(json.dumps(result))
    return 0


def wait_until(what: str, ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll ``ready()`` until it holds, or raise after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout_s:g} s")
        time.sleep(0.05)


def say(msg: str) -> None:
    print(f"[bench-peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
