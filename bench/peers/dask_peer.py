"""Dask distributed: a ``LocalCluster`` of 2 worker processes of 1 thread each on 127.0.0.1
(no-op, round trip, cpu) and, for io, a second one of 1 worker process with 50 threads; no
dashboard. A batch is one ``Client.map`` (``pure=False``), gathered."""

from __future__ import annotations

import logging
import sys
from typing import Any

import dask
import distributed
from distributed import Client, LocalCluster

from bench.peers import work
from bench.peers.common import Spec, run_peer, timed
from bench.tasks import burn


def _cluster(workers: int, threads: int) -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    try:
        return cluster, Client(cluster)
    except BaseException:
        cluster.close()
        raise


class DaskDriver:
    system = "Dask distributed"

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.setup = (
            f"`LocalCluster({spec.cpu_slots} processes x 1 thread)`; io on "
            f"`LocalCluster(1 process x {spec.io_slots} threads)`"
        )
        self.skipped: dict[str, str] = {}
        self.clusters: list[tuple[LocalCluster, Client]] = []

    def __enter__(self) -> DaskDriver:
        try:
            self.clusters.append(_cluster(self.spec.cpu_slots, 1))
            self.clusters.append(_cluster(1, self.spec.io_slots))
        except BaseException:
            self.__exit__()
            raise
        self.cpu, self.io = self.clusters[0][1], self.clusters[1][1]
        return self

    def __exit__(self, *exc: object) -> None:
        for cluster, client in reversed(self.clusters):
            client.close()
            cluster.close()
        self.clusters.clear()

    def versions(self) -> dict[str, str]:
        return {"dask": dask.__version__, "distributed": distributed.__version__}

    def _map(self, client: Client, fn: Any, args: list[Any]) -> None:
        # no timeout here: distributed.wait would use the default client, not this one; a hang
        # is ended by the deadline python -m bench.peers gives the whole peer
        client.gather(client.map(fn, args, pure=False), errors="raise")

    def warm_up(self) -> None:
        self._map(self.cpu, work.noop, list(range(200)))
        self._map(self.cpu, burn, [1000] * 4)
        self._map(self.io, work.sleep, [0.001] * 100)

    def noop_batch(self, n: int) -> float:
        return timed(lambda: self._map(self.cpu, work.noop, list(range(n))))

    def one_trip(self) -> None:
        self.cpu.submit(work.noop, pure=False).result(timeout=30)

    def cpu_batch(self, n: int, loops: int) -> float:
        return timed(lambda: self._map(self.cpu, burn, [loops] * n))

    def io_batch(self, n: int, seconds: float) -> float | None:
        return timed(lambda: self._map(self.io, work.sleep, [seconds] * n))


if __name__ == "__main__":
    sys.exit(run_peer(DaskDriver))
