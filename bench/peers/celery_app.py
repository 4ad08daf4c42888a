"""The Celery app of ``make bench-peers``: Redis broker and result backend (the URL in
``BENCH_REDIS_URL``, databases 0 and 1), JSON, and the benchmark's three tasks."""

from __future__ import annotations

import os

from celery import Celery

from bench.peers import work
from bench.tasks import burn as _burn

_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")

app = Celery("bench_peers", broker=f"{_URL}/0", backend=f"{_URL}/1")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

noop = app.task(name="bench.noop")(work.noop)
burn = app.task(name="bench.burn")(_burn)
sleep = app.task(name="bench.sleep")(work.sleep)
