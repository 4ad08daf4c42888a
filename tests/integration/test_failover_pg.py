"""Two pmasters on one PostgreSQL journal: one active, one standby; kill -9 of the active and
SIGSTOP/SIGCONT of it past its lease. Real daemons, a real PostgreSQL server."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pf_testtasks
import psycopg
from pfharness import BIN, Cluster, Proc, daemon_env, wait_for
from pfpostgres import PgServer

from poolfleet.client import Client
from poolfleet.common.ids import format_id

HEARTBEAT_S = 0.2
LEASE_S = 1.0
#: workers come back to a master quickly (their default backoff tops out at 5 s)
WORKER_ENV = {"POOLFLEET_WORKER_RECONNECT_MAX_S": "0.5"}


def start_master(
    c: Cluster,
    pg: PgServer,
    db: str,
    name: str,
    *args: str,
    clients: str = "tcp://127.0.0.1:0",
    workers: str = "tcp://127.0.0.1:0",
    role: str = "active",
) -> tuple[Proc, str, str]:
    """Start a pmaster on the PostgreSQL journal ``db``; wait until it is ``role`` (active:
    master_started, standby: master_standby); return it and its two endpoints."""
    argv = [
        str(BIN / "pmaster"),
        "--journal",
        pg.url(db),
        "--lease-s",
        str(LEASE_S),
        "--clients",
        clients,
        "--workers",
        workers,
        "--data-dir",
        str(c.tmp / f"data-{name}"),
        "--heartbeat-interval-s",
        str(HEARTBEAT_S),
        "--liveness",
        "3",
        *args,
    ]
    p = Proc(name, argv, c.tmp / f"{name}-{len(c.procs)}.log", daemon_env(pg.env)).start()
    c.procs.append(p)
    ev = p.wait_event("master_started" if role == "active" else "master_standby", timeout=30)
    return p, ev["clients_endpoint"], ev["workers_endpoint"]


def journal_rows(pg: PgServer, db: str) -> dict[bytes, tuple[str, int]]:
    with psycopg.connect(pg.local_url(db)) as conn:
        return {bytes(r[0]): (r[1], r[2]) for r in conn.execute("SELECT id, state, attempt FROM tasks")}


def acknowledged(futures: list[Any]) -> set[bytes]:
    """Ids of the tasks the master acknowledged (SUBMITTED after the commit that holds them)."""
    acks = {id(f.ack): f.ack for f in futures if f.ack is not None and f.ack.done()}
    ids: set[bytes] = set()
    for ack in acks.values():
        if ack.exception() is None:
            ids.update(ack.result().get("accepted", []))
    return ids


def test_kill9_of_the_active_master_the_standby_takes_over(
    make_cluster: type[Cluster], pg_server: PgServer
) -> None:
    db = pg_server.new_database()
    c = make_cluster(heartbeat_s=HEARTBEAT_S)
    grace = ("--recovery-grace-s", "1.5")
    a, a_clients, a_workers = start_master(c, pg_server, db, "pmaster-a", *grace)
    b, b_clients, b_workers = start_master(c, pg_server, db, "pmaster-b", *grace, role="standby")
    # each worker knows both masters, starting with a different one
    c.start_worker(name="wa", cpu=2, io=2, master=f"{a_workers},{b_workers}", env=WORKER_ENV)
    c.start_worker(name="wb", cpu=2, io=2, master=f"{b_workers},{a_workers}", env=WORKER_ENV, wait=False)

    # a standby answers clients with ERROR standby, naming the active master
    with Client(b_clients) as probe:
        try:
            probe.status(timeout_s=10)
            raise AssertionError("a standby answered STATUS")
        except Exception as exc:  # noqa: BLE001 - the remote error
            assert "standby" in str(exc) and a_clients in str(exc), exc

    # the client knows both masters too: it follows the failover
    cl = Client(f"{a_clients},{b_clients}")
    futures: list[Any] = []
    try:
        for _ in range(30):
            futures += cl.submit_many(pf_testtasks.spin_for, [((0.005,), {}) for _ in range(100)])
        wait_for(lambda: sum(f.done() for f in futures) >= 500, timeout=60, what="500 results")
        acked = acknowledged(futures)
        killed_at = time.monotonic()
        a.kill()
        b.wait_event("lease_acquired", timeout=LEASE_S + 10)
        took_over_s = time.monotonic() - killed_at
        b.wait_event("master_started", timeout=10)
        serving_s = time.monotonic() - killed_at
        acked |= acknowledged(futures)  # acknowledgements that arrived just before the kill
        # every future resolves across the failover: unacknowledged submits were sent again to
        # the new master (ids make them idempotent), waits for results renewed there
        values = [f.result(90) for f in futures]
        backlog_s = time.monotonic() - killed_at
        assert all(isinstance(v, int) for v in values)
        assert len(acknowledged(futures)) == len(futures) == 3000
    finally:
        cl.shutdown(wait=False, cancel_futures=False)
    assert len(acked) >= 500

    # the standby recovered the journal and runs what was left; every acknowledged task is
    # recorded, once, as SUCCEEDED
    with Client(b_clients) as cl2:
        wait_for(
            lambda: cl2.status()["counts"].get("SUCCEEDED", 0) >= len(acked), timeout=90, what="all done"
        )
        assert cl2.submit(pf_testtasks.add, 2, 3).result(30) == 5
        ran_new_s = time.monotonic() - killed_at
        counts = cl2.status()["counts"]
        left = [format_id(t) for t in acked]
        results = cl2.results(left[:200])
        assert all(r is not None and r["state"] == "SUCCEEDED" for r in results.values())
    rows = journal_rows(pg_server, db)
    assert acked <= set(rows)
    assert {rows[t][0] for t in acked} == {"SUCCEEDED"}
    succeeded = sum(1 for state, _ in rows.values() if state == "SUCCEEDED")
    assert counts["SUCCEEDED"] == succeeded  # the master's count is the journal's: no double count
    assert counts.get("PENDING", 0) == 0 and counts.get("RUNNING", 0) == 0
    print(
        f"\nfailover (kill -9, lease {LEASE_S} s, heartbeat {HEARTBEAT_S} s): lease taken over after "
        f"{took_over_s:.2f} s, serving after {serving_s:.2f} s, a new task done "
        f"{ran_new_s:.2f} s after the kill ({backlog_s:.2f} s until every future had its result); "
        f"{len(acked)} acknowledged tasks, all SUCCEEDED once"
    )

    # the old master, started again on its endpoints, is the standby now
    again, _, _ = start_master(
        c, pg_server, db, "pmaster-a2", *grace, clients=a_clients, workers=a_workers, role="standby"
    )
    assert again.alive() and b.alive()


def test_a_paused_active_master_writes_nothing_and_steps_down(
    make_cluster: type[Cluster], pg_server: PgServer, tmp_path: Path
) -> None:
    db = pg_server.new_database()
    c = make_cluster(heartbeat_s=HEARTBEAT_S)
    a, a_clients, a_workers = start_master(c, pg_server, db, "pmaster-a")
    # the standby never requeues what it recovered during this test: its journal writes stay
    # out of the picture, and every row change would be the paused master's
    b, _, _ = start_master(c, pg_server, db, "pmaster-b", "--recovery-grace-s", "600", role="standby")
    c.start_worker(name="wa", cpu=1, io=4, master=a_workers, env=WORKER_ENV)
    cl = Client(a_clients)
    try:
        assert cl.submit(pf_testtasks.add, 1, 2).result(30) == 3
        slow = [cl.submit(pf_testtasks.io_sleep, 1.0) for _ in range(4)]
        wait_for(lambda: all(f.ack is not None and f.ack.done() for f in slow), timeout=10, what="acks")
        a.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            b.wait_event("lease_acquired", timeout=LEASE_S + 15)
            took_over_s = time.monotonic() - stopped_at
            before = journal_rows(pg_server, db)
            # the worker finished the slow tasks meanwhile: it holds their results for the master
        finally:
            a.signal(signal.SIGCONT)
        lost = a.wait_event("lease_lost", timeout=20)
        assert a.wait(20) == 3
    finally:
        cl.shutdown(wait=False, cancel_futures=False)  # its slow tasks are the standby's now
    assert "stale" in lost["reason"], lost
    after = journal_rows(pg_server, db)
    assert after == before  # the resumed master wrote nothing: its results never reached the journal
    assert sum(1 for s, _ in after.values() if s == "SUCCEEDED") == 1
    assert b.alive()
    print(
        f"\nfailover (SIGSTOP, lease {LEASE_S} s): the standby took the lease {took_over_s:.2f} s after the stop"
    )
