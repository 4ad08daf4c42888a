"""Shipping functions the workers cannot import: pickled once per client and function.

A function defined in ``__main__``, a lambda, a closure or a local function has no
``module:function`` name a worker could import. When shipping is on (``Client(ship_code=True)``
or ``POOLFLEET_SHIP_CODE=1``, see :func:`ship_mode`; off by default) the client pickles it with cloudpickle, stores the pickle on the master once per content hash
(CODE_PUT) and submits its tasks under the name that holds the hash; workers started with
``--run-shipped-code`` fetch it by hash. Arguments and results stay msgpack.

The master decides who may ship: a client whose key is among its trusted client keys, or any
client of a master bound to loopback without keys. A refusal raises at submit with the
master's reason; nothing falls back silently.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import structlog

from poolfleet.common.errors import MasterUnreachable, PoolfleetError, RemoteError
from poolfleet.common.protocol import MsgKind
from poolfleet.common.shipping import (
    DEFAULT_MAX_CODE_BYTES,
    cloudpickle_version,
    digest_of,
    python_version,
    shipped_name,
)

if TYPE_CHECKING:
    from poolfleet.client.connection import Connection

log = structlog.wrap_logger(
    logging.getLogger("poolfleet.client"),
    processors=[structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)],
)

HOW_TO_SHIP = (
    "or let poolfleet ship it pickled: set POOLFLEET_SHIP_CODE=1 (or Client(ship_code=True)) with "
    "poolfleet[shipping] installed here and on the workers, and start the workers with "
    "--run-shipped-code (read docs/SECURITY.md first)"
)


def needs_shipping(fn: object) -> bool:
    """A function workers cannot import by name: in ``__main__``, a lambda, a closure or a
    local function, a method."""
    if isinstance(fn, str) or not callable(fn) or inspect.isbuiltin(fn):
        return False
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname:
        return False
    return module == "__main__" or "<" in qualname or "." in qualname


def ship_mode(value: bool | None, env: Mapping[str, str]) -> bool:
    """Whether to ship functions workers cannot import: ``value`` if given, else the
    ``POOLFLEET_SHIP_CODE`` environment entry (``1``/``true``/``yes``/``on``; off otherwise).
    Off by default: such a function then fails at submit with a message saying how to ship it."""
    if value is not None:
        return value
    text = (env.get("POOLFLEET_SHIP_CODE") or "0").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise PoolfleetError(f"POOLFLEET_SHIP_CODE must be 1 or 0, not {text!r}")


class Shipper:
    """Pickles and stores the functions of one client connection, each content once."""

    def __init__(self, conn: Connection, enabled: bool, max_code_bytes: int, timeout_s: float) -> None:
        self.conn = conn
        self.enabled = enabled
        self.max_code_bytes = max_code_bytes or DEFAULT_MAX_CODE_BYTES
        self.timeout_s = timeout_s
        self._stored: set[bytes] = set()
        self._lock = threading.Lock()
        #: CODE_PUT messages this client sent (each carries one function)
        self.sent = 0

    def name_for(self, fn: Callable[..., Any]) -> str:
        """The task name of ``fn`` shipped; stores it on the master the first time."""
        version = cloudpickle_version()
        if version is None:
            raise PoolfleetError(
                "shipping code (ship_code=True or POOLFLEET_SHIP_CODE=1) needs cloudpickle: "
                "pip install poolfleet[shipping]"
            )
        import cloudpickle

        label = getattr(fn, "__qualname__", type(fn).__name__)
        try:
            blob = cloudpickle.dumps(fn)
        except Exception as exc:
            raise PoolfleetError(
                f"cannot ship function {label!r}: cloudpickle failed: {type(exc).__name__}: {exc}"
            ) from exc
        if len(blob) > self.max_code_bytes:
            raise PoolfleetError(
                f"cannot ship function {label!r}: it pickles to {len(blob):,} bytes (with what it "
                f"refers to), more than max_code_bytes={self.max_code_bytes:,}; pass big data as "
                "arguments, or move the function into a module the workers load"
            )
        digest = digest_of(blob)
        with self._lock:
            if digest not in self._stored:
                self._store(digest, blob, version, label)
                self._stored.add(digest)
        return shipped_name(digest, label)

    def forget(self) -> None:
        """The master said it does not hold a function this client stored (it started on a new
        journal): send each one again when next used."""
        with self._lock:
            self._stored.clear()

    def _store(self, digest: bytes, blob: bytes, version: str, label: str) -> None:
        body = {"hash": digest, "blob": blob, "python": python_version(), "cloudpickle": version}
        self.sent += 1
        try:
            reply = self.conn.request(MsgKind.CODE_PUT, body).result(self.timeout_s)
        except RemoteError as exc:
            raise RemoteError(exc.code, f"cannot ship function {label!r}: {exc.message}") from None
        except FutureTimeout:
            raise MasterUnreachable(f"no answer from the master within {self.timeout_s} s") from None
        if not reply.get("workers"):
            log.warning(
                "no_worker_runs_shipped_code",
                function=label,
                hint="its tasks wait until a worker started with --run-shipped-code (same Python "
                f"{python_version()}) connects",
            )
