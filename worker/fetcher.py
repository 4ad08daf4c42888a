"""Shipped functions on a worker started with ``--run-shipped-code``: fetched from the master
by hash when a task needs one the worker lacks, cached (codecache.py), passed with each call.

A task of a function not yet here is parked in the executor (held, so the master and a cancel
see it, but not queued) until the function arrives; one CODE_FETCH asks for every function
missing, once, and again after a reconnect. A function pickled by another Python major.minor
(or cloudpickle major) than this worker's fails its tasks with a message naming both versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import CHUNK_TASK_NAMES, MsgKind
from poolfleet.common.shipping import (
    SHIPPED_PREFIX,
    cloudpickle_version,
    digest_of,
    python_version,
    shipped_digest,
    skew,
)
from poolfleet.worker.codecache import CodeCache, Shipped
from poolfleet.worker.executor import Executor, Job

log = structlog.get_logger("pworker")

#: Hashes per CODE_FETCH (the master's limit).
FETCH_BATCH = 100


def shipped_of(name: str, payload: bytes) -> bytes | None:
    """The hash of the shipped function a task calls (itself, or in a chunk), or None."""
    target: Any = name
    if name in CHUNK_TASK_NAMES:
        target = codec.first_arg(payload)
    if not isinstance(target, str) or not target.startswith(SHIPPED_PREFIX):
        return None
    return shipped_digest(target) or b""


class CodeFetcher:
    def __init__(
        self, executor: Executor, max_bytes: int, send: Callable[[MsgKind, dict[str, Any]], bool]
    ) -> None:
        self.executor = executor
        self.cache = CodeCache(max_bytes)
        self.send = send
        self.python = python_version()
        self.cloudpickle = cloudpickle_version()
        #: parked jobs by the hash they wait for; hashes asked for on this connection
        self.waiting: dict[bytes, list[Job]] = {}
        self.asked: set[bytes] = set()
        self.fetched = 0

    def hello_fields(self) -> dict[str, Any]:
        return {"python": self.python, "cloudpickle": self.cloudpickle or ""}

    def take(self, job: Job) -> bool:
        """Whether ``job`` calls a shipped function; if so it is queued with it, or parked."""
        digest = shipped_of(job.name, job.payload)
        if digest is None:
            return False
        if not digest:
            self.executor.submit(job)  # a malformed name: the runner fails it, naming it
            return True
        found = self.cache.get(digest)
        if found is not None:
            job.code = (found.digest, found.blob)
            self.executor.submit(job)
            return True
        if self.executor.park(job):
            self.waiting.setdefault(digest, []).append(job)
        return True

    def flush(self) -> None:
        """Ask the master for the functions parked jobs wait for (once per connection)."""
        missing = [d for d in self.waiting if d not in self.asked]
        for i in range(0, len(missing), FETCH_BATCH):
            part = missing[i : i + FETCH_BATCH]
            if self.send(MsgKind.CODE_FETCH, {"hashes": part}):
                self.asked.update(part)

    def reconnected(self) -> None:
        self.asked.clear()
        self.flush()

    def on_blobs(self, body: dict[str, Any]) -> None:
        """The master's CODE_BLOBS: run the jobs that waited, or fail them with the reason."""
        for entry in body["blobs"]:
            try:
                e = messages.check("CODE_BLOBS.blobs[]", entry, messages.CODE_BLOB)
            except ProtocolError as exc:
                log.warning("code_rejected", reason=exc.message)
                continue
            digest = e["hash"]
            if digest_of(e["blob"]) != digest:
                log.warning("code_rejected", reason="blob does not match its hash", hash=digest.hex()[:16])
                continue
            refusal = skew(e["python"], e["cloudpickle"], self.python, self.cloudpickle)
            jobs = self.waiting.pop(digest, [])
            self.asked.discard(digest)
            if refusal is not None:
                self._fail(jobs, "VersionSkew", refusal)
                continue
            self.fetched += 1
            self.cache.add(Shipped(digest, e["blob"], e["python"], e["cloudpickle"]))
            log.info("code_fetched", hash=digest.hex()[:16], size=len(e["blob"]), tasks=len(jobs))
            for job in jobs:
                self.executor.unpark(job, (digest, e["blob"]))
        for digest in body.get("missing") or []:
            if isinstance(digest, bytes) and digest in self.waiting:
                self.asked.discard(digest)
                self._fail(
                    self.waiting.pop(digest),
                    "CodeUnknown",
                    f"the master holds no shipped function {digest.hex()[:16]}...; submit the task again",
                )

    def _fail(self, jobs: list[Job], kind: str, message: str) -> None:
        for job in jobs:
            self.executor.unpark(job, None, {"type": kind, "message": message, "traceback": ""})
