"""The heartbeat interval is the master's to set, also after the WELCOME: a real pworker
beats at what the master's HEARTBEAT tells it (a master whose fleet grew asks every worker
for fewer beats), and a real master tells a fleet too big for its configured interval a
longer one."""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack
import zmq
from pfharness import Cluster, wait_for

from poolfleet.client import Client
from poolfleet.common.protocol import MAGIC, PROTOCOL_VERSION, MsgKind


def _send(router: zmq.Socket[bytes], ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
    router.send_multipart([ident, MAGIC, bytes([kind]), msgpack.packb(body)])


def test_a_worker_beats_at_the_interval_the_masters_heartbeat_tells(make_cluster: type[Cluster]) -> None:
    """A stand-in master welcomes a pworker with 0.1 s, answers each of its heartbeats, and after
    a few tells it 0.8 s in a HEARTBEAT: the worker's beats come that far apart from then on."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    # the cluster's teardown stops the worker
    worker = make_cluster().start_worker(master=f"tcp://127.0.0.1:{port}", wait=False, cpu=1, io=1)
    try:
        router.setsockopt(zmq.RCVTIMEO, 20000)
        ident, _magic, kind, _body = router.recv_multipart()
        assert kind[0] == MsgKind.HELLO
        welcome = {
            "version": PROTOCOL_VERSION,
            "master_id": "m-test",
            "heartbeat_interval_s": 0.1,
            "liveness": 3,
        }
        _send(router, ident, MsgKind.WELCOME, welcome)
        beats: list[float] = []  # when each HEARTBEAT arrived
        told_at = None
        while len(beats) < 12:
            frames = router.recv_multipart()
            if frames[2][0] != MsgKind.HEARTBEAT:
                continue
            beats.append(time.monotonic())
            body: dict[str, Any] = {"master_id": "m-test"}
            if len(beats) == 6:
                body["heartbeat_interval_s"] = 0.8
                told_at = len(beats)
            _send(router, ident, MsgKind.HEARTBEAT, body)
        assert told_at is not None
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        before, after = gaps[: told_at - 1], gaps[told_at:]
        assert min(before) < 0.5, f"the worker did not beat at the WELCOME's 0.1 s first: {before}"
        assert min(after) >= 0.6, f"the worker did not take the HEARTBEAT's 0.8 s: {after}"
        assert worker.alive(), worker.log_tail()
    finally:
        router.close()
        ctx.term()


def test_a_fleet_over_the_heartbeat_bound_is_told_a_longer_interval(make_cluster: type[Cluster]) -> None:
    """Three workers, at most five beats a second at the harness's 0.2 s (one worker per
    interval): each is told 0.6 s (the master lists what it told each), beats at that (silent
    for longer than 0.2 s between beats), and none is expired for it."""
    c = make_cluster()
    assert c.heartbeat_s == 0.2
    master = c.start_master("--max-heartbeats-per-s", "5")
    for i in range(3):
        c.start_worker(name=f"hb-{i}", cpu=1, io=1)
    with Client(c.client_endpoint) as cl:

        def told() -> list[dict[str, Any]] | None:
            workers = cl.workers()
            intervals = [round(w["heartbeat_interval_s"], 6) for w in workers]
            return workers if intervals == [0.6, 0.6, 0.6] else None

        first = wait_for(told, what="every worker told 0.6 s")
        ids = {w["worker_id"] for w in first}
        assert ids == {"hb-0", "hb-1", "hb-2"}
        wait_for(
            lambda: any(w["last_heartbeat_s"] > 0.3 for w in cl.workers()),
            what="a worker silent for longer than the configured interval",
        )
        later = wait_for(told, what="the workers still registered, told 0.6 s")
        assert {w["worker_id"] for w in later} == ids
    assert not master.events("worker_expired")
