"""Celery with Redis: a worker of ``--pool prefork --concurrency 2`` on queue ``cpu`` (no-op,
round trip, cpu) and one of ``--pool threads --concurrency 50`` on queue ``io``, both started
here and stopped at the end; a batch is ``apply_async`` per task, then ``ResultSet.join_native``.
"""

from __future__ import annotations

import os
import sys

import celery
import kombu
import redis
from celery.result import ResultSet

from bench.peers import procs
from bench.peers.celery_app import app, burn, noop, sleep
from bench.peers.common import LIMIT_S, Spec, run_peer, timed


class CeleryDriver:
    system = "Celery + Redis"

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.setup = (
            f"worker `--pool prefork --concurrency {spec.cpu_slots}`; io on a worker "
            f"`--pool threads --concurrency {spec.io_slots}`; Redis broker and backend"
        )
        self.skipped: dict[str, str] = {}
        self.workers = procs.Group("bench-celery-")

    def _worker(self, queue: str, pool: str, concurrency: int) -> None:
        env = {**os.environ, "BENCH_REDIS_URL": self.spec.redis_url}
        argv = [sys.executable, "-m", "celery", "-A", "bench.peers.celery_app", "worker"]
        argv += ["-Q", queue, "-n", f"{queue}@bench", "--pool", pool, "--concurrency", str(concurrency)]
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]
        self.workers.start(queue, argv, env)

    def __enter__(self) -> CeleryDriver:
        with self.workers.starting():
            self._worker("cpu", "prefork", self.spec.cpu_slots)
            self._worker("io", "threads", self.spec.io_slots)
            # ready when each queue answers: a first task through each worker
            noop.apply_async(queue="cpu").get(timeout=60)
            sleep.apply_async((0.001,), queue="io").get(timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.workers.close(failed=bool(exc and exc[0] is not None))
        app.close()

    def versions(self) -> dict[str, str]:
        return {"celery": celery.__version__, "kombu": kombu.__version__, "redis (client)": redis.__version__}

    def _batch(self, task: celery.Task, args: tuple[object, ...], n: int, queue: str) -> float:
        def run() -> None:
            ResultSet([task.apply_async(args, queue=queue) for _ in range(n)]).join_native(timeout=LIMIT_S)

        return timed(run)

    def warm_up(self) -> None:
        self._batch(noop, (), 200, "cpu")
        self._batch(burn, (1000,), 4, "cpu")
        self._batch(sleep, (0.001,), 100, "io")

    def noop_batch(self, n: int) -> float:
        return self._batch(noop, (), n, "cpu")

    def one_trip(self) -> None:
        noop.apply_async(queue="cpu").get(timeout=30)

    def cpu_batch(self, n: int, loops: int) -> float:
        return self._batch(burn, (loops,), n, "cpu")

    def io_batch(self, n: int, seconds: float) -> float | None:
        return self._batch(sleep, (seconds,), n, "io")


if __name__ == "__main__":
    sys.exit(run_peer(CeleryDriver))
