"""The active master's host cut off from the database: the PostgreSQL server and the two
masters each on a host of their own (network namespaces), the workers and the client on this
one, reaching the masters over ipc sockets. Pulling the active master's cable leaves it unable
to renew its lease: it must stop acknowledging and step down, and the standby takes over.

    [db 10.251.0.1] --+
    [ma 10.251.0.2] --+-- br0 (the switch)      workers, client --ipc-- ma, mb
    [mb 10.251.0.3] --+
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pffailover import HEARTBEAT_S, MasterPair
from pfharness import Cluster
from pfnetns import Network, require_netns
from pfpostgres import PgServer, server_for_tests

from poolfleet.master.server import EXIT_LEASE_LOST

HOSTS = {"db": "10.251.0.1", "ma": "10.251.0.2", "mb": "10.251.0.3"}

pytestmark = pytest.mark.system


@pytest.fixture
def net() -> Iterator[Network]:
    require_netns()
    n = Network(HOSTS)
    try:
        n.create()
        yield n
    finally:
        n.destroy()


@pytest.fixture
def pg_on_its_host(net: Network) -> Iterator[PgServer]:
    with server_for_tests(HOSTS["db"], net.wrap("db")) as server:
        yield server


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for the ipc sockets (their paths are limited to about 100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pf-ipc-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_active_master_cut_off_from_the_database_steps_down(
    make_cluster: type[Cluster], net: Network, pg_on_its_host: PgServer, sockets: Path
) -> None:
    c = make_cluster(heartbeat_s=HEARTBEAT_S)
    endpoints = {m: (f"ipc://{sockets}/{m}-clients", f"ipc://{sockets}/{m}-workers") for m in "ab"}
    pair = MasterPair(
        c,
        pg_on_its_host,
        pg_on_its_host.new_database(),
        endpoints=endpoints,
        wraps={"a": net.wrap("ma"), "b": net.wrap("mb")},
    )
    pair.start()

    def cut() -> None:
        net.set_link("ma", up=False)

    pair.run_through_failover(cut, "the active master's host cut off from the database")
    # the cut-off master noticed by itself that its lease could not be renewed, and stopped
    lost = pair.a.wait_event("lease_lost", timeout=30)
    assert pair.a.wait(30) == EXIT_LEASE_LOST, lost
    # its host back on the network, it is started again and becomes the standby
    net.set_link("ma", up=True)
    pair.restart_old_active()
