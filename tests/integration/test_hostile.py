"""Hostile input at full speed: 100,000 random and mutated frames at each master socket
and at a worker while real tasks run. The daemons keep serving, their memory stays
bounded, and well-framed bad requests get an ERROR naming the problem.

The seed is printed; rerun a failure with PF_FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pf_testtasks
import pytest
import zmq
from pfharness import Cluster, Proc
from pfpeers import FakeMaster, RawPeer, dispatch_entry, frame_stream, rss_kb

from poolfleet.client import Client
from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import PROTOCOL_VERSION, ErrorCode, MsgKind

FRAMES = 100_000
SYNC_EVERY = 5_000
#: RSS growth allowed over a whole fuzz run: generous (a few MB are seen), yet a leak of
#: 160 bytes per frame over the master's 200,000 frames would exceed it.
MAX_GROWTH_KB = 32 * 1024
SEED = int(os.environ.get("PF_FUZZ_SEED", "0")) or random.randrange(1, 2**32)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def _tid() -> bytes:
    return os.urandom(16)


def client_seeds() -> list[list[bytes]]:
    payload = codec.pack_call([1, 2], {})
    task = {"id": _tid(), "name": "pf_testtasks:add", "payload": payload, "queue": "fuzz", "kind": "cpu"}
    bodies: list[tuple[MsgKind, dict[str, Any]]] = [
        (MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "client"}),
        (MsgKind.HEARTBEAT, {}),
        (MsgKind.SUBMIT, {"req": 1, "tasks": [task], "wait": True}),
        (MsgKind.SUBMIT, {"req": 2, "tasks": [dict(task, id=_tid(), timeout_s=1.5, retries=1)] * 3}),
        (MsgKind.RESULT_GET, {"req": 3, "ids": [_tid(), _tid()], "wait": True}),
        (MsgKind.CANCEL, {"req": 4, "ids": [_tid()]}),
        (MsgKind.STATUS, {"req": 5}),
        (MsgKind.WORKERS, {"req": 6}),
    ]
    return [messages.encode(k, b) for k, b in bodies]


def worker_seeds() -> list[list[bytes]]:
    ref = {"id": _tid(), "attempt": 1}
    result = {"id": _tid(), "attempt": 1, "state": "SUCCEEDED", "value": codec.pack(3), "duration_ms": 1.5}
    bodies: list[tuple[MsgKind, dict[str, Any]]] = [
        (
            MsgKind.HELLO,
            {"version": PROTOCOL_VERSION, "role": "worker", "worker_id": "fuzz", "holding": [ref]},
        ),
        (MsgKind.HEARTBEAT, {"held": {"io": 1}}),
        (MsgKind.TASK_RESULTS, {"results": [result], "held": {}}),
        (
            MsgKind.TASK_RESULTS,
            {"results": [dict(result, state="FAILED", error={"message": "x"}, lost=True)]},
        ),
        (MsgKind.RETURN, {"tasks": [ref]}),
        (MsgKind.DRAINING, {}),
        (MsgKind.BYE, {"holding": [ref]}),
    ]
    return [messages.encode(k, b) for k, b in bodies]


def master_seeds() -> list[list[bytes]]:
    task = dispatch_entry("pf_testtasks:add", 1, 2, kind="io")
    bodies: list[tuple[MsgKind, dict[str, Any]]] = [
        (MsgKind.WELCOME, {"version": PROTOCOL_VERSION, "master_id": "fake-master"}),
        (
            MsgKind.WELCOME,
            {"version": PROTOCOL_VERSION, "master_id": "m", "heartbeat_interval_s": 0.5, "liveness": 3},
        ),
        (MsgKind.HEARTBEAT, {"master_id": "fake-master"}),
        (MsgKind.DISPATCH, {"tasks": [task, dict(task, id=_tid(), name="poolfleet.worker.builtins:noop")]}),
        (MsgKind.CANCEL_TASKS, {"tasks": [{"id": _tid(), "attempt": 1}]}),
        (MsgKind.ERROR, {"code": "not_registered", "message": "who are you"}),
        (MsgKind.ERROR, {"code": "bad_request", "message": "x", "req": 3}),
    ]
    return [messages.encode(k, b) for k, b in bodies]


def _decoded(frames: list[bytes]) -> tuple[MsgKind, dict[str, Any]] | None:
    try:
        return messages.decode(frames)
    except ProtocolError:
        return None


def safe_on_worker_socket(frames: list[bytes]) -> bool:
    """No fuzz frame may register a worker with slots: it would take the real tasks away."""
    got = _decoded(frames)
    if got is None or got[0] is not MsgKind.HELLO:
        return True
    slots = got[1].get("slots")
    return not (isinstance(slots, dict) and any(isinstance(n, int) and n > 0 for n in slots.values()))


def safe_for_worker(frames: list[bytes]) -> bool:
    """Veto the well-formed orders a worker obeys on purpose: exit (a master of another
    protocol version) and reconnect (the master is shutting down)."""
    got = _decoded(frames)
    if got is None:
        return True
    kind, body = got
    if kind is MsgKind.ERROR:
        return body["code"] not in (ErrorCode.BAD_VERSION, ErrorCode.SHUTTING_DOWN)
    return not (kind is MsgKind.WELCOME and body["version"] != PROTOCOL_VERSION)


def flood(
    send: Callable[[list[bytes]], bool],
    frames: Iterator[list[bytes]],
    count: int,
    pump: Callable[[], None],
    sync: Callable[[int], None],
    midway: Callable[[], None],
) -> int:
    """Send ``count`` frames without blocking, in rounds of SYNC_EVERY.

    After each round ``sync`` waits until the daemon has handled everything sent so far,
    so the memory measured afterwards is what the daemon kept, not a queue in flight.
    """
    sent = 0
    while sent < count:
        for _ in range(min(SYNC_EVERY, count - sent)):
            msg = next(frames)
            while not send(msg):
                pump()
            sent += 1
            if sent == count // 2:
                midway()
        pump()
        sync(sent)
    return sent


def collect_until(
    peer: RawPeer, replies: list[list[bytes]], kind: MsgKind, key: str, value: Any, timeout: float = 60
) -> bool:
    """Keep every message until the one of ``kind`` whose body has ``key`` == ``value``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = peer.drain()
        replies += batch
        for f in batch:
            if len(f) == 3 and f[1] == bytes([kind]) and codec.unpack(f[2]).get(key) == value:
                return True
        peer.sock.poll(100)
    return False


