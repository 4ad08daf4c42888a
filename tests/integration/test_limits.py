"""Limits: a full queue and a greedy client get a clear error (nothing dropped silently),
and every socket refuses messages over ZMQ_MAXMSGSIZE by dropping the connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pf_testtasks
import pytest
import zmq
from pfharness import Cluster, wait_for
from pfpeers import FakeMaster, RawPeer, dispatch_entry
from zmq.utils.monitor import recv_monitor_message

from poolfleet.client import Client, RemoteError
from poolfleet.common import codec
from poolfleet.common.ids import new_task_id
from poolfleet.common.protocol import DEFAULT_MAX_MESSAGE_BYTES, MAGIC, PROTOCOL_VERSION, MsgKind


def _rejection(fut: Any) -> RemoteError:
    exc = fut.exception(20)
    assert isinstance(exc, RemoteError), exc
    return exc


def test_full_queue_answers_queue_full(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master("--max-queue-length", "3")
    with Client(c.client_endpoint) as cl:
        parked = cl.with_options(queue="parked")  # no worker serves it
        futs = [parked.submit(pf_testtasks.add, i, 0) for i in range(5)]
        for f in futs[:3]:
            assert f.ack is not None and f.ack.result(20)["accepted"]
        for f in futs[3:]:
            err = _rejection(f)
            assert err.code == "queue_full"
            assert "queue 'parked' (cpu) is full: 3 tasks pending" in err.message
        # the limit is per queue and kind
        other = cl.with_options(queue="parked", kind="io").submit(pf_testtasks.add, 1, 1)
        assert other.ack is not None and other.ack.result(20)["rejected"] == []
        r = c.ptask("submit", "pf_testtasks:add", "1", "2", "--queue", "parked")
        assert r.returncode == 4 and "queue_full" in r.stderr and "retry later" in r.stderr
        st = cl.status()
        assert {"queue": "parked", "kind": "cpu", "depth": 3} in st["queues"]
        assert st["counts"]["PENDING"] == 4
        # room again once one leaves the queue
        cl.cancel([futs[0].task_id])
        again = parked.submit(pf_testtasks.add, 9, 9)
        assert again.ack is not None and again.ack.result(20)["rejected"] == []
        # tasks parked in a queue no worker serves: cancel them, or leaving `with` waits for them
        cl.shutdown(cancel_futures=True)


def test_a_submit_over_the_task_limit_is_refused_whole_and_the_master_goes_on(
    make_cluster: type[Cluster], ctx: Any
) -> None:
    c = make_cluster()
    c.start_master()
    peer = RawPeer(ctx, c.client_endpoint)
    try:
        assert (
            peer.request(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "client"})[0] is MsgKind.WELCOME
        )
        payload = codec.pack_call((1, 2), {})
        tasks = [{"id": new_task_id(), "name": "pf_testtasks:add", "payload": payload} for _ in range(2001)]
        kind, body = peer.request(MsgKind.SUBMIT, {"req": 1, "tasks": tasks})
        assert kind is MsgKind.ERROR and body["code"] == "bad_request"
        assert "2001 tasks, more than 2000" in body["message"] and "split the batch" in body["message"]
        kind, body = peer.request(MsgKind.SUBMIT, {"req": 2, "tasks": tasks[:2000]})  # at the limit
        assert kind is MsgKind.SUBMITTED and len(body["accepted"]) == 2000 and body["rejected"] == []
        kind, body = peer.request(MsgKind.STATUS, {"req": 3})
        assert kind is MsgKind.STATUS_REPLY
        assert sum(body["counts"].values()) == 2000  # nothing of the refused message got in
    finally:
        peer.close()


def test_per_client_cap_on_pending_submissions(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    master = c.start_master("--max-unacked-per-client", "3")
    with Client(c.client_endpoint) as a, Client(c.client_endpoint) as b:
        qa, qb = a.with_options(queue="parked"), b.with_options(queue="parked")
        fa = [qa.submit(pf_testtasks.io_sleep, 0.01) for _ in range(5)]
        for f in fa[3:]:
            err = _rejection(f)
            assert err.code == "too_many_unacked"
            assert "3 tasks pending (max_unacked_per_client)" in err.message
        assert all(f.ack is not None and f.ack.result(20)["rejected"] for f in fa[3:])
        # another client has its own allowance
        fb = [qb.submit(pf_testtasks.io_sleep, 0.01) for _ in range(3)]
        assert all(f.ack is not None and not f.ack.result(20)["rejected"] for f in fb)
        assert [e["code"] for e in master.events("task_rejected")] == ["too_many_unacked"] * 2
        # once a worker takes them, they no longer count: running or finished is not pending
        c.start_worker("--queue", "parked", io=4, name="wp")
        for f in fa[:3] + fb:
            assert f.result(30) == "slept 0.01"
        long = [qa.submit(pf_testtasks.io_sleep, 3) for _ in range(3)]
        wait_for(lambda: a.status()["counts"]["RUNNING"] == 3, what="three running tasks")
        more = [qa.submit(pf_testtasks.io_sleep, 0.01) for _ in range(3)]
        assert all(f.result(30) == "slept 0.01" for f in more)
        assert all(f.result(30) == "slept 3" for f in long)


@contextmanager
def disconnect_monitor(sock: zmq.Socket[bytes]) -> Iterator[zmq.Socket[bytes]]:
    mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        yield mon
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


def wait_disconnected(mon: zmq.Socket[bytes], timeout: float = 20.0) -> None:
    assert mon.poll(int(timeout * 1000)), "the connection was not dropped"
    assert recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_master_drops_connections_that_send_oversized_frames(make_cluster: type[Cluster], ctx: Any) -> None:
    c = make_cluster()
    master = c.start_master("--max-message-bytes", "65536")
    peer = RawPeer(ctx, c.client_endpoint)
    try:
        with disconnect_monitor(peer.sock) as mon:
            # under the limit: a well-framed bad request gets a reply naming the problem
            peer.send_frames([MAGIC, bytes([MsgKind.SUBMIT]), codec.pack({"req": 1, "tasks": "x" * 60_000})])
            got = peer.recv()
            assert got is not None
            kind, body = got
            assert kind is MsgKind.ERROR and body["req"] == 1 and "'tasks' has type str" in body["message"]
            rejected = len(master.events("frame_rejected")) + len(master.events("request_rejected"))
            # over the limit: ZeroMQ closes the connection before the master sees a byte of it
            assert peer.send_frames(
                [MAGIC, bytes([MsgKind.SUBMIT]), codec.pack({"req": 3, "tasks": "x" * 70_000})]
            )
            wait_disconnected(mon)
        # the peer reconnects by itself and the master still answers
        kind, body = peer.request(MsgKind.STATUS, {"req": 4})
        assert kind is MsgKind.STATUS_REPLY
        assert len(master.events("frame_rejected")) + len(master.events("request_rejected")) == rejected
    finally:
        peer.close()


def test_worker_drops_a_master_connection_that_sends_oversized_frames(
    make_cluster: type[Cluster], ctx: Any
) -> None:
    c = make_cluster()
    fake = FakeMaster(ctx)
    try:
        w = c.start_worker(master=fake.endpoint, wait=False, cpu=1, io=2, name="wm")
        fake.wait_worker()
        with disconnect_monitor(fake.sock) as mon:
            fake.send_frames([MAGIC, bytes([MsgKind.DISPATCH]), b"\x00" * (DEFAULT_MAX_MESSAGE_BYTES + 1)])
            heard = fake.received
            wait_disconnected(mon)
        fake.wait_heard(heard)  # the worker is connected again
        task = dispatch_entry("pf_testtasks:add", 20, 22)
        fake.dispatch([task])
        got = fake.wait_results([task["id"]])[task["id"]]
        assert got["state"] == "SUCCEEDED" and codec.unpack(got["value"]) == 42
        assert w.alive() and w.events("frame_rejected") == []
    finally:
        fake.close()


def test_client_drops_a_master_connection_that_sends_oversized_frames(ctx: Any) -> None:
    fake = FakeMaster(ctx)
    cl = Client(fake.endpoint, timeout_s=5)
    try:
        fake.wait_worker()  # the client's HELLO
        with disconnect_monitor(fake.sock) as mon:
            fake.send_frames([MAGIC, bytes([MsgKind.RESULTS]), b"\x00" * (DEFAULT_MAX_MESSAGE_BYTES + 1)])
            wait_disconnected(mon)
    finally:
        cl.close()
        fake.close()
