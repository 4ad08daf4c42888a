"""A client process for the several-hosts test, run inside a host's network namespace.

Submits ``--count`` calls of ``--task`` with the JSON list ``--args``, then prints
one JSON line per result as it lands (``"event": "result"``) and a last line
``"event": "finished"``. Exit status 0 when every task succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import as_completed
from typing import Any

from poolfleet.client import Client


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--master", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--args", default="[]", help="JSON list of arguments for every call")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--wait-workers", type=int, default=0, help="wait until this many workers are connected")
    ap.add_argument("--timeout", type=float, default=60.0)
    opts = ap.parse_args()
    deadline = time.monotonic() + opts.timeout
    args = json.loads(opts.args)
    failed = 0
    with Client(opts.master, timeout_s=10) as client:
        while opts.wait_workers:
            workers = [w["worker_id"] for w in client.workers()]
            if len(workers) >= opts.wait_workers:
                emit("workers", workers=sorted(workers))
                break
            if time.monotonic() > deadline:
                emit("finished", ok=False, error=f"only workers {workers} connected")
                return 1
            time.sleep(0.05)
        futures = client.submit_many(opts.task, [(args, {}) for _ in range(opts.count)])
        index = {id(f): i for i, f in enumerate(futures)}
        emit("submitted", count=len(futures))
        for f in as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
            exc = f.exception()
            if exc is not None:
                failed += 1
            emit(
                "result",
                index=index[id(f)],
                ok=exc is None,
                value=None if exc is not None else f.result(),
                error=None if exc is None else repr(exc),
                worker_id=f.info.get("worker_id"),
                attempt=f.info.get("attempt"),
            )
    emit("finished", ok=failed == 0, failed=failed)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
