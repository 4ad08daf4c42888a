"""Several hosts: a master host and two worker hosts in network namespaces of their own.

    [master 10.250.0.1] --+
    [w1     10.250.0.2] --+-- br0 (a fourth namespace: the switch)
    [w2     10.250.0.3] --+

Every address lives only in namespaces this test creates, so no packet leaves
them. The daemons are the real ones (``ip netns exec NS pmaster ...``); the
master binds its namespace's address, which is not loopback, so it runs with
--insecure. Clients run on the master host and on a worker host. Cutting w2's
link at the switch makes the master expire w2 and rerun its tasks on w1;
restoring the link makes w2 reconnect and take work again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pfharness import Cluster, Proc, daemon_env
from pfnetns import Network, require_netns

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "fleet_client.py"
SUBNET = "10.250.0"
HOSTS = {"master": f"{SUBNET}.1", "w1": f"{SUBNET}.2", "w2": f"{SUBNET}.3"}
HEARTBEAT_S = 0.2
LIVENESS = 3

pytestmark = pytest.mark.system


class Fleet:
    def __init__(self, net: Network, cluster: Cluster) -> None:
        self.net = net
        self.cluster = cluster
        self.clients_endpoint = f"tcp://{HOSTS['master']}:5555"
        self.workers_endpoint = f"tcp://{HOSTS['master']}:5556"
        self._n = 0

    def start(self) -> None:
        c = self.cluster
        c.start_master(
            "--insecure",
            clients=self.clients_endpoint,
            workers=self.workers_endpoint,
            wrap=self.net.wrap("master"),
        )
        assert c.client_endpoint == self.clients_endpoint
        for host in ("w1", "w2"):
            c.start_worker(
                name=f"worker-{host}",
                master=self.workers_endpoint,
                tasks=("pf_testtasks", "pf_nettasks"),
                cpu=1,
                io=4,
                wrap=self.net.wrap(host),
                # Retry the master often, so a restored link is noticed quickly.
                env={"POOLFLEET_WORKER_RECONNECT_MAX_S": "0.5"},
            )

    def client(self, host: str, *args: str) -> Proc:
        """A client process on ``host``, submitting to the master over the network."""
        self._n += 1
        argv = [sys.executable, str(CLIENT), "--master", self.clients_endpoint, *args]
        p = Proc(
            f"client{self._n}@{host}",
            argv,
            self.cluster.tmp / f"client{self._n}-{host}.log",
            daemon_env(),
            wrap=self.net.wrap(host),
        )
        self.cluster.procs.append(p.start())
        return p

    def run_client(self, host: str, *args: str, timeout: float = 60) -> list[dict[str, Any]]:
        p = self.client(host, *args)
        rc = p.wait(timeout)
        assert rc == 0, f"{p.name} exited {rc}:\n{p.log_tail()}"
        return p.events("result")


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    require_netns()
    net = Network(HOSTS)
    cluster = Cluster(tmp_path, heartbeat_s=HEARTBEAT_S, liveness=LIVENESS)
    try:
        net.create()
        yield Fleet(net, cluster)
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            sys.stderr.write(cluster.dump_logs())
        cluster.close()
        net.destroy()


def locate_args(seconds: float) -> list[str]:
    return ["--task", "pf_nettasks:locate", "--args", json.dumps([HOSTS["master"], seconds])]


def test_tasks_run_on_both_worker_hosts_and_survive_a_cut_link(fleet: Fleet) -> None:
    fleet.start()
    worker_hosts = {HOSTS["w1"]: "worker-w1", HOSTS["w2"]: "worker-w2"}

    # Clients on the master host and on a worker host; tasks run on both worker hosts.
    for host in ("master", "w1"):
        results = fleet.run_client(host, *locate_args(0.05), "--count", "24", "--wait-workers", "2")
        assert len(results) == 24 and all(r["ok"] for r in results)
        by_address = {r["value"]["address"]: r["worker_id"] for r in results}
        assert by_address == worker_hosts, f"client on {host}: {by_address}"

    # Cut w2's link while it runs tasks: the master expires it and reruns them on w1.
    master, w2 = fleet.cluster.master, fleet.cluster.workers[1]
    assert master is not None
    batch = fleet.client("master", *locate_args(0.5), "--count", "24", "--wait-workers", "2")
    batch.wait_event("result", where=lambda e: e["worker_id"] == "worker-w2", timeout=30)
    fleet.net.set_link("w2", up=False)
    expired = master.wait_event("worker_expired", where=lambda e: e["worker_id"] == "worker-w2", timeout=20)
    assert expired["tasks"] > 0, expired
    w2.wait_event("master_lost", timeout=20)
    assert batch.wait(60) == 0, batch.log_tail()
    results = batch.events("result")
    assert len({r["index"] for r in results}) == 24 and all(r["ok"] for r in results)
    rerun = [r for r in results if r["attempt"] > 1]
    assert rerun, "no task was rerun after the link was cut"
    assert {(r["worker_id"], r["value"]["address"]) for r in rerun} == {("worker-w1", HOSTS["w1"])}

    # Restore the link: w2 reconnects by itself and gets work again.
    fleet.net.set_link("w2", up=True)
    w2.wait_event("worker_registered", count=2, timeout=30)
    master.wait_event("worker_registered", where=lambda e: e["worker_id"] == "worker-w2", count=2, timeout=10)
    results = fleet.run_client("w1", *locate_args(0.1), "--count", "24", "--wait-workers", "2")
    assert all(r["ok"] for r in results)
    addresses = {r["value"]["address"] for r in results}
    assert addresses == set(worker_hosts), addresses
    assert w2.alive() and fleet.cluster.workers[0].alive()
