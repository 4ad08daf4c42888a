"""``python -m bench.profile_client``: the Python client's CPU cost per task.

A stand-in master in a child process answers every SUBMIT at once and pushes a
result for each task, so the client's own cost (ids, payloads, futures,
encoding, the connection thread, result delivery) is measured alone. Prints
microseconds of client CPU per task for ``submit_many`` and for
``Pool.apply_async`` per task.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from typing import Any

import zmq

from poolfleet.common import messages
from poolfleet.common.protocol import PROTOCOL_VERSION, MsgKind


def fake_master(port_q: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    while True:
        ident, *frames = sock.recv_multipart()
        kind, body = messages.decode(frames)
        if kind is MsgKind.HELLO:
            reply = {"version": PROTOCOL_VERSION, "master_id": "fake"}
            sock.send_multipart([ident, *messages.encode(MsgKind.WELCOME, reply)])
        elif kind is MsgKind.SUBMIT:
            ids = [t["id"] for t in body["tasks"]]
            ack = {"req": body["req"], "accepted": ids, "rejected": []}
            sock.send_multipart([ident, *messages.encode(MsgKind.SUBMITTED, ack)])
            results = [
                {"id": i, "state": "SUCCEEDED", "attempt": 1, "name": "x", "value": b"\xc0"} for i in ids
            ]
            sock.send_multipart([ident, *messages.encode(MsgKind.RESULTS, {"results": results})])
        elif kind is MsgKind.STATUS:
            sock.send_multipart([ident, *messages.encode(MsgKind.STATUS_REPLY, {"req": body["req"]})])


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_client", description=__doc__)
    ap.add_argument("--tasks", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    from poolfleet.client import Client, Pool

    q: Any = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=fake_master, args=(q,), daemon=True)
    proc.start()
    endpoint = f"tcp://127.0.0.1:{q.get(timeout=30)}"
    noop = "poolfleet.worker.builtins:noop"
    with Client(endpoint) as client:
        client.status()
        pool = Pool(client=client)
        for label, run in (
            ("submit_many", lambda: [f.result() for f in client.submit_many(noop, [((), {})] * args.tasks)]),
            (
                "Pool.apply_async",
                lambda: [r.get() for r in [pool.apply_async(noop) for _ in range(args.tasks)]],
            ),
        ):
            run()
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.rounds):
                run()
            n = args.tasks * args.rounds
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            print(f"{label}: {cpu / n * 1e6:.1f} us client CPU per task ({n / wall:,.0f} tasks/s)")
    proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
