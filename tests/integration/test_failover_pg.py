"""Two pmasters on one PostgreSQL journal: one active, one standby; kill -9 of the active and
SIGSTOP/SIGCONT of it past its lease. Real daemons, a real PostgreSQL server."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pf_testtasks
from pffailover import HEARTBEAT_S, LEASE_S, WORKER_ENV, MasterPair, journal_rows, start_master
from pfharness import Cluster, wait_for
from pfpostgres import PgServer

from poolfleet.client import Client


def test_kill9_of_the_active_master_the_standby_takes_over(
    make_cluster: type[Cluster], pg_server: PgServer
) -> None:
    c = make_cluster(heartbeat_s=HEARTBEAT_S)
    pair = MasterPair(c, pg_server, pg_server.new_database())
    pair.start()
    pair.run_through_failover(pair.a.kill, "kill -9")
    pair.restart_old_active()


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
