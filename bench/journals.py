"""The PostgreSQL journal against the SQLite one: the same master and worker, no-op
throughput and round trips, on a throwaway PostgreSQL server on loopback (bench/pgserver.py),
the two journals' runs alternating so both see the same load."""

from __future__ import annotations

import os
from collections.abc import Callable

from bench import fleet
from bench.daemons import BenchCluster
from bench.pgserver import PgServer, PgUnavailable, running_server
from bench.report import Row
from bench.stats import median, percentile, spread

Say = Callable[[str], None]


def _measure(cluster: BenchCluster, n_noop: int, n_rtt: int, into: dict[str, list[float]]) -> None:
    client = fleet.Client(cluster.client_endpoint)
    try:
        client.status()
        fleet.warm_up(client)
        into["noop"].append(fleet.throughput(client, n_noop))
        rt = fleet.round_trips(client, n_rtt)
        into["p50"].append(percentile(rt, 50))
        into["p99"].append(percentile(rt, 99))
    finally:
        client.close()


def _cluster(journal: list[str]) -> BenchCluster:
    cluster = BenchCluster(tuple(journal))
    try:
        cluster.add_worker(cpu=2, io=50)
    except BaseException:
        cluster.close()
        raise
    return cluster


def _pair(pg: PgServer, repeat: int, n_noop: int, n_rtt: int, say: Say) -> dict[str, dict[str, list[float]]]:
    got: dict[str, dict[str, list[float]]] = {
        j: {"noop": [], "p50": [], "p99": []} for j in ("sqlite", "postgresql")
    }
    os.environ["PGPASSFILE"] = str(pg.passfile)  # the daemons inherit it: no password in the URL
    for i in range(repeat):
        say(f"journals: run {i + 1} of {repeat}")
        for name, journal in (("sqlite", []), ("postgresql", ["--journal", pg.url(pg.new_database())])):
            with _cluster(journal) as cluster:
                _measure(cluster, n_noop, n_rtt, got[name])
    return got


def run(repeat: int, n_noop: int, n_rtt: int, say: Say) -> tuple[list[Row], list[str]]:
    """Rows comparing the PostgreSQL journal (poolfleet column) with SQLite (yardstick column)."""
    try:
        with running_server() as pg:
            version = pg.version()
            got = _pair(pg, repeat, n_noop, n_rtt, say)
    except PgUnavailable as exc:
        say(f"journals: skipped ({exc})")
        return [], [f"The PostgreSQL journal run was skipped: {exc}."]
    pg_, lite = got["postgresql"], got["sqlite"]
    ratio = [a / median(lite["noop"]) for a in pg_["noop"]]
    rows = [
        Row(
            f"PostgreSQL journal: no-op throughput, {n_noop:,} tasks (SQLite journal in the 2nd column)",
            spread(pg_["noop"]) + " tasks/s",
            spread(lite["noop"]) + " tasks/s",
            spread(ratio, 2) + "x",
            "report",
            None,
        ),
        Row(
            f"PostgreSQL journal: round trip p50 / p99, {n_rtt} sequential (SQLite in the 2nd column)",
            f"{spread(pg_['p50'], 3)} / {spread(pg_['p99'], 3)} ms",
            f"{spread(lite['p50'], 3)} / {spread(lite['p99'], 3)} ms",
            "-",
            "report",
            None,
        ),
    ]
    note = (
        f"Journals: {version} on loopback, started by the benchmark in a temporary directory with "
        "fsync=off (as the tests start it; a server that syncs adds its commit time to each "
        "loop turn of the master); one master and one worker (2 cpu, 50 io) per journal, the "
        "two journals' runs alternating."
    )
    return rows, [note]
