"""Safe defaults: loopback binds unless keys or --insecure; cmd tasks only for allowed
programs; only functions of the --tasks modules run; nothing is ever unpickled.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pf_testtasks
import pytest
import zmq
from pfharness import BIN, Cluster, daemon_env, wait_for
from pfpeers import FakeMaster, dispatch_entry

from poolfleet.client import Client, RemoteError, TaskError
from poolfleet.client.client import DEFAULT_MASTER
from poolfleet.common import codec
from poolfleet.common.net import parse_endpoint
from poolfleet.common.protocol import CMD_TASK_NAME
from poolfleet.master.settings import MasterSettings
from poolfleet.worker.daemon import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "master", "worker", "client")


def pmaster(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pmaster"), "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True,
        text=True,
        env=daemon_env(env),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_defaults_are_loopback() -> None:
    for url in (MasterSettings().clients, MasterSettings().workers, WorkerSettings().master, DEFAULT_MASTER):
        assert parse_endpoint(url).is_loopback, url
    help_text = subprocess.run(
        [str(BIN / "pmaster"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "tcp://127.0.0.1:5555" in help_text and "tcp://127.0.0.1:5556" in help_text


@pytest.mark.parametrize(
    ("args", "env", "socket"),
    [
        (["--clients", "tcp://0.0.0.0:0", "--workers", "tcp://127.0.0.1:0"], None, "clients"),
        (["--clients", "tcp://*:0", "--workers", "tcp://127.0.0.1:0"], None, "clients"),
        (["--clients", "tcp://127.0.0.1:0", "--workers", "tcp://[::]:0"], None, "workers"),
        (["--workers", "tcp://127.0.0.1:0"], {"POOLFLEET_MASTER_CLIENTS": "tcp://0.0.0.0:0"}, "clients"),
    ],
)
def test_non_loopback_bind_without_keys_is_refused(
    tmp_path: Path, args: list[str], env: dict[str, str] | None, socket: str
) -> None:
    r = pmaster(tmp_path, *args, env=env)
    assert r.returncode == 2, r.stderr
    assert f"refusing to bind the {socket} socket" in r.stderr
    assert "--insecure" in r.stderr and "docs/SECURITY.md" in r.stderr


def test_insecure_flag_allows_any_address(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master("--insecure", clients="tcp://0.0.0.0:0")
    assert c.client_endpoint.startswith("tcp://0.0.0.0:")
    port = c.client_endpoint.rsplit(":", 1)[1]
    with Client(f"tcp://127.0.0.1:{port}") as cl:
        assert cl.status()["workers"] == 0
    m.signal(15)
    assert m.wait(30) == 0


@pytest.fixture
def fake_master() -> Iterator[FakeMaster]:
    ctx: zmq.Context[Any] = zmq.Context()
    fake = FakeMaster(ctx)
    try:
        yield fake
    finally:
        fake.close()
        ctx.destroy(linger=0)


def _cmd(*argv: str) -> dict[str, Any]:
    return dispatch_entry(CMD_TASK_NAME, kind="cmd", argv=list(argv))


def test_cmd_tasks_are_off_unless_the_program_is_allowed(
    make_cluster: type[Cluster], fake_master: FakeMaster, tmp_path: Path
) -> None:
    """A master can ask for anything; the worker runs only the programs it allows by name."""
    c = make_cluster()
    marker = tmp_path / "cmd-ran"
    c.start_worker(master=fake_master.endpoint, wait=False, cpu=1, io=1, name="no-cmd")
    fake_master.wait_worker()
    t = _cmd("touch", str(marker))
    fake_master.dispatch([t])
    got = fake_master.wait_results([t["id"]])[t["id"]]
    assert got["state"] == "FAILED" and "no cmd slots" in got["error"]["message"]
    assert not marker.exists()


def test_only_allowed_programs_run(
    make_cluster: type[Cluster], fake_master: FakeMaster, tmp_path: Path
) -> None:
    c = make_cluster()
    marker = tmp_path / "cmd-ran"
    c.start_worker(
        "--allow-cmd", "echo", master=fake_master.endpoint, wait=False, cpu=1, io=1, name="echo-only"
    )
    fake_master.wait_worker()
    touch, echo, path = _cmd("touch", str(marker)), _cmd("echo", "allowed"), _cmd("/bin/echo", "by path")
    fake_master.dispatch([touch, echo, path])
    got = fake_master.wait_results([touch["id"], echo["id"], path["id"]])
    assert got[touch["id"]]["state"] == "FAILED"
    assert "'touch' is not allowed on this worker (allowed: echo)" in got[touch["id"]]["error"]["message"]
    assert got[path["id"]]["state"] == "FAILED" and "not allowed" in got[path["id"]]["error"]["message"]
    assert not marker.exists()
    assert got[echo["id"]]["state"] == "SUCCEEDED"
    assert codec.unpack(got[echo["id"]]["value"])["stdout"] == "allowed\n"


@pytest.mark.parametrize("kind", ["io", "cpu"])
def test_only_functions_of_the_task_modules_run(
    make_cluster: type[Cluster], fake_master: FakeMaster, tmp_path: Path, kind: str
) -> None:
    c = make_cluster()
    marker = tmp_path / "ran"
    c.start_worker(master=fake_master.endpoint, wait=False, cpu=1, io=1, name="w")
    fake_master.wait_worker()
    names = ["os:system", "subprocess:getoutput", "poolfleet.worker.runner:execute", "pf_testtasks:os"]
    bad = [dispatch_entry(n, f"touch {marker}", kind=kind) for n in names]
    good = dispatch_entry("pf_testtasks:add", 1, 2, kind=kind)
    fake_master.dispatch([*bad, good])
    got = fake_master.wait_results([t["id"] for t in [*bad, good]])
    for t in bad:
        r = got[t["id"]]
        assert r["state"] == "FAILED", r
        assert f"unknown task {t['name']!r}" in r["error"]["message"]
    assert codec.unpack(got[good["id"]]["value"]) == 3
    assert not marker.exists()


def test_master_refuses_functions_no_worker_offers_and_workers_refuse_the_rest(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    marker = tmp_path / "ran"
    with Client(c.client_endpoint) as cl:
        # before any worker registered the master cannot know: it queues the task, which then
        # waits for a worker that offers the name; no worker gets it, status says so
        early = cl.submit("os:system", f"touch {marker}")
        c.start_worker(name="w")
        unserved = wait_for(lambda: cl.status()["unserved"], what="the task waiting for an offer")
        assert unserved == [{"name": "os:system", "queue": "default", "kind": "cpu", "pending": 1}]
        assert cl.results([early.task_id])[early.task_id]["state"] == "PENDING"
        cl.cancel([early.task_id])
        with pytest.raises(TaskError, match="cancelled while pending"):
            early.result(30)
        # now the master knows what the workers offer and refuses at submit time
        late = cl.submit("os:system", f"touch {marker}")
        with pytest.raises(RemoteError) as info:
            late.result(30)
        assert info.value.code == "unknown_task"
        assert cl.submit(pf_testtasks.add, 2, 3).result(30) == 5
    assert not marker.exists()


class _Bomb:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickled_bytes_travel_as_inert_data(cluster: Cluster, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Bomb(str(marker)))
    with Client(cluster.client_endpoint) as cl:
        assert cl.submit("poolfleet.worker.builtins:echo", bomb).result(30) == bomb
        assert cl.with_options(kind="cpu").submit("poolfleet.worker.builtins:echo", bomb).result(30) == bomb
    assert not marker.exists()


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pickle_only_for_shipped_code_and_one_msgpack_user_in_the_package() -> None:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 20
    unsafe = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
    offenders = {
        str(p.relative_to(REPO)): sorted(_imports(p) & unsafe) for p in files if _imports(p) & unsafe
    }
    # the one exception, shipped code (off by default): the client pickles the function it
    # ships, and a worker started with --run-shipped-code unpickles it where the task runs
    assert offenders == {"client/shipping.py": ["cloudpickle"], "worker/shipped.py": ["cloudpickle"]}
    msgpack_users = [str(p.relative_to(REPO)) for p in files if "msgpack" in _imports(p)]
    assert msgpack_users == ["common/codec.py"]
    # and the codec never opens the ext-type door pickle-like schemes need: the one extension
    # type it reads is a task reference (16 bytes, a task id); any other is refused
    from poolfleet.common import codec
    from poolfleet.common.errors import DecodeError

    other = codec.msgpack.packb([[codec.msgpack.ExtType(2, b"x" * 16)], {}])
    with pytest.raises(DecodeError):
        codec.unpack(other)
    with pytest.raises(DecodeError):
        codec.refs_in(other)
    src = (REPO / "common" / "codec.py").read_text()
    assert "max_ext_len=_ID_BYTES if ext_hook is not None else 0" in src
