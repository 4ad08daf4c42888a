"""CurveZMQ: keyed peers work end to end; peers without the right key get nothing and are
logged; traffic is encrypted on the wire; allowed keys can be added and revoked live.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pf_testtasks
import pytest
from pfharness import BIN, Cluster, Proc, daemon_env, wait_for
from pfpeers import TcpRelay

from poolfleet.client import Client, MasterUnreachable
from poolfleet.common.curve import load_key_pair, load_public_key

ECHO = "poolfleet.worker.builtins:echo"


def ptask_keys(directory: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ptask"), "keys", "generate", str(directory), "--name", name, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Keys:
    root: Path

    def public(self, name: str) -> str:
        return str(self.root / "made" / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.root / "made" / f"{name}.key_secret")

    @property
    def workers_dir(self) -> Path:
        return self.root / "allowed-workers"

    @property
    def clients_dir(self) -> Path:
        return self.root / "allowed-clients"

    def master_args(self) -> list[str]:
        return [
            "--curve-secret-key",
            self.secret("master"),
            "--curve-workers-dir",
            str(self.workers_dir),
            "--curve-clients-dir",
            str(self.clients_dir),
        ]

    def worker_args(self, name: str = "worker", server: str = "master") -> list[str]:
        return ["--curve-server-key", self.public(server), "--curve-secret-key", self.secret(name)]

    def client(self, endpoint: str, name: str = "client", server: str = "master", **kw: Any) -> Client:
        return Client(
            endpoint, curve_server_key=self.public(server), curve_secret_key=self.secret(name), **kw
        )

    def z85(self, name: str) -> str:
        return load_public_key(self.public(name)).decode()


def make_keys(root: Path) -> Keys:
    """Key pairs for the master, a worker, a client and an intruder; the worker's and the
    client's public keys installed in the master's allowed directories."""
    keys = Keys(root)
    for name in ("master", "worker", "worker2", "client", "client2", "intruder"):
        r = ptask_keys(root / "made", name)
        assert r.returncode == 0, r.stderr
    keys.workers_dir.mkdir()
    keys.clients_dir.mkdir()
    shutil.copy(keys.public("worker"), keys.workers_dir)
    shutil.copy(keys.public("client"), keys.clients_dir)
    return keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def refusals(master: Proc, socket: str) -> list[dict[str, Any]]:
    return [e for e in master.events("peer_refused") if e.get("socket") == socket]


def wait_refused(master: Proc, socket: str, key: str) -> dict[str, Any]:
    """The peer_refused event of one public key on one socket."""
    return master.wait_event("peer_refused", where=lambda e: e["socket"] == socket and e.get("key") == key)


def test_ptask_keys_generate(tmp_path: Path) -> None:
    r = ptask_keys(tmp_path / "k", "node1")
    assert r.returncode == 0, r.stderr
    public, secret = tmp_path / "k" / "node1.key", tmp_path / "k" / "node1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    z85_public, z85_secret = load_key_pair(secret)
    assert load_public_key(public) == z85_public and len(z85_secret) == 40
    assert z85_public.decode() in r.stdout and "secret" not in public.read_text().split("curve")[1]
    # never overwrites by accident
    r = ptask_keys(tmp_path / "k", "node1")
    assert r.returncode == 2 and "already exist" in r.stderr and "--force" in r.stderr
    assert load_public_key(public) == z85_public
    r = ptask_keys(tmp_path / "k", "node1", "--force")
    assert r.returncode == 0, r.stderr
    assert load_public_key(public) != z85_public
    r = ptask_keys(tmp_path / "k", "../escape")
    assert r.returncode == 2 and "bad key name" in r.stderr


def test_keyed_worker_and_client_work_end_to_end(make_cluster: type[Cluster], keys: Keys) -> None:
    c = make_cluster()
    master = c.start_master(*keys.master_args())
    c.start_worker(*keys.worker_args(), name="wk")
    auth = master.wait_event("peer_authenticated", where=lambda e: e["socket"] == "workers")
    assert auth["key_file"] == "worker.key"
    with keys.client(c.client_endpoint) as cl:
        assert [f.result(30) for f in [cl.submit(pf_testtasks.add, i, 1) for i in range(10)]] == list(
            range(1, 11)
        )
        assert cl.submit(pf_testtasks.io_sleep, 0.01).result(30) == "slept 0.01"
    # ptask: global options, and the environment
    r = c.ptask(
        "--curve-server-key",
        keys.public("master"),
        "--curve-secret-key",
        keys.secret("client"),
        "submit",
        ECHO,
        "flags",
        "--wait",
    )
    assert r.returncode == 0 and r.stdout.strip() == "flags", r.stderr
    env = {
        "POOLFLEET_CURVE_SERVER_KEY": keys.public("master"),
        "POOLFLEET_CURVE_SECRET_KEY": keys.secret("client"),
    }
    r = c.ptask("submit", ECHO, "env", "--wait", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "env", r.stderr
    r = c.ptask("workers", "--json", env=env)
    assert [w["worker_id"] for w in json.loads(r.stdout)] == ["wk"]
    assert refusals(master, "clients") == [] and refusals(master, "workers") == []


def test_workers_without_the_right_key_are_refused_and_get_no_task(
    make_cluster: type[Cluster], keys: Keys
) -> None:
    c = make_cluster()
    master = c.start_master(*keys.master_args())
    with keys.client(c.client_endpoint) as cl:
        futs = [cl.submit(pf_testtasks.add, i, 100) for i in range(6)]
        wait_for(lambda: cl.status()["counts"]["PENDING"] == 6, what="six pending tasks")
        no_key = c.start_worker(name="w-nokey", wait=False)
        intruder = c.start_worker(*keys.worker_args("intruder"), name="w-intruder", wait=False)
        client_key = c.start_worker(*keys.worker_args("client"), name="w-clientkey", wait=False)
        for who in ("intruder", "client"):
            ev = wait_refused(master, "workers", keys.z85(who))
            assert "not in the allowed workers keys" in ev["reason"] and ev["address"] == "127.0.0.1"
        master.wait_event(
            "peer_refused",
            where=lambda e: e["socket"] == "workers" and "CurveZMQ" in e["reason"] and "key" not in e,
        )
        # each refused worker is up, tried to register and keeps trying; none got in
        for w in (no_key, intruder, client_key):
            w.wait_event("worker_started")
            assert w.alive()
            assert w.events("worker_registered") == []
        assert master.events("worker_registered") == []
        st = cl.status()
        assert st["workers"] == 0 and st["counts"]["PENDING"] == 6
        assert not any(f.done() for f in futs)
        # the rightful worker takes them all
        c.start_worker(*keys.worker_args(), name="w-good")
        assert [f.result(30) for f in futs] == [i + 100 for i in range(6)]
        assert {f.info["worker_id"] for f in futs} == {"w-good"}
    for w in (no_key, intruder, client_key):
        assert w.events("worker_registered") == []


def test_clients_without_the_right_key_are_refused_and_get_no_result(
    make_cluster: type[Cluster], keys: Keys
) -> None:
    c = make_cluster()
    master = c.start_master(*keys.master_args())
    c.start_worker(*keys.worker_args(), name="wk")
    with keys.client(c.client_endpoint) as good:
        fut = good.submit(ECHO, "private result")
        assert fut.result(30) == "private result"
        submitted = good.status()["submitted_total"]
    bad = {
        "no key": Client(c.client_endpoint),
        "unknown key": keys.client(c.client_endpoint, "intruder"),
        "worker key": keys.client(c.client_endpoint, "worker"),
        "wrong server key": keys.client(c.client_endpoint, "client", server="intruder"),
    }
    try:

        def attempt(cl: Client) -> str:
            try:
                cl.results([fut.task_id], timeout_s=3)
            except MasterUnreachable:
                pass
            else:
                return "got a result"
            late = cl.submit(pf_testtasks.add, 1, 1)
            try:
                late.result(2)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it is not a result
                return type(exc).__name__
            return "task ran"

        with ThreadPoolExecutor(len(bad)) as pool:
            outcomes = dict(zip(bad, pool.map(attempt, bad.values()), strict=True))
        assert all(o in ("TimeoutError", "MasterUnreachable") for o in outcomes.values()), outcomes
        for who in ("intruder", "worker"):
            ev = wait_refused(master, "clients", keys.z85(who))
            assert "not in the allowed clients keys" in ev["reason"]
        master.wait_event("peer_refused", where=lambda e: "cryptographic" in e["reason"])
        master.wait_event(
            "peer_refused", where=lambda e: e["socket"] == "clients" and "CurveZMQ" in e["reason"]
        )
    finally:
        for cl in bad.values():
            cl.close()
    with keys.client(c.client_endpoint) as good:
        assert good.status()["submitted_total"] == submitted  # nothing the refused clients sent landed


def _marker() -> str:
    return f"MARKER-{uuid.uuid4().hex}"


@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "curve"])
def test_arguments_and_results_are_not_in_cleartext_on_the_wire(
    make_cluster: type[Cluster], keys: Keys, curve: bool
) -> None:
    """Relays between the client and the master and between the master and the worker
    record every byte. Without keys the marker travels in clear (so the check can see
    it); with keys it must not appear anywhere."""
    c = make_cluster()
    c.start_master(*(keys.master_args() if curve else []))
    client_relay, worker_relay = TcpRelay(c.client_endpoint), TcpRelay(c.worker_endpoint)
    try:
        c.start_worker(*(keys.worker_args() if curve else []), name="wr", master=worker_relay.endpoint)
        arg, kwarg = _marker(), _marker()
        cl = keys.client(client_relay.endpoint) if curve else Client(client_relay.endpoint)
        with cl:
            out = cl.submit(ECHO, arg, secret=kwarg).result(30)
        assert out == {"args": [arg], "kwargs": {"secret": kwarg}}
        to_master, to_worker = client_relay.captured, worker_relay.captured
        assert len(to_master) > 200 and len(to_worker) > 200
        for m in (arg, kwarg):
            for captured in (to_master, to_worker):
                assert (m.encode() in captured) is not curve
        if curve:
            assert b"PF1" not in to_master and b"pf_testtasks" not in to_worker
    finally:
        client_relay.close()
        worker_relay.close()


def test_allowed_keys_are_reread_without_a_restart(
    make_cluster: type[Cluster], keys: Keys, tmp_path: Path
) -> None:
    own = Keys(tmp_path / "own")
    shutil.copytree(keys.root, own.root)
    c = make_cluster()
    master = c.start_master(*own.master_args())
    # a worker whose key is not installed yet is refused ...
    w2 = c.start_worker(*own.worker_args("worker2"), name="w2", wait=False)
    master.wait_event("peer_refused", where=lambda e: e.get("key") == own.z85("worker2"))
    # ... and gets in once its public key is copied into the directory
    shutil.copy(own.public("worker2"), own.workers_dir)
    w2.wait_event("worker_registered", timeout=30)
    reload = master.wait_event("keys_reloaded", where=lambda e: e["socket"] == "workers")
    assert reload["count"] == 2
    with own.client(c.client_endpoint) as cl:
        assert cl.submit(pf_testtasks.add, 2, 2).result(30) == 4
    # revoking: remove the client's key; new connections with it are refused
    os.remove(own.clients_dir / "client.key")
    shutil.copy(own.public("client2"), own.clients_dir)
    with own.client(c.client_endpoint, "client2") as cl2:
        assert cl2.submit(pf_testtasks.add, 3, 3).result(30) == 6
    with own.client(c.client_endpoint) as old, pytest.raises(MasterUnreachable):
        old.status(timeout_s=2)
    master.wait_event(
        "peer_refused", where=lambda e: e["socket"] == "clients" and e.get("key") == own.z85("client")
    )


def test_curve_settings_must_be_complete_and_readable(tmp_path: Path, keys: Keys) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, env=daemon_env(), timeout=60, stdin=subprocess.DEVNULL
        )

    pm = [str(BIN / "pmaster"), "--data-dir", str(tmp_path / "d"), "--clients", "tcp://127.0.0.1:0"]
    r = run(*pm, "--workers", "tcp://127.0.0.1:0", "--curve-secret-key", keys.secret("master"))
    assert r.returncode == 2 and "needs all three settings" in r.stderr
    args = keys.master_args()
    args[1] = keys.public("master")  # the public file where the secret one belongs
    r = run(*pm, "--workers", "tcp://127.0.0.1:0", *args)
    assert r.returncode == 2 and "holds no secret key" in r.stderr
    args = keys.master_args()
    args[3] = str(tmp_path / "missing")
    r = run(*pm, "--workers", "tcp://127.0.0.1:0", *args)
    assert r.returncode == 2 and "does not exist" in r.stderr
    pw = [str(BIN / "pworker"), "--tasks", "pf_testtasks", "--master", "tcp://127.0.0.1:9"]
    r = run(*pw, "--curve-server-key", keys.public("master"))
    assert r.returncode == 2 and "needs both keys" in r.stderr
    r = run(*pw, "--curve-server-key", keys.public("master"), "--curve-secret-key", str(tmp_path / "nope"))
    assert r.returncode == 2 and "cannot read CurveZMQ key file" in r.stderr
    r = run(str(BIN / "ptask"), "--curve-secret-key", keys.secret("client"), "status")
    assert r.returncode == 2 and "needs both keys" in r.stderr


def test_curve_master_may_bind_any_address(tmp_path: Path, keys: Keys) -> None:
    c = Cluster(tmp_path)
    try:
        m = c.start_master(*keys.master_args(), clients="tcp://0.0.0.0:0", workers="tcp://0.0.0.0:0")
        assert c.client_endpoint.startswith("tcp://0.0.0.0:")
        m.signal(15)
        assert m.wait(30) == 0
    finally:
        c.close()


def test_master_key_rolls_with_a_restart(make_cluster: type[Cluster], keys: Keys, tmp_path: Path) -> None:
    """Workers read the key files at each (re)connection: replace the master's public key
    file on the worker host, restart the master with the new secret key, done."""
    own = Keys(tmp_path / "own")
    shutil.copytree(keys.root, own.root)
    pinned = tmp_path / "worker-host" / "master.key"  # the worker's copy of the master's public key
    pinned.parent.mkdir()
    shutil.copy(own.public("master"), pinned)
    c = make_cluster()
    old = c.start_master(*own.master_args())
    w = c.start_worker(
        "--curve-server-key", str(pinned), "--curve-secret-key", own.secret("worker"), name="wk"
    )
    r = ptask_keys(own.root / "made", "master2")
    assert r.returncode == 0, r.stderr
    shutil.copy(own.public("master2"), pinned)  # the running worker is not disturbed
    old.signal(15)
    assert old.wait(30) == 0
    args = own.master_args()
    args[1] = own.secret("master2")
    new = c.restart_master(*args)
    w.wait_event("worker_registered", count=2, timeout=30)
    new.wait_event("worker_registered", where=lambda e: e["worker_id"] == "wk")
    with own.client(c.client_endpoint, server="master2") as cl:
        assert cl.submit(pf_testtasks.add, 40, 2).result(30) == 42
    # a client still pinning the old master key cannot talk to the new master
    with own.client(c.client_endpoint) as stale, pytest.raises(MasterUnreachable):
        stale.status(timeout_s=2)
    new.wait_event("peer_refused", where=lambda e: "cryptographic" in e["reason"])


def test_ptask_says_when_the_key_handshake_fails(make_cluster: type[Cluster], keys: Keys) -> None:
    c = make_cluster()
    master = c.start_master(*keys.master_args())
    ep = c.client_endpoint
    refused = (
        f"the master at {ep} refused this client's CurveZMQ key",
        "the master's --curve-clients-dir must hold this client's public key (NAME.key)",
    )
    failed = (
        f"the CurveZMQ handshake with {ep} failed",
        "give --curve-server-key (the master's public key) and --curve-secret-key, "
        "or neither when the master uses no keys",
    )
    cases = [
        (
            ["--curve-server-key", keys.public("master"), "--curve-secret-key", keys.secret("intruder")],
            refused,
        ),
        (["--curve-server-key", keys.public("client2"), "--curve-secret-key", keys.secret("client")], failed),
        ([], failed),
    ]
    for args, (problem, hint) in cases:
        r = c.ptask(*args, "status", "--timeout", "3")
        assert r.returncode == 3, r.stderr
        assert r.stderr.splitlines() == [
            f"ptask: {problem}; ptask keeps trying until --timeout (3 s) (hint: {hint})",
            f"ptask: error: {problem}, after 3 s of trying (--timeout) (hint: {hint})",
        ], args
    assert master.alive()
