"""Bad input gets a clear one-line error, and no daemon dies of someone else's mistake."""

from __future__ import annotations

import subprocess

import msgpack
import pf_testtasks
import zmq
from pfharness import BIN, Cluster, daemon_env

from poolfleet.client import Client
from poolfleet.common.protocol import MAGIC, MsgKind


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, env=daemon_env(), timeout=60, stdin=subprocess.DEVNULL
    )


def assert_still_serving(cluster: Cluster) -> None:
    """After bad input: every daemon is up and a task still runs end to end."""
    with Client(cluster.client_endpoint) as c:
        assert c.submit(pf_testtasks.add, 1, 2).result(20) == 3
    assert cluster.master is not None and cluster.master.alive()
    assert all(w.alive() for w in cluster.workers)


def test_malformed_endpoints_are_named(tmp_path: object) -> None:
    r = run(str(BIN / "pmaster"), "--clients", "tcp://127.0.0.1", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "pmaster: error: malformed endpoint 'tcp://127.0.0.1': expected tcp://HOST:PORT "
        "(for example tcp://127.0.0.1:5555) or ipc://PATH"
    ]
    r = run(str(BIN / "pworker"), "--master", "localhost:5556", "--tasks", "pf_testtasks")
    assert r.returncode == 2 and "malformed endpoint 'localhost:5556'" in r.stderr
    r = run(str(BIN / "ptask"), "--master", "http://x", "status")
    assert r.returncode == 2 and "malformed endpoint 'http://x'" in r.stderr


def test_task_module_that_does_not_import(tmp_path: object) -> None:
    r = run(str(BIN / "pworker"), "--tasks", "pf_brokentasks")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "pworker: error: cannot import task module 'pf_brokentasks': ImportError: this module is broken on purpose"
    )
    r = run(str(BIN / "pworker"), "--tasks", "no_such_module_here")
    assert r.returncode == 2 and "cannot import task module 'no_such_module_here'" in r.stderr


