"""Hand-driven protocol peers for the security tests: raw sockets, a fake master,
a recording TCP relay, a frame mutator and a memory probe. Everything closes itself.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import MAGIC, PROTOCOL_VERSION, MsgKind


def rss_kb(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class RawPeer:
    """A DEALER socket speaking the wire protocol by hand (to the master, or as one)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, identity: bytes | None = None) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if identity:
            self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)

    def send(self, kind: MsgKind, body: dict[str, Any]) -> None:
        self.sock.send_multipart(messages.encode(kind, body))

    def send_frames(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self, timeout: float = 10.0) -> tuple[MsgKind, dict[str, Any]] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return messages.decode(self.sock.recv_multipart())

    def recv_until(
        self, kind: MsgKind, timeout: float = 10.0, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any] | None:
        """Skip other messages (heartbeats) until one of ``kind`` (matching ``where``) arrives."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is not None and got[0] is kind and (where is None or where(got[1])):
                return got[1]
        return None

    def request(
        self, kind: MsgKind, body: dict[str, Any], timeout: float = 10.0
    ) -> tuple[MsgKind, dict[str, Any]]:
        """Send, then wait for the reply (or ERROR) carrying the same ``req``; skip the rest."""
        self.send(kind, body)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.recv(left)
            if got is None:
                break
            if got[1].get("req") == body.get("req"):
                return got
        raise AssertionError(f"no reply to {kind.name} within {timeout} s")

    def drain(self) -> list[list[bytes]]:
        out = []
        while True:
            try:
                out.append(self.sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return out

    def close(self) -> None:
        self.sock.close(linger=0)


class FakeMaster:
    """A ROUTER on a random loopback port that a real pworker connects to."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.worker: bytes | None = None
        self.results: dict[bytes, dict[str, Any]] = {}
        self.hellos = 0
        self.received = 0

    def _handle(self, frames: list[bytes]) -> None:
        self.received += 1
        ident, rest = frames[0], frames[1:]
        try:
            kind, body = messages.decode(rest)
        except ProtocolError:
            return
        # The worker is whoever spoke last, not only whoever said HELLO last: ZeroMQ gives a
        # reconnected DEALER a new routing id without a new HELLO (a dropped connection), and
        # two HELLOs from two sockets of the worker may be read in either order; sends to the
        # identity of a closed socket vanish, and the test then waits for a worker that never
        # heard it.
        self.worker = ident
        if kind is MsgKind.HELLO:
            self.hellos += 1
            self.send(MsgKind.WELCOME, {"version": PROTOCOL_VERSION, "master_id": "fake-master"})
        elif kind is MsgKind.TASK_RESULTS:
            for r in body["results"]:
                self.results[r["id"]] = r

    def pump(self, timeout: float = 0.0) -> None:
        """Read and handle whatever the worker sent (waiting up to ``timeout`` for the first)."""
        if timeout and not self.sock.poll(int(timeout * 1000)):
            return
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def send(self, kind: MsgKind, body: dict[str, Any]) -> None:
        assert self.worker is not None, "no worker has said HELLO"
        self.sock.send_multipart([self.worker, *messages.encode(kind, body)])

    def send_frames(self, frames: list[bytes]) -> bool:
        assert self.worker is not None
        try:
            self.sock.send_multipart([self.worker, *frames], zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def wait_worker(self, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while self.worker is None and time.monotonic() < deadline:
            self.pump(0.1)
        assert self.worker is not None, "the worker never said HELLO"
        return self.worker

    def wait_heard(self, count: int, timeout: float = 30.0) -> None:
        """Heartbeat the worker until more than ``count`` messages came from it."""
        deadline = time.monotonic() + timeout
        while self.received <= count:
            assert time.monotonic() < deadline, "the worker went silent"
            self.send(MsgKind.HEARTBEAT, {"master_id": "fake-master"})
            self.pump(0.05)

    def dispatch(self, tasks: list[dict[str, Any]]) -> None:
        self.send(MsgKind.DISPATCH, {"tasks": tasks})

    def wait_results(self, ids: list[bytes], timeout: float = 30.0) -> dict[bytes, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in self.results for i in ids):
                return {i: self.results[i] for i in ids}
            self.send(MsgKind.HEARTBEAT, {"master_id": "fake-master"})
            self.pump(0.05)
        missing = [i.hex() for i in ids if i not in self.results]
        raise AssertionError(f"no result for {len(missing)} task(s) within {timeout} s: {missing[:5]}")

    def close(self) -> None:
        self.sock.close(linger=0)


def dispatch_entry(
    name: str, *args: Any, kind: str = "io", attempt: int = 1, **kwargs: Any
) -> dict[str, Any]:
    return {
        "id": os.urandom(16),
        "attempt": attempt,
        "name": name,
        "kind": kind,
        "payload": codec.pack_call(list(args), kwargs),
    }


class TcpRelay:
    """A TCP relay that records every byte between its clients and a target address."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._lock = threading.Lock()
        self._captured = bytearray()
        self._sent = bytearray()  # what the relay's clients sent towards the target
        self.accepted = 0  # connections the relay's clients opened
        self._thread = threading.Thread(target=self._run, name="tcp-relay", daemon=True)
        self._thread.start()

    @property
    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._captured)

    @property
    def sent(self) -> bytes:
        """The bytes the relay's clients sent (one direction of ``captured``)."""
        with self._lock:
            return bytes(self._sent)

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        downs: set[socket.socket] = set()
        try:
            while not self._stop:
                readable, _, _ = select.select([self.listener, self._wake_r, *peers], [], [])
                for s in readable:
                    if s is self._wake_r:
                        continue
                    if s is self.listener:
                        down, _ = self.listener.accept()
                        up = socket.create_connection(self.target)
                        peers[down], peers[up] = up, down
                        downs.add(down)
                        with self._lock:
                            self.accepted += 1
                        continue
                    other = peers.get(s)
                    if other is None:
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        for x in (s, other):
                            peers.pop(x, None)
                            downs.discard(x)
                            x.close()
                        continue
                    with self._lock:
                        self._captured += data
                        if s in downs:
                            self._sent += data
                    try:
                        other.sendall(data)
                    except OSError:
                        pass
        finally:
            for s in peers:
                s.close()

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for s in (self.listener, self._wake_r, self._wake_w):
            s.close()


# -- frame fuzzing ----------------------------------------------------------------
_FIELD_NAMES = sorted({f for schema in messages.SCHEMAS.values() for f in schema} | {"x", "", "id", "name"})


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random msgpack-able value, biased towards the types the schemas use."""
    choice = rng.randrange(12 if depth < 3 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), rng.random()])
    if choice == 4:
        return rng.choice(
            ["", "cpu", "io", "cmd", "worker", "client", "SUCCEEDED", "default", "x" * rng.randrange(50)]
        )
    if choice == 5:
        return rng.randbytes(rng.choice([0, 1, 15, 16, 17]))
    if choice == 6:
        return rng.choice(["pf_testtasks:add", "poolfleet.worker.builtins:echo", "os:system", "a:b"])
    if choice == 7:
        return rng.randrange(0, 2**32)
    if choice in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_FIELD_NAMES): random_value(rng, depth + 1) for _ in range(rng.randrange(5))}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Flip, insert, delete, truncate or splice bytes."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice([0x00, 0xFF, 0xC1, 0xDD, 0xDF, 0xC4, 0xD9, 0x7F, 0x80])
        elif op == 2:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and buf:
            pos = rng.randrange(len(buf))
            del buf[pos : pos + rng.randrange(1, 9)]
        elif op == 4:
            del buf[rng.randrange(len(buf) + 1) :]
        else:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = buf[: rng.randrange(len(buf) + 1)]
    return bytes(buf)


def frame_stream(rng: random.Random, seeds: list[list[bytes]], safe: Any = None) -> Iterator[list[bytes]]:
    """Endless hostile messages: mutated seed messages, random bodies, random frames.

    ``safe(frames)`` may veto a message (True = send it).
    """
    kinds = [bytes((k,)) for k in MsgKind] + [b"\x00", b"\xff", b"", b"\x01\x02"]
    while True:
        r = rng.random()
        if r < 0.45:
            seed = rng.choice(seeds)
            frames = list(seed)
            i = rng.randrange(len(frames))
            frames[i] = mutate(rng, frames[i])
        elif r < 0.75:
            body = {rng.choice(_FIELD_NAMES): random_value(rng) for _ in range(rng.randrange(6))}
            try:
                packed = codec.pack(body)
            except Exception:  # noqa: BLE001 - an unencodable random body: try again
                continue
            frames = [MAGIC, rng.choice(kinds), packed]
        elif r < 0.85:
            frames = [
                rng.choice([MAGIC, b"PF2", b"", rng.randbytes(3)]),
                rng.choice(kinds),
                rng.randbytes(rng.randrange(64)),
            ]
        else:
            frames = [rng.randbytes(rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
        if safe is None or safe(frames):
            yield frames
