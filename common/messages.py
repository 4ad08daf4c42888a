"""Framing and per-kind validation of messages.

``encode`` builds the frames of a message; ``decode`` turns received frames
into ``(MsgKind, body)`` and checks the body against the schema of its kind,
raising :class:`ProtocolError` with a code and a message naming the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, ProtocolError
from poolfleet.common.protocol import MAGIC, ErrorCode, MsgKind

_NUM = (int, float)
#: Length of a task id on the wire.
ID_BYTES = 16
# field -> (accepted types, required)
_Schema = dict[str, tuple[tuple[type, ...] | type, bool]]

SCHEMAS: dict[MsgKind, _Schema] = {
    MsgKind.HELLO: {
        "version": (int, True),
        "role": (str, True),
        "worker_id": (str, False),
        "host": (str, False),
        "pid": (int, False),
        "queues": (list, False),
        "slots": (dict, False),
        "tasks": (dict, False),
        "holding": (list, False),
        "session": (str, False),
        "allow_cmd": (list, False),
        "allow_cmd_env": (list, False),
        "python": (str, False),
        "cloudpickle": (str, False),
    },
    MsgKind.WELCOME: {
        "version": (int, True),
        "master_id": (str, True),
        "heartbeat_interval_s": (_NUM, False),
        "liveness": (int, False),
    },
    MsgKind.ERROR: {"code": (str, True), "message": (str, True), "req": (int, False)},
    MsgKind.HEARTBEAT: {
        "held": (dict, False),
        "master_id": (str, False),
        "heartbeat_interval_s": (_NUM, False),
        "holding": (list, False),
        "received": (int, False),
        "pushes_paused": (bool, False),
    },
    MsgKind.SUBMIT: {
        "req": (int, True),
        "tasks": (list, True),
        "wait": (bool, False),
        "progress": (bool, False),
    },
    MsgKind.RESULT_GET: {
        "req": (int, True),
        "ids": (list, True),
        "wait": (bool, False),
        "progress": (bool, False),
    },
    MsgKind.CANCEL: {"req": (int, True), "ids": (list, True), "if_not_started": (bool, False)},
    MsgKind.STATUS: {"req": (int, True)},
    MsgKind.WORKERS: {"req": (int, True)},
    MsgKind.TASKS: {
        "req": (int, True),
        "states": (list, False),
        "name": (str, False),
        "queue": (str, False),
        "worker": (str, False),
        "since": (_NUM, False),
        "before": (bytes, False),
        "limit": (int, False),
    },
    MsgKind.TASK_SHOW: {"req": (int, True), "id": (bytes, True)},
    MsgKind.RESOLVE: {"req": (int, True), "prefixes": (list, True)},
    MsgKind.TASK_RETRY: {"req": (int, True), "tasks": (list, True)},
    MsgKind.QUEUE_CONTROL: {"req": (int, True), "queue": (str, True), "action": (str, True)},
    MsgKind.SUBMITTED: {"req": (int, True), "accepted": (list, True), "rejected": (list, True)},
    MsgKind.RESULTS: {"results": (list, True), "req": (int, False), "unknown": (list, False)},
    MsgKind.CANCEL_REPLY: {"req": (int, True), "results": (list, True)},
    MsgKind.STATUS_REPLY: {"req": (int, True)},
    MsgKind.WORKERS_REPLY: {"req": (int, True), "workers": (list, True)},
    MsgKind.TASKS_REPLY: {"req": (int, True), "tasks": (list, True), "next": (bytes, False)},
    MsgKind.TASK_SHOW_REPLY: {"req": (int, True), "task": (dict, False)},
    MsgKind.RESOLVE_REPLY: {"req": (int, True), "ids": (list, True)},
    MsgKind.TASK_RETRY_REPLY: {"req": (int, True), "results": (list, True)},
    MsgKind.QUEUE_CONTROL_REPLY: {
        "req": (int, True),
        "queue": (str, True),
        "paused": (bool, True),
        "changed": (bool, True),
        "pending": (int, True),
    },
    MsgKind.SCHEDULE_CONTROL: {
        "req": (int, True),
        "action": (str, True),
        "name": (str, False),
        "schedule": (dict, False),
    },
    MsgKind.SCHEDULE_CONTROL_REPLY: {
        "req": (int, True),
        "action": (str, True),
        "changed": (bool, True),
        "schedules": (list, True),
    },
    MsgKind.LIMIT_CONTROL: {
        "req": (int, True),
        "action": (str, True),
        "name": (str, False),
        "count": (int, False),
        "period_s": (_NUM, False),
    },
    MsgKind.LIMIT_CONTROL_REPLY: {
        "req": (int, True),
        "action": (str, True),
        "changed": (bool, True),
        "limits": (list, True),
    },
    MsgKind.TASK_LOGS: {"req": (int, True), "id": (bytes, True), "after": (int, False)},
    MsgKind.TASK_LOGS_REPLY: {"req": (int, True), "found": (bool, True)},
    MsgKind.PROGRESS: {"tasks": (list, True)},
    MsgKind.QUEUE_PURGE: {
        "req": (int, True),
        "queue": (str, True),
        "states": (list, False),
        "dry_run": (bool, False),
    },
    MsgKind.QUEUE_PURGE_REPLY: {"req": (int, True), "queue": (str, True), "count": (int, True)},
    MsgKind.WORKER_CONTROL: {"req": (int, True), "worker": (str, True), "action": (str, True)},
    MsgKind.WORKER_CONTROL_REPLY: {"req": (int, True), "found": (bool, True)},
    MsgKind.CONTROL: {"action": (str, True)},
    MsgKind.TASK_UPDATE: {"tasks": (list, True)},
    MsgKind.DISPATCH: {"tasks": (list, True)},
    MsgKind.CANCEL_TASKS: {"tasks": (list, True)},
    MsgKind.ACK: {"tasks": (list, True)},
    MsgKind.RECALL: {"tasks": (list, True)},
    MsgKind.TASK_RESULTS: {"results": (list, True), "held": (dict, False)},
    MsgKind.RETURN: {"tasks": (list, True)},
    MsgKind.DRAINING: {},
    MsgKind.BYE: {"holding": (list, False)},
    MsgKind.STARTED: {"tasks": (list, True)},
    MsgKind.TASKS_STARTED: {"tasks": (list, True)},
    MsgKind.CODE_FETCH: {"hashes": (list, True)},
    MsgKind.CODE_BLOBS: {"blobs": (list, True), "missing": (list, False)},
    MsgKind.CODE_PUT: {
        "req": (int, True),
        "hash": (bytes, True),
        "blob": (bytes, True),
        "python": (str, True),
        "cloudpickle": (str, True),
    },
    MsgKind.CODE_PUT_REPLY: {
        "req": (int, True),
        "hash": (bytes, True),
        "stored": (bool, True),
        "workers": (int, True),
    },
}
#: A CODE_BLOBS entry: one pickled function and the versions that pickled it.
CODE_BLOB: _Schema = {
    "hash": (bytes, True),
    "blob": (bytes, True),
    "python": (str, True),
    "cloudpickle": (str, True),
}

# Fields of the entries inside batches.
SUBMIT_TASK: _Schema = {
    "id": (bytes, True),
    "name": (str, True),
    "payload": (bytes, True),
    "kind": (str, False),
    "queue": (str, False),
    "timeout_s": (_NUM, False),
    "retries": (int, False),
    "refs": (bool, False),
    "after": (list, False),
    "delay_s": (_NUM, False),
    "eta": (_NUM, False),
    "priority": (int, False),
}
DISPATCH_TASK: _Schema = {
    "id": (bytes, True),
    "attempt": (int, True),
    "name": (str, True),
    "kind": (str, True),
    "payload": (bytes, True),
    "timeout_s": (_NUM, False),
}
TASK_RESULT: _Schema = {
    "id": (bytes, True),
    "attempt": (int, True),
    "state": (str, True),
    "value": (bytes, False),
    "error": (dict, False),
    "duration_ms": (_NUM, False),
    "lost": (bool, False),
    "output": (str, False),
    "output_end": (int, False),
    "progress": (dict, False),
}
TASK_REF: _Schema = {"id": (bytes, True), "attempt": (int, True)}
#: A TASK_UPDATE entry: new output of a running task (from offset ``at``) and its progress.
TASK_UPDATE_ENTRY: _Schema = {
    "id": (bytes, True),
    "attempt": (int, True),
    "output": (str, False),
    "at": (int, False),
    "progress": (dict, False),
}
#: A progress report (TASK_UPDATE, TASK_RESULTS, PROGRESS).
PROGRESS_REPORT: _Schema = {"fraction": (_NUM, True), "message": (str, True), "at": (_NUM, True)}
#: A TASK_RETRY entry: the final task, and the id the client chose for the new one.
RETRY_REF: _Schema = {"id": (bytes, True), "new_id": (bytes, True)}


# Per schema: (field, the exact types accepted, required). Batches check thousands of
# entries per message, so the common case (every value of an exact expected type) takes
# this short path; anything else goes through _check_slow, which decides and names errors.
_PLANS: dict[int, tuple[_Schema, tuple[tuple[str, frozenset[type], bool], ...]]] = {}


def _plan(schema: _Schema) -> tuple[tuple[str, frozenset[type], bool], ...]:
    cached = _PLANS.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    plan = []
    for field, (types, required) in schema.items():
        exact = frozenset(types if isinstance(types, tuple) else (types,))
        if types is not bool:
            exact = exact - {bool}  # bool is an int in Python; never accepted as a number
        plan.append((field, exact, required))
    _PLANS[id(schema)] = (schema, tuple(plan))  # holds the schema, so its id stays unique
    return tuple(plan)


def check(where: str, body: Any, schema: _Schema) -> dict[str, Any]:
    """Check one map against a schema; return it or raise ProtocolError(bad_request)."""
    if type(body) is dict:
        for field, exact, required in _plan(schema):
            value = body.get(field)
            if value is None:
                if required:
                    break
                continue
            if type(value) not in exact:
                break
        else:
            return body
    return _check_slow(where, body, schema)


def _check_slow(where: str, body: Any, schema: _Schema) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: body must be a map")
    for field, (types, required) in schema.items():
        value = body.get(field)
        if value is None:
            if required:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: missing field {field!r}")
            continue
        # bool is an int in Python; never accept it where a number is meant
        if isinstance(value, bool) and types is not bool:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: field {field!r} has wrong type")
        if not isinstance(value, types):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"{where}: field {field!r} has type {type(value).__name__}",
            )
    return body


def check_at(where: str, i: int, entry: Any, schema: _Schema) -> dict[str, Any]:
    """Check entry ``i`` of a batch; only an error names it (``where[i]``), so the name is not
    formatted for every entry of a big batch."""
    try:
        return check(where, entry, schema)
    except ProtocolError:
        check(f"{where}[{i}]", entry, schema)  # the same error, naming the entry
        raise


def check_entries(where: str, entries: list[Any], schema: _Schema) -> list[dict[str, Any]]:
    """Check every entry of a batch; task ids must also be 16 bytes long."""
    for i, e in enumerate(entries):
        check_at(where, i, e, schema)
        tid = e.get("id")
        if tid is not None and len(tid) != ID_BYTES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}[{i}]: field 'id' must be {ID_BYTES} bytes")
    return entries


def encode(kind: MsgKind, body: dict[str, Any]) -> list[bytes]:
    """Frames of one message, without the routing identity."""
    return [MAGIC, bytes((kind,)), codec.pack(body)]


def decode(frames: Sequence[bytes]) -> tuple[MsgKind, dict[str, Any]]:
    """Parse ``[MAGIC, kind, body]`` and validate the body against its kind's schema."""
    if len(frames) != 3:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"expected 3 frames, got {len(frames)}")
    magic, kind_frame, body_frame = frames
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"bad magic {bytes(magic[:8])!r}, expected {MAGIC!r}")
    if len(kind_frame) != 1:
        raise ProtocolError(ErrorCode.BAD_FRAME, "kind frame must be one byte")
    try:
        kind = MsgKind(kind_frame[0])
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown message kind {kind_frame[0]}") from None
    try:
        body = codec.unpack_body(body_frame)
    except DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{kind.name}: {exc}") from exc
    return kind, check(kind.name, body, SCHEMAS[kind])
