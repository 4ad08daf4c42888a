"""Requests on the clients socket: checks of what clients send, and the result entries sent back.

Nothing here changes state: :mod:`poolfleet.master.core` decides, with these
checks, what a submit, a result fetch or a cancel does.
"""

from __future__ import annotations

import math
import re
from typing import Any

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import CMD_TASK_NAME, ErrorCode, Kind
from poolfleet.common.suggest import unknown_task_message
from poolfleet.master.registry import Offer
from poolfleet.master.scheduler import PRIORITY_MAX, PRIORITY_MIN
from poolfleet.master.worker_api import MAX_RETRIES

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
#: Tasks in one SUBMIT message. The master handles a message in one piece (15-20 us a task on
#: a busy two-core host), and every other peer waits behind it: 2,000 keeps that under ~40 ms.
MAX_SUBMIT_TASKS = 2000

__all__ = [
    "MAX_RETRIES",
    "MAX_SUBMIT_TASKS",
    "Options",
    "check_options",
    "check_priority",
    "ids",
    "row_entry",
    "submit_entries",
]

#: What a submit fixes of a task: kind and queue, and the client's own timeout and retries
#: (None: the defaults declared by the worker that runs it).
Options = tuple[Kind, str, float | None, int | None]


def submit_entries(tasks: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Well-formed SUBMIT entries, and rejections for the others (the message goes on)."""
    if len(tasks) > MAX_SUBMIT_TASKS:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"SUBMIT carries {len(tasks)} tasks, more than {MAX_SUBMIT_TASKS} in one message; "
            "split the batch (nothing of this one was submitted)",
        )
    entries: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for i, raw in enumerate(tasks):
        try:
            entries.append(messages.check_at("SUBMIT.tasks", i, raw, messages.SUBMIT_TASK))
        except ProtocolError as exc:
            tid = raw.get("id") if isinstance(raw, dict) else None
            rejected.append(
                {"id": tid if isinstance(tid, bytes) else b"", "code": exc.code, "message": exc.message}
            )
    return entries, rejected


def ids(where: str, values: list[Any]) -> list[bytes]:
    if not all(isinstance(t, bytes) and len(t) == 16 for t in values):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: ids must be 16-byte binaries")
    return values


def check_options(entry: dict[str, Any], known: Offer | None, any_known: bool, offered: list[str]) -> Options:
    """The task's kind, queue, timeout and retries; raise ProtocolError naming what is wrong.

    ``known``: the defaults declared for the name (None: no worker ever offered it);
    ``any_known``: whether any name is known at all (a master that never saw a worker
    accepts any name, so work can be queued before the first worker starts).
    """
    if len(entry["id"]) != 16:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "task id must be 16 bytes")
    name = entry["name"]
    if not TASK_NAME.match(name):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"task name {name!r} must look like module:function")
    if name == CMD_TASK_NAME:
        known = Offer(Kind.CMD)
    if known is None and any_known:
        raise ProtocolError(ErrorCode.UNKNOWN_TASK, unknown_task_message(name, offered))
    kind_text = entry.get("kind") or (known.kind.value if known else Kind.CPU.value)
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise ProtocolError(
            ErrorCode.UNKNOWN_KIND, f"unknown kind {kind_text!r}: use cpu, io or cmd"
        ) from None
    if (kind is Kind.CMD) != (name == CMD_TASK_NAME):
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"kind cmd is only for {CMD_TASK_NAME}, not for {name!r}")
    queue = entry.get("queue") or "default"
    if not QUEUE_NAME.match(queue):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad queue name {queue!r}")
    timeout_s = entry.get("timeout_s")
    if timeout_s is not None:
        timeout_s = float(timeout_s)  # the journal stores a REAL, never a 64-bit overflow
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "timeout_s must be a positive, finite number")
    retries = entry.get("retries")
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"retries must be between 0 and {MAX_RETRIES}")
    return kind, queue, timeout_s, retries


def check_priority(entry: dict[str, Any]) -> int:
    """The task's priority (0 when not given); ProtocolError outside the range kept."""
    priority = entry.get("priority")
    if priority is None:
        return 0
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"priority must be between {PRIORITY_MIN} and {PRIORITY_MAX}, not {priority}",
        )
    return int(priority)


def row_entry(row: tuple[Any, ...]) -> dict[str, Any]:
    """A finished journal row (columns: journal.RESULT_COLUMNS) as a result entry."""
    tid, name, state, attempt, value, error, worker_id, duration_ms, _finished = row
    entry: dict[str, Any] = {"id": tid, "state": state, "attempt": attempt, "name": name}
    if value is not None:
        entry["value"] = value
    if error is not None:
        entry["error"] = codec.unpack(error)
    if worker_id:
        entry["worker_id"] = worker_id
    if duration_ms is not None:
        entry["duration_ms"] = duration_ms
    return entry
