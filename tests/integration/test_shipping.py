"""Shipped code against real daemons: functions defined in __main__, lambdas and closures run
on workers started with --run-shipped-code, for trusted clients only, sent once per function.

The functions shipped from this module are closures (defined inside the tests), so cloudpickle
ships them by value; they refer to nothing of this module, which workers cannot import.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import cloudpickle
import pf_testtasks
import pytest
from pfharness import BIN, Cluster, daemon_env, wait_for
from pfseed import IN_MAIN

from poolfleet.client import Client, Pool, PoolfleetError, RemoteError, TaskError, TaskLostError, TaskTimeout
from poolfleet.common.protocol import MsgKind, TaskState
from poolfleet.common.shipping import SHIPPED_ROUTE, digest_of, python_version

SHIP = "--run-shipped-code"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A master on loopback without keys, a worker that runs shipped code and one that does not."""
    c = Cluster(tmp_path_factory.mktemp("shipping"))
    try:
        c.start_master()
        c.start_worker(SHIP, name="ws", cpu=2, io=2)
        c.start_worker(name="wp", cpu=2, io=2)
        yield c
    finally:
        c.close()


def code_counters(client: Client) -> dict[str, int]:
    return dict(client.status()["code"])


def run_script(c: Cluster, path: Path, text: str, ship: bool = True) -> subprocess.CompletedProcess[str]:
    path.write_text(text)
    env = daemon_env({"POOLFLEET_MASTER": c.client_endpoint, "POOLFLEET_SHIP_CODE": "1" if ship else "0"})
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=120)


# -- the seed's example, lambdas, closures ------------------------------------------------------
def test_seed_example_runs_as_a_script_with_only_its_import_changed(fleet: Cluster, tmp_path: Path) -> None:
    r = run_script(fleet, tmp_path / "seed_example.py", IN_MAIN)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1:4] == ["subprocess Start", "before close", "All subprocess done"]
    assert lines[4:] == [f"hello {i}" for i in range(10)]
    # run in the pool children of the worker that runs shipped code, never on the other one
    ws, wp = fleet.workers
    assert "Run task 0" in ws.log_path.read_text() and "Run task" not in wp.log_path.read_text()


