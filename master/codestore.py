"""Shipped code on the master: the pickled functions by hash, and who may ship them (pure logic).

A trusted client stores a function once (CODE_PUT); its tasks name it by hash, and workers
that run shipped code fetch it by hash (CODE_FETCH). The master never unpickles anything:
it checks the hash, the size and the Python version, keeps the bytes, and hands them on.
The recently used functions stay in memory (bounded by bytes); the journal keeps all of them,
so a restarted master still has the functions of the tasks it recovers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import ErrorCode
from poolfleet.common.shipping import DIGEST_BYTES, SHIPPED_ROUTE, digest_of, skew
from poolfleet.master.registry import WorkerInfo

log = structlog.get_logger("pmaster")

#: Hashes a worker may ask for in one CODE_FETCH.
MAX_FETCH = 100


@dataclass(frozen=True, slots=True)
class Trust:
    """Whether one client request may ship code: ``who`` (the trusted key's file name, or
    ``loopback``) or the ``refusal`` that says what to configure."""

    who: str | None
    refusal: str | None = None


#: What a request gets when nothing decided otherwise.
UNTRUSTED = Trust(
    None, "this request may not ship code (a shipped task cannot be retried: submit it again from its client)"
)


@dataclass(frozen=True, slots=True)
class CodeBlob:
    digest: bytes
    blob: bytes
    python: str
    cloudpickle: str
    shipped_by: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "hash": self.digest,
            "blob": self.blob,
            "python": self.python,
            "cloudpickle": self.cloudpickle,
        }


class CodeStore:
    """Pickled functions by hash: in memory up to ``max_bytes`` (least recently used go first),
    and in the journal (``load``: a function the memory no longer holds)."""

    def __init__(
        self,
        max_code_bytes: int,
        max_bytes: int,
        load: Callable[[bytes], tuple[bytes, str, str, str] | None],
    ) -> None:
        self.max_code_bytes = max_code_bytes
        self.max_bytes = max_bytes
        self._load = load
        self._blobs: OrderedDict[bytes, CodeBlob] = OrderedDict()
        self.bytes = 0
        #: counters, shown by STATUS: CODE_PUT messages that carried a function, functions
        #: stored for the first time, functions sent to workers
        self.received = 0
        self.stored = 0
        self.sent = 0

    def get(self, digest: bytes) -> CodeBlob | None:
        found = self._blobs.get(digest)
        if found is not None:
            self._blobs.move_to_end(digest)
            return found
        row = self._load(digest)
        if row is None:
            return None
        blob = CodeBlob(digest, *row)
        self._keep(blob)
        return blob

    def _keep(self, blob: CodeBlob) -> None:
        self._blobs[blob.digest] = blob
        self.bytes += len(blob.blob)
        while self.bytes > self.max_bytes and len(self._blobs) > 1:
            _, old = self._blobs.popitem(last=False)
            self.bytes -= len(old.blob)

    def put(self, body: dict[str, Any], trust: Trust, workers: Iterable[WorkerInfo]) -> CodeBlob | None:
        """Check a CODE_PUT; the new function to journal (None: already held). Raises
        ProtocolError naming what is wrong: not trusted, too big, bad hash, version skew."""
        if trust.refusal is not None or trust.who is None:
            raise ProtocolError(ErrorCode.CODE_REFUSED, trust.refusal or UNTRUSTED.refusal or "")
        digest, blob = body["hash"], body["blob"]
        if len(blob) > self.max_code_bytes:
            raise ProtocolError(
                ErrorCode.CODE_TOO_LARGE,
                f"the shipped function is {len(blob):,} bytes, more than this master's limit of "
                f"{self.max_code_bytes:,} (pmaster --max-code-bytes); pass big data as arguments",
            )
        if len(digest) != DIGEST_BYTES or digest_of(blob) != digest:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "CODE_PUT: hash is not the SHA-256 of blob")
        self.received += 1
        refusal = version_refusal(body["python"], body["cloudpickle"], workers)
        if refusal is not None:
            raise ProtocolError(ErrorCode.CODE_VERSION, refusal)
        if self.get(digest) is not None:
            return None
        new = CodeBlob(digest, blob, body["python"], body["cloudpickle"], trust.who)
        self._keep(new)
        self.stored += 1
        log.info("code_stored", hash=digest.hex()[:16], size=len(blob), shipped_by=trust.who)
        return new

    def fetch(self, info: WorkerInfo, hashes: list[Any]) -> dict[str, Any]:
        """The CODE_BLOBS answer to a worker's CODE_FETCH."""
        if info.offers is None or SHIPPED_ROUTE not in info.offers:
            raise ProtocolError(
                ErrorCode.CODE_REFUSED, "this worker did not announce that it runs shipped code"
            )
        if len(hashes) > MAX_FETCH or not all(isinstance(h, bytes) for h in hashes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"CODE_FETCH: at most {MAX_FETCH} binary hashes")
        blobs, missing = [], []
        for h in hashes:
            found = self.get(h)
            if found is None:
                missing.append(h)
            else:
                blobs.append(found.to_wire())
        self.sent += len(blobs)
        log.info("code_sent", worker_id=info.worker_id, count=len(blobs), missing=len(missing))
        return {"blobs": blobs, "missing": missing}

    def counters(self) -> dict[str, int]:
        return {
            "received": self.received,
            "stored": self.stored,
            "sent": self.sent,
            "cached": len(self._blobs),
            "cached_bytes": self.bytes,
        }


def shipping_workers(workers: Iterable[WorkerInfo]) -> list[WorkerInfo]:
    return [w for w in workers if w.offers is not None and SHIPPED_ROUTE in w.offers]


def version_refusal(python: str, cloudpickle: str, workers: Iterable[WorkerInfo]) -> str | None:
    """Why no connected worker that runs shipped code could run a function pickled by these
    versions (None: one could, or none is connected yet and the question waits for one)."""
    reasons = [skew(python, cloudpickle, w.python or "?", w.cloudpickle) for w in shipping_workers(workers)]
    if not reasons or any(r is None for r in reasons):
        return None
    return reasons[0]