def test_non_loopback_bind_refused_without_keys(tmp_path: object) -> None:
    r = run(str(BIN / "pmaster"), "--workers", "tcp://0.0.0.0:0", "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert "refusing to bind the workers socket" in r.stderr and "--insecure" in r.stderr


def test_bad_settings_values(tmp_path: object) -> None:
    r = run(str(BIN / "pmaster"), "--data-dir", str(tmp_path), "--journal-sync", "sometimes")
    assert r.returncode == 2 and "journal_sync must be 'normal' or 'full'" in r.stderr
    env = daemon_env({"POOLFLEET_WORKER_CPU": "many"})
    r = subprocess.run(
        [str(BIN / "pworker"), "--tasks", "pf_testtasks"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 2 and "POOLFLEET_WORKER_CPU" in r.stderr and "'many'" in r.stderr


def test_garbage_frames_on_both_sockets_get_errors_and_daemons_survive(cluster: Cluster) -> None:
    ctx = zmq.Context()
    try:
        for endpoint in (cluster.client_endpoint, cluster.worker_endpoint):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 5000)
            s.connect(endpoint)
            cases = [
                [b"hello"],
                [b"XXX", b"\x01", b"\x80"],
                [MAGIC, b"\xff", msgpack.packb({})],
                [MAGIC, bytes([MsgKind.STATUS]), b"\xc1not msgpack"],
                [MAGIC, bytes([MsgKind.SUBMIT]), msgpack.packb({"req": 7, "tasks": "nope"})],
            ]
            for frames in cases:
                s.send_multipart(frames)
                magic, kind, body = s.recv_multipart()
                assert magic == MAGIC and kind[0] == MsgKind.ERROR
                err = msgpack.unpackb(body)
                assert err["code"] in ("bad_frame", "bad_request") and err["message"]
            # the well-framed bad request names the field and echoes the request number
            assert err["req"] == 7 and "tasks" in err["message"]
            s.close()
    finally:
        ctx.term()
    assert_still_serving(cluster)


def test_version_mismatch_is_refused_both_ways(cluster: Cluster) -> None:
    ctx = zmq.Context()
    try:
        for endpoint, role in ((cluster.client_endpoint, "client"), (cluster.worker_endpoint, "worker")):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 5000)
            s.connect(endpoint)
            s.send_multipart([MAGIC, bytes([MsgKind.HELLO]), msgpack.packb({"version": 99, "role": role})])
            _, kind, body = s.recv_multipart()
            err = msgpack.unpackb(body)
            assert kind[0] == MsgKind.ERROR and err["code"] == "bad_version"
            assert "protocol 99" in err["message"] and "master speaks 1" in err["message"]
            s.close()
    finally:
        ctx.term()


def test_worker_refuses_a_master_of_another_version(tmp_path: object) -> None:
    """A fake master answers HELLO with bad_version: the worker exits with a clear error."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    p = subprocess.Popen(
        [str(BIN / "pworker"), "--master", f"tcp://127.0.0.1:{port}", "--cpu", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=daemon_env(),
    )
    try:
        router.setsockopt(zmq.RCVTIMEO, 20000)
        ident, _magic, kind, _body = router.recv_multipart()
        assert kind[0] == MsgKind.HELLO
        router.send_multipart(
            [
                ident,
                MAGIC,
                bytes([MsgKind.ERROR]),
                msgpack.packb(
                    {"code": "bad_version", "message": "worker speaks protocol 1, master speaks 2"}
                ),
            ]
        )
        _, err = p.communicate(timeout=30)
        assert p.returncode != 0
        assert "master speaks 2" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        router.close()
        ctx.term()


def test_result_with_non_string_keys_fails_on_the_worker(cluster: Cluster) -> None:
    from poolfleet.client import TaskError

    with Client(cluster.client_endpoint) as c:
        f = c.submit(pf_testtasks.int_keys)
        try:
            f.result(20)
        except TaskError as exc:
            assert exc.type == "poolfleet.common.errors.EncodeError"
            assert "map key of type 'int'" in exc.message
        else:
            raise AssertionError("an undecodable result must fail the task")


def test_client_refuses_a_master_of_another_version() -> None:
    from poolfleet.client import RemoteError

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client(f"tcp://127.0.0.1:{port}") as c:
            router.setsockopt(zmq.RCVTIMEO, 10000)
            ident, _, kind, _ = router.recv_multipart()
            assert kind[0] == MsgKind.HELLO
            router.send_multipart(
                [ident, MAGIC, bytes([MsgKind.WELCOME]), msgpack.packb({"version": 2, "master_id": "x"})]
            )
            try:
                c.status(timeout_s=10)
            except RemoteError as exc:
                assert exc.code == "bad_version" and "protocol 2" in exc.message
            else:
                raise AssertionError("a client must refuse a master of another protocol version")
    finally:
        router.close()
        ctx.term()


def test_metrics_on_a_public_address_needs_insecure(tmp_path: object) -> None:
    r = run(str(BIN / "pmaster"), "--data-dir", str(tmp_path), "--metrics", "0.0.0.0:0")
    assert r.returncode == 2
    assert "refusing to serve metrics on 0.0.0.0:0" in r.stderr and "--insecure" in r.stderr


def test_worker_result_with_a_short_task_id_is_refused_not_fatal(cluster: Cluster) -> None:
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        s.connect(cluster.worker_endpoint)
        result = {"id": b"short", "attempt": 1, "state": "FAILED"}
        s.send_multipart([MAGIC, bytes([MsgKind.TASK_RESULTS]), msgpack.packb({"results": [result]})])
        _, kind, body = s.recv_multipart()
        err = msgpack.unpackb(body)
        assert kind[0] == MsgKind.ERROR and "must be 16 bytes" in err["message"]
        s.close()
    finally:
        ctx.term()
    assert_still_serving(cluster)
