"""Ray: a local ``ray.init`` of 2 CPUs on 127.0.0.1, no dashboard, no usage stats.

no-op, round trip and cpu are remote functions of one CPU each (so 2 run at once); the io
sleeps go to one threaded actor with ``max_concurrency`` = the io slots (Ray's way of running
many blocking calls at once without a CPU each).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Any

# before ray is imported (python -m bench.peers sets them too): no usage stats; and a node
# whose address is 127.0.0.1, so that every server of Ray binds loopback only (without it, Ray
# turns 127.0.0.1 into the host's outward address and listens there)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray

from bench.peers import work
from bench.peers.common import LIMIT_S, Spec, run_peer, timed
from bench.tasks import burn


class RayDriver:
    system = "Ray"

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.setup = (
            f"`ray.init(num_cpus={spec.cpu_slots})`; tasks of 1 CPU; io on one threaded actor, "
            f"max_concurrency={spec.io_slots}"
        )
        self.skipped: dict[str, str] = {}
        self.tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.sleeper: Any = None

    def __enter__(self) -> RayDriver:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        ray.init(
            num_cpus=self.spec.cpu_slots,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _temp_dir=self.tmp,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        self.noop = ray.remote(num_cpus=1)(work.noop)
        self.burn = ray.remote(num_cpus=1)(burn)
        self.sleeper = ray.remote(num_cpus=0, max_concurrency=self.spec.io_slots)(work.Sleeper).remote()

    def __exit__(self, *exc: object) -> None:
        ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def versions(self) -> dict[str, str]:
        return {"ray": ray.__version__}

    def warm_up(self) -> None:
        ray.get([self.noop.remote() for _ in range(200)], timeout=LIMIT_S)
        ray.get([self.burn.remote(1000) for _ in range(4)], timeout=LIMIT_S)
        ray.get([self.sleeper.sleep.remote(0.001) for _ in range(100)], timeout=LIMIT_S)

    def noop_batch(self, n: int) -> float:
        return timed(lambda: ray.get([self.noop.remote() for _ in range(n)], timeout=LIMIT_S))

    def one_trip(self) -> None:
        ray.get(self.noop.remote(), timeout=30)

    def cpu_batch(self, n: int, loops: int) -> float:
        return timed(lambda: ray.get([self.burn.remote(loops) for _ in range(n)], timeout=LIMIT_S))

    def io_batch(self, n: int, seconds: float) -> float | None:
        return timed(lambda: ray.get([self.sleeper.sleep.remote(seconds) for _ in range(n)], timeout=LIMIT_S))


if __name__ == "__main__":
    sys.exit(run_peer(RayDriver))
