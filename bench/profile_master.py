"""``python -m bench.profile_master``: the master's CPU cost per task, in-process.

Drives a real ``Master`` (real journal, real sockets, no peers) through its
message handlers: a client submits no-op tasks, a registered fake worker gets
them dispatched and reports them done, each step followed by the loop's
commit and flush. Nothing waits on other processes, so the figures are the
master's own CPU time, free of the scheduling noise of a shared machine.
Prints microseconds per task and the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from poolfleet.common import codec, messages
from poolfleet.common.ids import new_task_id
from poolfleet.common.protocol import PROTOCOL_VERSION, MsgKind
from poolfleet.master.client_api import MAX_SUBMIT_TASKS
from poolfleet.master.server import Master
from poolfleet.master.settings import MasterSettings

CLIENT = b"\x00client-1"
WORKER = b"bench-worker"
NOOP = "poolfleet.worker.builtins:noop"
PAYLOAD = codec.pack_call((), {})


def frames(kind: MsgKind, body: dict[str, Any]) -> list[bytes]:
    return messages.encode(kind, body)


def turn(m: Master) -> None:
    """The tail of one loop turn: dispatch, commit, send."""
    now = m.clock()
    wall = m.wall()
    m.core.tick(now, wall)
    m._send_all(m.core.take_out())
    m._commit(now, wall)


def run(m: Master, tasks: int, batch: int, req: list[int]) -> None:
    """Submit ``tasks`` in SUBMIT messages of ``batch``; complete them as a worker would."""
    left = tasks
    while left:
        n = min(batch, left)
        left -= n
        req[0] += 1
        entries = [{"id": new_task_id(), "name": NOOP, "payload": PAYLOAD} for _ in range(n)]
        m._on_client_frames(CLIENT, frames(MsgKind.SUBMIT, {"req": req[0], "tasks": entries, "wait": True}))
        turn(m)
        info = m.registry.workers[WORKER]
        while info.inflight:
            results = [
                {
                    "id": tid,
                    "attempt": m.tasks[tid].attempt,
                    "state": "SUCCEEDED",
                    "value": b"\xc0",
                    "duration_ms": 0.01,
                }
                for tid in list(info.inflight)
            ]
            for i in range(0, len(results), 2000):
                body = {"results": results[i : i + 2000], "held": {}}
                m._on_worker_frames(WORKER, frames(MsgKind.TASK_RESULTS, body))
            turn(m)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_master", description=__doc__)
    ap.add_argument("--tasks", type=int, default=50_000)
    ap.add_argument(
        "--batch", type=int, default=MAX_SUBMIT_TASKS, help="tasks per SUBMIT message (1 = round trips)"
    )
    ap.add_argument("--prefetch", type=int, default=1000)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-profile", action="store_true", help="time only")
    args = ap.parse_args()
    if not 1 <= args.batch <= MAX_SUBMIT_TASKS:
        ap.error(f"--batch must be between 1 and {MAX_SUBMIT_TASKS} (the master's limit per SUBMIT)")
    tmp = Path(tempfile.mkdtemp(prefix="poolfleet-mprof-"))
    settings = MasterSettings(
        clients="tcp://127.0.0.1:0", workers="tcp://127.0.0.1:0", data_dir=tmp, prefetch=args.prefetch
    )
    m = Master(settings)
    m.recover()
    hello = {
        "version": PROTOCOL_VERSION,
        "role": "worker",
        "worker_id": "bench",
        "slots": {"cpu": 2, "io": 50},
        "queues": ["default"],
    }
    m._on_worker_frames(WORKER, frames(MsgKind.HELLO, hello))
    m._on_client_frames(CLIENT, frames(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "client"}))
    req = [0]
    run(m, min(args.tasks, 2000), args.batch, req)  # warm up
    prof = cProfile.Profile() if not args.no_profile else None
    c0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    run(m, args.tasks, args.batch, req)
    if prof:
        prof.disable()
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    print(
        f"{args.tasks} tasks in batches of {args.batch}: {cpu / args.tasks * 1e6:.1f} us CPU per task "
        f"({wall / args.tasks * 1e6:.1f} us wall){' under cProfile' if prof else ''}"
    )
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:20000])
    m.client_sock.close(linger=0)
    m.worker_sock.close(linger=0)
    m.ctx.destroy(linger=0)  # every socket of the master, its metrics one too
    m.journal.close()
    for p in tmp.iterdir():
        os.unlink(p)
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
