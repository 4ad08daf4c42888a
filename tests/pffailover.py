"""Two pmasters on one PostgreSQL journal, for the failover tests: start one as the active or
the standby master, read the journal's rows, collect what the masters acknowledged."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    wrap: list[str] | None = None,
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
    p = Proc(name, argv, c.tmp / f"{name}-{len(c.procs)}.log", daemon_env(pg.env), wrap=wrap or []).start()
    c.procs.append(p)
    ev = p.wait_event("master_started" if role == "active" else "master_standby", timeout=30)
    return p, ev["clients_endpoint"], ev["workers_endpoint"]


def journal_rows(pg: PgServer, db: str) -> dict[bytes, tuple[str, int]]:
    with psycopg.connect(pg.socket_url(db)) as conn:
        return {bytes(r[0]): (r[1], r[2]) for r in conn.execute("SELECT id, state, attempt FROM tasks")}


def acknowledged(futures: list[Any]) -> set[bytes]:
    """Ids of the tasks the master acknowledged (SUBMITTED after the commit that holds them)."""
    acks = {id(f.ack): f.ack for f in futures if f.ack is not None and f.ack.done()}
    ids: set[bytes] = set()
    for ack in acks.values():
        if ack.exception() is None:
            ids.update(ack.result().get("accepted", []))
    return ids


class MasterPair:
    """The failover scenario: masters ``a`` (active) and ``b`` (standby) on one database, two
    workers and a client that know both; ``run_through_failover`` makes ``a`` fail while
    3,000 tasks are under way and checks that every acknowledged task is recorded once."""

    def __init__(
        self,
        c: Cluster,
        pg: PgServer,
        db: str,
        endpoints: dict[str, tuple[str, str]] | None = None,
        wraps: dict[str, list[str]] | None = None,
    ) -> None:
        self.c, self.pg, self.db = c, pg, db
        local = ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
        self.endpoints = endpoints or {"a": local, "b": local}
        self.wraps = wraps or {}
        self.grace = ("--recovery-grace-s", "1.5")

    def _start(self, name: str, role: str, endpoints: tuple[str, str]) -> tuple[Proc, str, str]:
        clients, workers = endpoints
        return start_master(
            self.c,
            self.pg,
            self.db,
            f"pmaster-{name}",
            *self.grace,
            clients=clients,
            workers=workers,
            role=role,
            wrap=self.wraps.get(name[0]),
        )

    def start(self) -> None:
        self.a, self.a_clients, self.a_workers = self._start("a", "active", self.endpoints["a"])
        self.b, self.b_clients, self.b_workers = self._start("b", "standby", self.endpoints["b"])
        # each worker knows both masters, starting with a different one
        both, other = f"{self.a_workers},{self.b_workers}", f"{self.b_workers},{self.a_workers}"
        self.c.start_worker(name="wa", cpu=2, io=2, master=both, env=WORKER_ENV)
        self.c.start_worker(name="wb", cpu=2, io=2, master=other, env=WORKER_ENV, wait=False)
        # a standby answers clients with ERROR standby, naming the active master
        with Client(self.b_clients) as probe:
            try:
                probe.status(timeout_s=10)
                raise AssertionError("a standby answered STATUS")
            except Exception as exc:  # noqa: BLE001 - the remote error
                assert "standby" in str(exc) and self.a_clients in str(exc), exc

    def run_through_failover(self, fail: Callable[[], None], how: str) -> None:
        # the client knows both masters too: it follows the failover
        cl = Client(f"{self.a_clients},{self.b_clients}")
        futures: list[Any] = []
        try:
            for _ in range(30):
                futures += cl.submit_many(pf_testtasks.spin_for, [((0.005,), {}) for _ in range(100)])
            wait_for(lambda: sum(f.done() for f in futures) >= 500, timeout=60, what="500 results")
            acked = acknowledged(futures)
            failed_at = time.monotonic()
            fail()
            self.b.wait_event("lease_acquired", timeout=LEASE_S + 20)
            took_over_s = time.monotonic() - failed_at
            self.b.wait_event("master_started", timeout=10)
            serving_s = time.monotonic() - failed_at
            acked |= acknowledged(futures)  # acknowledgements that arrived just before the failure
            # every future resolves across the failover: unacknowledged submits were sent again
            # to the new master (ids make them idempotent), waits for results renewed there
            values = [f.result(90) for f in futures]
            backlog_s = time.monotonic() - failed_at
            assert all(isinstance(v, int) for v in values)
            assert len(acknowledged(futures)) == len(futures) == 3000
        finally:
            cl.shutdown(wait=False, cancel_futures=False)
        assert len(acked) >= 500

        # the standby recovered the journal and runs what was left; every acknowledged task is
        # recorded, once, as SUCCEEDED
        with Client(self.b_clients) as cl2:
            wait_for(
                lambda: cl2.status()["counts"].get("SUCCEEDED", 0) >= len(acked), timeout=90, what="all done"
            )
            assert cl2.submit(pf_testtasks.add, 2, 3).result(30) == 5
            ran_new_s = time.monotonic() - failed_at
            counts = cl2.status()["counts"]
            left = [format_id(t) for t in acked]
            results = cl2.results(left[:200])
            assert all(r is not None and r["state"] == "SUCCEEDED" for r in results.values())
        rows = journal_rows(self.pg, self.db)
        assert acked <= set(rows)
        assert {rows[t][0] for t in acked} == {"SUCCEEDED"}
        succeeded = sum(1 for state, _ in rows.values() if state == "SUCCEEDED")
        assert counts["SUCCEEDED"] == succeeded  # the master's count is the journal's: no double count
        assert counts.get("PENDING", 0) == 0 and counts.get("RUNNING", 0) == 0
        print(
            f"\nfailover ({how}, lease {LEASE_S} s, heartbeat {HEARTBEAT_S} s): lease taken over after "
            f"{took_over_s:.2f} s, serving after {serving_s:.2f} s, a new task done "
            f"{ran_new_s:.2f} s after the failure ({backlog_s:.2f} s until every future had its "
            f"result); {len(acked)} acknowledged tasks, all SUCCEEDED once"
        )

    def restart_old_active(self) -> None:
        """The old active master, started again on its endpoints, is the standby now."""
        again, _, _ = self._start("a2", "standby", (self.a_clients, self.a_workers))
        assert again.alive() and self.b.alive()
