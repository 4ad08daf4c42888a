"""``python -m bench.trace``: where the time of one round trip goes, hop by hop.

Starts a master and a worker like the benchmark, with every message send and
receive time-stamped (CLOCK_MONOTONIC, shared by all processes of the host)
in the client, the master and the worker, runs sequential no-op round trips
and prints the median and 90th percentile of each leg:

    caller -> connection thread has sent SUBMIT -> master has read it
    -> master starts sending DISPATCH -> worker has read it
    -> worker starts sending TASK_RESULTS -> master has read it
    -> master starts sending RESULTS -> client has read it -> caller has the value

The daemons get the time stamps from a ``sitecustomize`` module put first on
their ``PYTHONPATH`` (it wraps ``poolfleet.common.net.send_frames`` and
``zmq.Socket.recv_multipart``, and writes its records on SIGUSR1); nothing of
it is in the product. A send is
stamped before and after the call, so a leg that starts with a send includes
the send's own cost.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HOOK = textwrap.dedent(
    """
    import atexit, os, signal, time
    if os.environ.get("PF_TRACE_DIR"):
        import zmq
        import poolfleet.common.net as _net
        _ev = []
        _ns = time.monotonic_ns
        _send, _recv = _net.send_frames, zmq.Socket.recv_multipart

        def send_frames(sock, frames, flags=0):
            kind = frames[-2][:1].hex()
            _ev.append((_ns(), "S", kind))
            _send(sock, frames, flags)
            _ev.append((_ns(), "s", kind))

        def recv_multipart(self, *a, **k):
            frames = _recv(self, *a, **k)
            _ev.append((_ns(), "R", bytes(frames[-2][:1]).hex() if len(frames) >= 2 else "?"))
            return frames

        _net.send_frames = send_frames
        zmq.Socket.recv_multipart = recv_multipart

        def dump():
            path = os.path.join(os.environ["PF_TRACE_DIR"], f"ev-{os.getpid()}.txt")
            try:
                with open(path, "w") as f:
                    f.writelines(f"{t} {k} {c}\\n" for t, k, c in _ev)
            except OSError:
                pass  # the tracer has finished and removed its directory

        atexit.register(dump)
        signal.signal(signal.SIGUSR1, lambda *_: dump())  # the tracer asks before it stops us
    """
)

# message kinds (common.protocol.MsgKind) as the hex of their kind byte
SUBMIT, RESULTS, DISPATCH, TASK_RESULTS = "0a", "15", "1e", "28"

LEGS = [
    "caller -> SUBMIT sent (client threads)",
    "SUBMIT on the wire (client -> master)",
    "master: SUBMIT read -> DISPATCH",
    "DISPATCH on the wire (master -> worker)",
    "worker: DISPATCH read -> TASK_RESULTS",
    "TASK_RESULTS on the wire (worker -> master)",
    "master: TASK_RESULTS read -> RESULTS",
    "RESULTS on the wire (master -> client)",
    "RESULTS read -> caller has the value",
]

Event = tuple[int, str, str]


def _first(events: list[Event], kind: str, code: str, lo: int, hi: int) -> int | None:
    for t, k, c in events:
        if t > hi:
            return None
        if t >= lo and k == kind and c == code:
            return t
    return None


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trace")
    ap.add_argument("--rtt", type=int, default=1000, help="round trips to trace (after 200 untraced)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="poolfleet-trace-"))
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
    os.environ["PF_TRACE_DIR"] = str(tmp)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tmp / "hook"), os.environ.get("PYTHONPATH", "")])
    # this process: the same hook, installed before the client modules bind send_frames
    spec = importlib.util.spec_from_file_location("pf_trace_hook", tmp / "hook" / "sitecustomize.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load the trace hook")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)

    from bench import fleet
    from bench.daemons import BenchCluster

    spans: list[tuple[int, int]] = []
    with BenchCluster() as cluster:
        w = cluster.add_worker()
        pids = {"master": cluster.master.pid, "worker": w.pid}
        with fleet.Client(cluster.client_endpoint) as client:
            fleet.warm_up(client)
            fleet.round_trips(client, 200)
            for _ in range(args.rtt):
                t0 = time.monotonic_ns()
                client.submit(fleet.NOOP).result(30)
                spans.append((t0, time.monotonic_ns()))
        for pid in pids.values():  # dump now: a stopping worker may be killed before its atexit
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all((tmp / f"ev-{p}.txt").exists() for p in pids.values()):
            time.sleep(0.05)
    hook.dump()
    events: dict[str, list[Event]] = {}
    for name, pid in {**pids, "client": os.getpid()}.items():
        path = tmp / f"ev-{pid}.txt"
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        events[name] = sorted((int(t), k, c) for t, k, c in rows)
    legs: list[list[float]] = [[] for _ in LEGS]
    for t0, t1 in spans:
        c, m, w_ = events["client"], events["master"], events["worker"]
        marks = [
            t0,
            _first(c, "s", SUBMIT, t0, t1),
            _first(m, "R", SUBMIT, t0, t1),
            _first(m, "S", DISPATCH, t0, t1),
            _first(w_, "R", DISPATCH, t0, t1),
            _first(w_, "S", TASK_RESULTS, t0, t1),
            _first(m, "R", TASK_RESULTS, t0, t1),
            _first(m, "S", RESULTS, t0, t1),
            _first(c, "R", RESULTS, t0, t1),
            t1,
        ]
        if any(x is None for x in marks):
            continue
        ts = [int(x) for x in marks if x is not None]
        for i in range(len(LEGS)):
            legs[i].append((ts[i + 1] - ts[i]) / 1000)
    n = len(legs[0])
    print(f"{n} of {len(spans)} round trips traced completely; microseconds")
    print(f"| {'leg':45} | {'p50':>7} | {'p90':>7} |")
    print(f"|{'-' * 47}|{'-' * 9}|{'-' * 9}|")
    for name, vals in zip(LEGS, legs, strict=True):
        vals.sort()
        print(f"| {name:45} | {statistics.median(vals):7.0f} | {vals[int(0.9 * (n - 1))]:7.0f} |")
    total = sorted(sum(col) for col in zip(*legs, strict=True))
    print(f"| {'round trip':45} | {statistics.median(total):7.0f} | {total[int(0.9 * (n - 1))]:7.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