def client_probe(n: int) -> tuple[MsgKind, dict[str, Any], MsgKind, str, Any]:
    """A request whose answer names it: STATUS with a request number of its own."""
    req = 10**12 + n
    return MsgKind.STATUS, {"req": req}, MsgKind.STATUS_REPLY, "req", req


def worker_probe(n: int) -> tuple[MsgKind, dict[str, Any], MsgKind, str, Any]:
    """On the worker socket: a HELLO whose refusal quotes the bad slots key."""
    key = f"probe-{n}"
    body = {"version": PROTOCOL_VERSION, "role": "worker", "slots": {key: 1}}
    return MsgKind.HELLO, body, MsgKind.ERROR, "message", f"HELLO: bad slots entry {key!r}"


def raw_tcp_garbage(endpoint: str, rng: random.Random, connections: int = 50) -> None:
    """Bytes that are not even ZMTP."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    for _ in range(connections):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(rng.randbytes(rng.randrange(1, 2000)))
            except OSError:
                pass  # the daemon hung up on us: fine


def assert_bounded(proc: Proc, before_kb: int) -> int:
    grown = rss_kb(proc.pid) - before_kb
    assert grown < MAX_GROWTH_KB, f"{proc.name} grew by {grown} kB"
    return grown


def test_master_sockets_survive_fuzzing(make_cluster: type[Cluster], ctx: Any) -> None:
    rng = random.Random(SEED)
    c = make_cluster(heartbeat_s=0.5)
    master = c.start_master("--max-queue-length", "2000")
    worker = c.start_worker(name="wf", cpu=1, io=4)
    with Client(c.client_endpoint) as cl:
        assert [f.result(30) for f in [cl.submit(pf_testtasks.add, i, 1) for i in range(50)]] == list(
            range(1, 51)
        )
        rss_before = rss_kb(master.pid)
        before = [cl.submit(pf_testtasks.add, i, 1000) for i in range(20)]
        before += [cl.submit(pf_testtasks.io_sleep, 0.2) for _ in range(4)]
        during: list[Any] = []
        raw_tcp_garbage(c.client_endpoint, rng)
        raw_tcp_garbage(c.worker_endpoint, rng)
        for endpoint, seeds, safe, probe in (
            (c.client_endpoint, client_seeds(), None, client_probe),
            (c.worker_endpoint, worker_seeds(), safe_on_worker_socket, worker_probe),
        ):
            peer = RawPeer(ctx, endpoint)
            replies: list[list[bytes]] = []

            def sync(n: int, p: RawPeer = peer, r: list[list[bytes]] = replies, probe: Any = probe) -> None:
                # the master answers this peer's probe only after everything it sent before
                kind, body, answer, key, value = probe(n)
                p.send(kind, body)
                assert collect_until(p, r, answer, key, value), f"no answer to probe {n} on {p}"

            try:
                start = time.monotonic()
                sent = flood(
                    peer.send_frames,
                    frame_stream(rng, seeds, safe),
                    FRAMES,
                    lambda p=peer, r=replies: r.extend(p.drain()),  # type: ignore[misc]
                    sync,
                    lambda: during.extend(cl.submit(pf_testtasks.add, i, 2000) for i in range(20)),
                )
                elapsed = time.monotonic() - start
            finally:
                peer.close()
            errors = [codec.unpack(f[2]) for f in replies if len(f) == 3 and f[1] == bytes([MsgKind.ERROR])]
            assert sent == FRAMES
            assert len(errors) > FRAMES // 2, f"only {len(errors)} error replies"
            assert {e["code"] for e in errors} >= {"bad_frame", "bad_request"}
            assert all(e["message"] for e in errors)
            print(f"{endpoint}: {sent} frames in {elapsed:.1f} s, {len(errors)} error replies, seed {SEED}")
        after = [cl.submit(pf_testtasks.add, i, 3000) for i in range(20)]
        assert [f.result(60) for f in before[:20]] == [i + 1000 for i in range(20)]
        assert [f.result(60) for f in before[20:]] == ["slept 0.2"] * 4
        assert [f.result(60) for f in during] == [i + 2000 for i in range(20)] * 2  # one batch per socket
        assert [f.result(60) for f in after] == [i + 3000 for i in range(20)]
    assert master.alive() and worker.alive()
    grown = assert_bounded(master, rss_before)
    print(f"master RSS grew by {grown} kB")
    assert "Traceback" not in master.log_path.read_text()


def test_worker_survives_a_hostile_master(make_cluster: type[Cluster], ctx: Any) -> None:
    rng = random.Random(SEED + 1)
    c = make_cluster(heartbeat_s=0.5)
    fake = FakeMaster(ctx)
    try:
        worker = c.start_worker(master=fake.endpoint, wait=False, cpu=1, io=4, name="wh")
        fake.wait_worker()
        warm = [
            dispatch_entry("pf_testtasks:add", i, 1, kind=k)
            for i, k in zip(range(40), ["io", "cpu"] * 20, strict=True)
        ]
        fake.dispatch(warm)
        fake.wait_results([t["id"] for t in warm])
        rss_before = rss_kb(worker.pid)
        before = [dispatch_entry("pf_testtasks:io_sleep", 0.3) for _ in range(4)]
        before += [dispatch_entry("pf_testtasks:add", i, 1000, kind="cpu") for i in range(10)]
        fake.dispatch(before)
        during = [dispatch_entry("pf_testtasks:add", i, 2000) for i in range(10)]

        def sync(n: int) -> None:
            # the worker handles its master's messages in order: this result means it got through
            probe = dispatch_entry("poolfleet.worker.builtins:echo", n)
            fake.dispatch([probe])
            assert codec.unpack(fake.wait_results([probe["id"]])[probe["id"]]["value"]) == n

        start = time.monotonic()
        sent = flood(
            fake.send_frames,
            frame_stream(rng, master_seeds(), safe_for_worker),
            FRAMES,
            fake.pump,
            sync,
            lambda: fake.dispatch(during),
        )
        elapsed = time.monotonic() - start
        after = [dispatch_entry("pf_testtasks:add", i, 3000, kind="cpu") for i in range(10)]
        fake.dispatch(after)
        got = fake.wait_results([t["id"] for t in before + during + after], timeout=60)
        for t in before + during + after:
            assert got[t["id"]]["state"] == "SUCCEEDED", got[t["id"]]
        assert [codec.unpack(got[t["id"]]["value"]) for t in after] == [i + 3000 for i in range(10)]
        assert sent == FRAMES
        print(f"worker: {sent} frames in {elapsed:.1f} s, seed {SEED + 1}")
        assert worker.alive()
        grown = assert_bounded(worker, rss_before)
        print(f"worker RSS grew by {grown} kB")
        assert len(worker.events("frame_rejected")) > FRAMES // 10
        assert "Traceback" not in worker.log_path.read_text()
    finally:
        fake.close()


@pytest.mark.parametrize(
    ("kind", "body", "code", "names"),
    [
        (MsgKind.SUBMIT, {"req": 11, "tasks": "add"}, "bad_request", "'tasks' has type str"),
        (MsgKind.SUBMIT, {"tasks": []}, "bad_request", "missing field 'req'"),
        (MsgKind.RESULT_GET, {"req": 12, "ids": [b"short"]}, "bad_request", "16-byte"),
        (MsgKind.CANCEL, {"req": 13, "ids": ["not bytes"]}, "bad_request", "16-byte"),
        (MsgKind.STATUS, {"req": True}, "bad_request", "'req' has wrong type"),
        (MsgKind.DISPATCH, {"req": 14, "tasks": []}, "bad_request", "DISPATCH is not a client request"),
        (MsgKind.HELLO, {"req": 15, "version": 99, "role": "client"}, "bad_version", "protocol 99"),
    ],
)
def test_well_framed_bad_requests_get_an_error_naming_the_problem(
    cluster: Cluster, ctx: Any, kind: MsgKind, body: dict[str, Any], code: str, names: str
) -> None:
    peer = RawPeer(ctx, cluster.client_endpoint)
    try:
        peer.send(kind, body)
        reply = peer.recv_until(MsgKind.ERROR)
        assert reply is not None, "no ERROR reply"
        assert reply["code"] == code and names in reply["message"], reply
        if "req" in body and not isinstance(body["req"], bool) and code == "bad_request":
            assert reply["req"] == body["req"]
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("kind", "body", "names"),
    [
        (
            MsgKind.TASK_RESULTS,
            {"results": [{"id": b"x" * 16, "attempt": "1", "state": "FAILED"}]},
            "'attempt'",
        ),
        (MsgKind.HELLO, {"version": 1, "role": "client"}, "role 'worker'"),
        (MsgKind.HELLO, {"version": 1, "role": "worker", "slots": {"gpu": 1}}, "bad slots entry 'gpu'"),
        (MsgKind.HEARTBEAT, {}, "send HELLO first"),
    ],
)
def test_bad_worker_messages_get_an_error_naming_the_problem(
    cluster: Cluster, ctx: Any, kind: MsgKind, body: dict[str, Any], names: str
) -> None:
    peer = RawPeer(ctx, cluster.worker_endpoint)
    try:
        if kind is MsgKind.TASK_RESULTS:
            peer.send(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "worker", "worker_id": "rogue"})
            assert peer.recv_until(MsgKind.WELCOME) is not None
        peer.send(kind, body)
        reply = peer.recv_until(MsgKind.ERROR)
        assert reply is not None and names in reply["message"], reply
    finally:
        peer.close()
    # a worker may report values the journal cannot hold as integers: the master keeps going
    with Client(cluster.client_endpoint) as cl:
        assert cl.submit(pf_testtasks.add, 1, 1).result(30) == 2


def test_numbers_too_big_for_the_journal_do_not_stop_the_master(
    make_cluster: type[Cluster], ctx: Any
) -> None:
    """msgpack carries unsigned 64-bit integers; SQLite stores signed ones. Such numbers
    from a client or a worker must be refused or converted, never crash the commit."""
    huge = 2**64 - 1
    c = make_cluster()
    master = c.start_master()
    w = RawPeer(ctx, c.worker_endpoint, identity=b"raw-worker")
    cl = RawPeer(ctx, c.client_endpoint)
    try:
        w.send(
            MsgKind.HELLO,
            {
                "version": PROTOCOL_VERSION,
                "role": "worker",
                "slots": {"io": 1},
                "tasks": {
                    "x:y": {"kind": "cpu", "retries": huge, "timeout_s": huge},
                    "poolfleet.worker.builtins:echo": {"kind": "io"},
                },
            },
        )
        assert w.recv_until(MsgKind.WELCOME) is not None
        task = {"id": _tid(), "name": "poolfleet.worker.builtins:echo", "payload": codec.pack_call([7], {})}
        big = dict(task, timeout_s=huge)
        inf = dict(task, id=_tid(), timeout_s=1e400)
        kind, body = cl.request(MsgKind.SUBMIT, {"req": 1, "tasks": [big, inf], "wait": True})
        assert kind is MsgKind.SUBMITTED and body["accepted"] == [big["id"]], body
        assert "finite" in body["rejected"][0]["message"]
        # the raw worker gets the task and reports it with an absurd duration
        dispatch = w.recv_until(MsgKind.DISPATCH)
        assert dispatch is not None
        (entry,) = dispatch["tasks"]
        assert entry["id"] == big["id"] and entry["timeout_s"] == float(huge)
        result = {
            "id": entry["id"],
            "attempt": entry["attempt"],
            "state": "SUCCEEDED",
            "value": codec.pack(7),
        }
        w.send(MsgKind.TASK_RESULTS, {"results": [dict(result, duration_ms=huge)]})
        pushed = cl.recv_until(MsgKind.RESULTS)
        assert pushed is not None and pushed["results"][0]["state"] == "SUCCEEDED"
        kind, _ = cl.request(MsgKind.STATUS, {"req": 2})
        assert kind is MsgKind.STATUS_REPLY
    finally:
        w.close()
        cl.close()
    assert master.alive()
    c.start_worker(name="wn")
    with Client(c.client_endpoint) as client:
        assert client.submit(pf_testtasks.add, 5, 5).result(30) == 10
    master.signal(15)
    assert master.wait(30) == 0  # and the journal still commits and closes cleanly


def test_worker_ignores_malformed_orders(make_cluster: type[Cluster], ctx: Any) -> None:
    c = make_cluster()
    fake = FakeMaster(ctx)
    try:
        worker = c.start_worker(master=fake.endpoint, wait=False, cpu=1, io=1, name="wc")
        fake.wait_worker()
        for attempt in ("1", 1.5e300, float("nan"), [1], {"a": 1}, -1):
            fake.send(
                MsgKind.CANCEL_TASKS, {"tasks": [{"id": _tid(), "attempt": attempt}, "junk", {"id": 5}]}
            )
        for interval in (float("inf"), 1e300, 2**64 - 1, float("nan"), -1, 0, 1e-9):
            fake.send(
                MsgKind.WELCOME,
                {
                    "version": PROTOCOL_VERSION,
                    "master_id": "m",
                    "heartbeat_interval_s": interval,
                    "liveness": 2**63,
                },
            )
        fake.wait_heard(fake.received)  # the worker's live connection, after all of that
        t = dispatch_entry("pf_testtasks:add", 2, 2)
        fake.dispatch([t])
        assert codec.unpack(fake.wait_results([t["id"]])[t["id"]]["value"]) == 4
        assert worker.alive()
    finally:
        fake.close()