def test_without_opting_in_the_seed_example_fails_at_submit_saying_how_to_ship(
    fleet: Cluster, tmp_path: Path
) -> None:
    r = run_script(fleet, tmp_path / "seed_example.py", IN_MAIN, ship=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "__main__" in last and "POOLFLEET_SHIP_CODE=1" in last and SHIP in last


MAIN_SCRIPT = """\
from poolfleet.client import Pool, TaskError


class Oops(Exception):
    pass


def fails(x):
    raise Oops(f"no {x}")


if __name__ == '__main__':
    k = 3
    data = {"a": 1, "b": 2}
    with Pool(2) as p:
        print(p.map(lambda x: x * k, range(5)))
        print(p.map(lambda key: data[key] * 10, ["a", "b"]))
        try:
            p.apply(fails, (7,))
        except Oops as e:
            print("caught", type(e).__name__, isinstance(e, TaskError), e.type, e)
"""


def test_lambda_closure_and_an_exception_type_defined_in_main(fleet: Cluster, tmp_path: Path) -> None:
    r = run_script(fleet, tmp_path / "main_script.py", MAIN_SCRIPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[0, 3, 6, 9, 12]",
        "[10, 20]",
        "caught Oops True __main__.Oops no 7",
    ]


def test_closures_and_lambdas_in_pool_map_apply_async_and_submit(fleet: Cluster) -> None:
    offset = 1000
    table = {i: i * i for i in range(20)}

    def lookup(i: int) -> int:
        return table[i] + offset

    with Pool(client=fleet.client(ship_code=True)) as pool:
        assert pool.map(lookup, range(20)) == [i * i + 1000 for i in range(20)]
        assert pool.map(lambda x: -x, range(7), chunksize=3) == [-x for x in range(7)]
        assert pool.starmap(lambda a, b: a * b, [(2, 3), (4, 5)]) == [6, 20]
        assert pool.apply_async(lookup, (4,)).get(60) == 1016
        assert sorted(pool.imap_unordered(lambda x: x + 1, range(5))) == [1, 2, 3, 4, 5]
    client = fleet.client(ship_code=True)
    f = client.submit(lambda: "ran")
    assert f.result(60) == "ran"
    assert f.info["worker_id"] == "ws"  # never routed to the worker that does not run shipped code


def test_the_function_travels_once_for_a_thousand_tasks(fleet: Cluster) -> None:
    client = fleet.client(ship_code=True)
    before = code_counters(client)
    salt = os.urandom(8).hex()  # a function no earlier test shipped

    def tagged(i: int) -> str:
        return f"{salt}-{i}"

    futures = [client.submit(tagged, i) for i in range(1000)]
    assert [f.result(120) for f in futures] == [f"{salt}-{i}" for i in range(1000)]
    after = code_counters(client)
    # counted on the wire: one CODE_PUT from the client, one function in CODE_BLOBS to the worker
    assert client.shipper.sent == 1
    assert after["received"] - before["received"] == 1
    assert after["stored"] - before["stored"] == 1
    assert after["sent"] - before["sent"] == 1
    name = client.name_of(tagged)
    fetched = [
        e
        for e in fleet.workers[0].events("code_fetched")
        if name.startswith(f"poolfleet.shipped.h{e['hash']}")
    ]
    assert len(fetched) == 1
    # a function the workers import by name is never shipped
    assert client.submit(pf_testtasks.add, 2, 3).result(60) == 5
    assert client.shipper.sent == 1


def test_kinds_timeouts_cancels_and_child_deaths_as_for_any_task(fleet: Cluster) -> None:
    client = fleet.client(ship_code=True)
    worker_pid = fleet.workers[0].pid
    cpu_pid = client.submit(lambda: os.getpid()).result(60)
    io_pid = client.with_options(kind="io").submit(lambda: os.getpid()).result(60)
    assert cpu_pid != worker_pid and io_pid == worker_pid  # a pool child; the worker's threads

    import time as _time

    with pytest.raises(TaskTimeout):
        client.with_options(timeout_s=0.5).submit(lambda: _time.sleep(60)).result(60)
    with pytest.raises(TaskLostError, match="died"):
        client.submit(lambda: os._exit(3)).result(60)
    slow = client.submit(lambda: _time.sleep(60))
    wait_for(lambda: client.results([slow.task_id])[slow.task_id]["state"] == "RUNNING", timeout=30)
    client.cancel([slow.task_id])
    with pytest.raises((CancelledError, TaskError)):
        slow.result(60)
    assert client.results([slow.task_id])[slow.task_id]["state"] == TaskState.CANCELLED


def test_bad_functions_fail_at_submit_with_the_reason(fleet: Cluster) -> None:
    client = fleet.client(ship_code=True)
    lock = threading.Lock()
    with pytest.raises(PoolfleetError, match=r"cannot ship function .*cloudpickle failed: TypeError.*lock"):
        client.submit(lambda: lock.locked())
    big = os.urandom(10 << 20)
    with pytest.raises(PoolfleetError, match=r"pickles to 10,4\d\d,\d\d\d bytes.*max_code_bytes=1,048,576"):
        client.submit(lambda: len(big))
    # the master's own limit holds against a client that sets a bigger one
    roomy = fleet.client(ship_code=True, max_code_bytes=16 << 20)
    medium = os.urandom(2 << 20)
    with pytest.raises(RemoteError, match="more than this master's limit") as info:
        roomy.submit(lambda: len(medium))
    assert info.value.code == "code_too_large"
    assert client.submit(lambda: "still serving").result(60) == "still serving"


# -- routing, version skew, restart -------------------------------------------------------------
def put_code(client: Client, blob: bytes, python: str, cloudpickle_version: str) -> dict[str, Any]:
    """A handcrafted CODE_PUT, claiming the versions given."""
    body = {"hash": digest_of(blob), "blob": blob, "python": python, "cloudpickle": cloudpickle_version}
    return dict(client._conn.request(MsgKind.CODE_PUT, body).result(30))


def test_shipped_tasks_wait_for_a_worker_that_runs_shipped_code_and_skew_is_refused(
    make_cluster: type[Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="plain")
    client = c.client(ship_code=True)
    with caplog.at_level(logging.WARNING, logger="poolfleet.client"):
        waiting = client.submit(lambda: "finally")
    assert "no_worker_runs_shipped_code" in caplog.text
    # accepted while no worker that runs shipped code can say otherwise; the worker refuses it
    skewed_blob = cloudpickle.dumps(lambda: "never")
    assert put_code(client, skewed_blob, "2.7", cloudpickle.__version__)["workers"] == 0
    skewed = client.submit(f"poolfleet.shipped.h{digest_of(skewed_blob).hex()}:old")
    unserved = [{"name": SHIPPED_ROUTE, "queue": "default", "kind": "cpu", "pending": 2}]
    wait_for(lambda: client.status()["unserved"] == unserved, what="both tasks listed as unserved")
    assert not waiting.done()
    c.start_worker(SHIP, name="shipper")
    assert waiting.result(60) == "finally"
    with pytest.raises(TaskError) as err:
        skewed.result(60)
    assert err.value.type == "VersionSkew"
    assert f"Python 2.7 (cloudpickle {cloudpickle.__version__})" in str(err.value)
    assert f"Python {python_version()}" in str(err.value)
    # with that worker connected, the master refuses such a function at once, naming both
    with pytest.raises(RemoteError, match=f"Python 2.7.*Python {python_version()}") as refused:
        put_code(client, cloudpickle.dumps(lambda: "older"), "2.7", cloudpickle.__version__)
    assert refused.value.code == "code_version"


def test_a_restarted_master_still_holds_the_shipped_functions(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    master = c.start_master()
    c.start_worker(SHIP, name="shipper")
    blob = cloudpickle.dumps(lambda x: x * 2)
    client = c.client()
    assert put_code(client, blob, python_version(), cloudpickle.__version__)["stored"] is True
    client.shutdown()
    master.signal(15)
    assert master.wait() == 0
    c.restart_master()
    after = c.client()
    name = f"poolfleet.shipped.h{digest_of(blob).hex()}:double"
    assert after.submit(name, 21).result(60) == 42  # from the journal: the worker never had it
    assert after.status()["code"]["sent"] == 1


def test_a_worker_refuses_shipped_code_without_keys_for_a_master_elsewhere(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "pworker"), "--master", "tcp://192.0.2.7:5556", SHIP],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert "without CurveZMQ keys" in r.stderr and "--curve-server-key" in r.stderr
    assert "--trusted-client-keys" in r.stderr


# -- keys: trusted and untrusted clients -------------------------------------------------------
def make_key(directory: Path, name: str) -> None:
    r = subprocess.run(
        [str(BIN / "ptask"), "keys", "generate", str(directory), "--name", name],
        capture_output=True,
        text=True,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr


@pytest.fixture
def keyed(make_cluster: type[Cluster], tmp_path: Path) -> tuple[Cluster, Path]:
    """A keyed cluster: clients alice and bob may connect, only alice may ship code."""
    made = tmp_path / "keys"
    for name in ("master", "worker", "alice", "bob"):
        make_key(made, name)
    dirs = {d: tmp_path / d for d in ("workers", "clients", "trusted")}
    for d in dirs.values():
        d.mkdir()
    shutil.copy(made / "worker.key", dirs["workers"])
    shutil.copy(made / "alice.key", dirs["clients"])
    shutil.copy(made / "bob.key", dirs["clients"])
    shutil.copy(made / "alice.key", dirs["trusted"])
    c = make_cluster()
    c.start_master(
        "--curve-secret-key",
        str(made / "master.key_secret"),
        "--curve-workers-dir",
        str(dirs["workers"]),
        "--curve-clients-dir",
        str(dirs["clients"]),
        "--trusted-client-keys",
        str(dirs["trusted"]),
    )
    c.start_worker(
        SHIP,
        "--curve-server-key",
        str(made / "master.key"),
        "--curve-secret-key",
        str(made / "worker.key_secret"),
        name="keyed",
    )
    return c, made


def keyed_client(c: Cluster, made: Path, name: str) -> Client:
    return c.client(
        curve_server_key=str(made / "master.key"),
        curve_secret_key=str(made / f"{name}.key_secret"),
        ship_code=True,
    )


def test_with_keys_only_trusted_clients_ship_code(keyed: tuple[Cluster, Path]) -> None:
    c, made = keyed
    alice, bob = keyed_client(c, made, "alice"), keyed_client(c, made, "bob")
    shipped = alice.submit(lambda: "from alice")
    assert shipped.result(60) == "from alice"
    # recorded with the task: which trusted key shipped it
    db = sqlite3.connect(str(c.data_dir / "journal.sqlite3"))
    try:
        row = db.execute("SELECT shipped_by FROM tasks WHERE id = ?", (shipped.id_bytes,)).fetchone()
    finally:
        db.close()
    assert row == ("alice.key",)
    # bob may connect and run named tasks, but not ship code: a clear error at submit
    assert bob.submit(pf_testtasks.add, 1, 2).result(60) == 3
    with pytest.raises(RemoteError, match="not among the trusted client keys") as refused:
        bob.submit(lambda: "from bob")
    assert refused.value.code == "code_refused" and "--tasks" in str(refused.value)
    # nor submit tasks of a function alice shipped, by its name
    name = alice.name_of(lambda: "alice's")
    with pytest.raises(RemoteError, match="not among the trusted client keys") as by_name:
        bob.submit(name).result(60)
    assert by_name.value.code == "code_refused"


def test_with_keys_and_no_trusted_directory_nobody_ships(make_cluster: type[Cluster], tmp_path: Path) -> None:
    made = tmp_path / "keys"
    for name in ("master", "alice"):
        make_key(made, name)
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(made / "alice.key", clients)
    c = make_cluster()
    c.start_master(
        "--curve-secret-key",
        str(made / "master.key_secret"),
        "--curve-workers-dir",
        str(clients),
        "--curve-clients-dir",
        str(clients),
    )
    alice = keyed_client(c, made, "alice")
    with pytest.raises(RemoteError, match=r"trusts no client to ship code.*--trusted-client-keys DIR"):
        alice.submit(lambda: 1)


# -- the journals keep shipped functions and who shipped each task ------------------------------
def check_journal_keeps_code(journal: Any, read_shipped_by: Any) -> None:
    blob = b"a pickled function"
    task = bytes(range(16))
    journal.stage_insert(task, "poolfleet.shipped.h00:f", "default", "cpu", b"\x92\x90\x80", None, None, 1.0)
    journal.stage_shipped_by(task, "alice.key")
    journal.stage_code(digest_of(blob), blob, "3.11", "3.1.1", "alice.key", 1.0)
    assert journal.load_code(digest_of(blob)) is None  # nothing before the commit
    journal.commit()
    assert journal.load_code(digest_of(blob)) == (blob, "3.11", "3.1.1", "alice.key")
    assert journal.load_code(digest_of(b"other")) is None
    assert read_shipped_by(task) == "alice.key"


def test_the_sqlite_journal_keeps_shipped_code(tmp_path: Path) -> None:
    from poolfleet.master.journal import SqliteJournal

    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    try:
        check_journal_keeps_code(journal, journal.shipped_by)
    finally:
        journal.close()


def test_the_postgres_journal_keeps_shipped_code(pg_url: str) -> None:
    import psycopg

    from poolfleet.master.journal_pg import PostgresJournal

    journal = PostgresJournal(pg_url, "m1", 30.0)
    assert journal.try_acquire("tcp://c", "tcp://w")

    def shipped_by(task: bytes) -> str | None:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT shipped_by FROM tasks WHERE id = %s", (task,)).fetchone()
        return None if row is None else row[0]

    try:
        check_journal_keeps_code(journal, shipped_by)
    finally:
        journal.close()


def test_a_master_on_a_new_journal_is_sent_the_function_again(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    master = c.start_master()
    c.start_worker(SHIP, name="shipper")
    client = c.client(ship_code=True)

    def triple(x: int) -> int:
        return 3 * x

    assert client.submit(triple, 2).result(60) == 6
    master.signal(15)
    assert master.wait() == 0
    shutil.rmtree(c.data_dir)  # the functions it held are gone with its journal
    c.restart_master()
    with pytest.raises(RemoteError) as lost:
        client.submit(triple, 3).result(60)
    assert lost.value.code == "code_unknown"
    assert client.submit(triple, 4).result(60) == 12  # sent again
    assert client.shipper.sent == 2
