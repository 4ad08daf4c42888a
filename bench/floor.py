"""The transport floor of a round trip, measured on this machine in the same run.

A poolfleet round trip crosses four ZeroMQ hops between three processes
(client -> master -> worker -> master -> client). Here a relay process and an
echo process do only that, with no Python work in between beyond moving
frames, so the figure is what the machine's scheduler and loopback TCP allow
before poolfleet does anything.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import zmq

from bench.stats import percentile


def _echo(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"ready")
    while True:
        msg = sock.recv_multipart()
        if msg == [b"stop"]:
            return
        sock.send_multipart(msg)


def _relay(port_q: Any) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    fport = front.bind_to_random_port("tcp://127.0.0.1")
    bport = back.bind_to_random_port("tcp://127.0.0.1")
    port_q.put((fport, bport))
    echo_id = back.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            frames = sock.recv_multipart()
            if sock is front:
                back.send_multipart([echo_id, *frames])
                if frames[1:] == [b"stop"]:
                    return
            else:
                front.send_multipart(frames[1:])


def round_trips(n: int) -> list[float]:
    """Milliseconds of ``n`` sequential 4-hop round trips through a relay and an echo process."""
    mp = multiprocessing.get_context("spawn")
    q: Any = mp.Queue()
    relay = mp.Process(target=_relay, args=(q,), daemon=True)
    relay.start()
    fport, bport = q.get(timeout=60)
    echo = mp.Process(target=_echo, args=(f"tcp://127.0.0.1:{bport}",), daemon=True)
    echo.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{fport}")
    try:
        for _ in range(50):  # warm up
            sock.send_multipart([b"x" * 64])
            sock.recv_multipart()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send_multipart([b"x" * 64])
            sock.recv_multipart()
            out.append((time.perf_counter() - t0) * 1000)
        sock.send_multipart([b"stop"])
        return out
    finally:
        sock.close(linger=100)
        ctx.term()
        relay.join(5)
        echo.join(5)
        for p in (relay, echo):
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    rt = round_trips(300)
    print(f"4-hop transport round trip: p50 {percentile(rt, 50):.3f} ms, p99 {percentile(rt, 99):.3f} ms")
