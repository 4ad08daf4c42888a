"""RQ: two ``rq worker`` processes on one queue (RQ runs one job at a time per worker, each in
a forked work horse), started here and stopped at the end. A batch is ``Queue.enqueue_many``;
its results are waited for in order with ``Job.latest_result(timeout=...)`` (a blocking read
of the job's result stream, no polling). The io workload is left out: 50 slots would be 50
worker processes, which is no like-for-like with the others' 50 threads, and too heavy for
the run's few minutes on 2 cores."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import redis
import rq
from rq import Queue, Worker
from rq.job import Job

from bench.peers import procs, work
from bench.peers.common import LIMIT_S, Spec, run_peer, timed, wait_until
from bench.tasks import burn

DB = 2  # Celery has 0 and 1 of the same server
QUEUE = "bench"


class RqDriver:
    system = "RQ"

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.setup = f"{spec.cpu_slots} `rq worker` processes on one queue (a forked work horse per job)"
        self.skipped = {
            "io": f"RQ runs one job at a time per worker process: {spec.io_slots} slots would be "
            f"{spec.io_slots} worker processes, not comparable with the others' threads"
        }
        self.url = f"{spec.redis_url.rstrip('/')}/{DB}"
        self.redis = redis.Redis.from_url(self.url)
        self.queue = Queue(QUEUE, connection=self.redis)
        self.workers = procs.Group("bench-rq-")

    def __enter__(self) -> RqDriver:
        rq_bin = str(Path(sys.executable).parent / "rq")
        with self.workers.starting():
            for i in range(self.spec.cpu_slots):
                argv = [rq_bin, "worker", "--url", self.url, "--name", f"bench-{i}", "--quiet", QUEUE]
                self.workers.start(f"worker{i}", argv, dict(os.environ))
            wait_until("rq workers", lambda: len(Worker.all(connection=self.redis)) >= self.spec.cpu_slots)
        return self

    def __exit__(self, *exc: object) -> None:
        self.workers.close(failed=bool(exc and exc[0] is not None))
        self.redis.close()

    def versions(self) -> dict[str, str]:
        return {"rq": rq.__version__, "redis (client)": redis.__version__}

    def _wait(self, jobs: list[Job]) -> None:
        deadline = time.monotonic() + LIMIT_S
        for job in jobs:
            left = max(1, int(deadline - time.monotonic()))
            result = job.latest_result(timeout=left)
            if result is None or result.type != result.Type.SUCCESSFUL:
                raise RuntimeError(f"rq job {job.id}: {result and result.exc_string}")

    def _batch(self, fn: Any, args: tuple[object, ...], n: int) -> float:
        def run() -> None:
            self._wait(self.queue.enqueue_many([Queue.prepare_data(fn, args) for _ in range(n)]))

        return timed(run)

    def warm_up(self) -> None:
        self._batch(work.noop, (), 50)
        self._batch(burn, (1000,), 4)

    def noop_batch(self, n: int) -> float:
        return self._batch(work.noop, (), n)

    def one_trip(self) -> None:
        self._wait([self.queue.enqueue(work.noop)])

    def cpu_batch(self, n: int, loops: int) -> float:
        return self._batch(burn, (loops,), n)

    def io_batch(self, n: int, seconds: float) -> float | None:
        return None


if __name__ == "__main__":
    sys.exit(run_peer(RqDriver))
