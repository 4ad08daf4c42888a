"""Messages on the workers socket, decoded into the core's events and checked.

Nothing here changes state: :mod:`poolfleet.master.core` applies what these
functions return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from poolfleet.common import messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import ErrorCode, Kind, Role
from poolfleet.master.registry import Offer

#: Retries a task may declare or a client may ask for.
MAX_RETRIES = 100

Ref = tuple[bytes, int]


@dataclass(frozen=True, slots=True)
class Hello:
    """A worker's registration."""

    version: int
    worker_id: str
    host: str
    pid: int
    session: str
    queues: tuple[str, ...]
    slots: dict[Kind, int]
    offers: dict[str, Offer] | None
    holding: list[Ref]
    allow_cmd: frozenset[str] | None
    allow_cmd_env: frozenset[str] = frozenset()
    #: a worker that runs shipped code: its Python major.minor and cloudpickle version
    python: str | None = None
    cloudpickle: str | None = None


def decode_hello(ident: bytes, body: dict[str, Any]) -> Hello:
    """Check a worker HELLO (its version is the core's to judge)."""
    if body["role"] != Role.WORKER:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "HELLO on the worker socket must have role 'worker'")
    slots: dict[Kind, int] = {}
    for k, n in (body.get("slots") or {}).items():
        if k not in Kind.__members__.values() or type(n) is not int or n < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"HELLO: bad slots entry {k!r}")
        slots[Kind(k)] = n
    queues = tuple(q for q in (body.get("queues") or ["default"]) if isinstance(q, str))
    tasks = body.get("tasks")
    offers = None if tasks is None else decode_offers(tasks)
    allow = body.get("allow_cmd")
    allow_env = body.get("allow_cmd_env") or []
    return Hello(
        version=body["version"],
        worker_id=str(body.get("worker_id") or ident.hex()),
        host=str(body.get("host") or "?"),
        pid=int(body.get("pid") or 0),
        session=str(body.get("session") or ""),
        queues=queues,
        slots=slots,
        offers=offers,
        holding=refs("HELLO.holding", body.get("holding") or []),
        allow_cmd=None if allow is None else frozenset(p for p in allow if isinstance(p, str)),
        allow_cmd_env=frozenset(n for n in allow_env if isinstance(n, str)),
        python=body.get("python"),
        cloudpickle=body.get("cloudpickle"),
    )


def decode_offers(defs: dict[str, Any]) -> dict[str, Offer]:
    """The task names a worker offers with their declared defaults; bad entries are skipped."""
    out: dict[str, Offer] = {}
    for name, spec in defs.items():
        if not isinstance(name, str) or not isinstance(spec, dict):
            continue
        try:
            kind = Kind(spec.get("kind", "cpu"))
        except ValueError:
            continue
        timeout = spec.get("timeout_s")
        timeout_s: float | None = None
        if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout < math.inf:
            timeout_s = float(timeout)
        retries = spec.get("retries", 0)
        retries = retries if type(retries) is int and 0 <= retries <= MAX_RETRIES else 0
        out[name] = Offer(kind, timeout_s, retries)
    return out


def refs(where: str, entries: list[Any]) -> list[Ref]:
    """``[{id, attempt}, ...]`` as (id, attempt) pairs; a bad entry fails the message."""
    return [(r["id"], r["attempt"]) for r in messages.check_entries(where, entries, messages.TASK_REF)]


def results(entries: list[Any]) -> list[dict[str, Any]]:
    return messages.check_entries("TASK_RESULTS.results", entries, messages.TASK_RESULT)


def held(body: dict[str, Any]) -> dict[Kind, int] | None:
    """Slots still held by io threads that timed out or were cancelled, by kind."""
    value = body.get("held")
    if not isinstance(value, dict):
        return None
    return {
        Kind(k): n for k, n in value.items() if k in Kind.__members__.values() and type(n) is int and n >= 0
    }


def holding(body: dict[str, Any], where: str) -> set[Ref] | None:
    """What a worker reports it holds (running, queued, or results not yet acknowledged)."""
    value = body.get("holding")
    return None if value is None else set(refs(where, value))
