"""Framing and schema checks: every kind round-trips, every malformed frame is a ProtocolError."""

from __future__ import annotations

from typing import Any

import pytest

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import MAGIC, ErrorCode, MsgKind

TID = bytes(range(16))

# The smallest body each kind accepts (required fields only).
MINIMAL: dict[MsgKind, dict[str, Any]] = {
    MsgKind.HELLO: {"version": 1, "role": "client"},
    MsgKind.WELCOME: {"version": 1, "master_id": "m1"},
    MsgKind.ERROR: {"code": "bad_request", "message": "no"},
    MsgKind.HEARTBEAT: {},
    MsgKind.SUBMIT: {"req": 1, "tasks": []},
    MsgKind.RESULT_GET: {"req": 2, "ids": [TID]},
    MsgKind.CANCEL: {"req": 3, "ids": [TID]},
    MsgKind.STATUS: {"req": 4},
    MsgKind.WORKERS: {"req": 5},
    MsgKind.TASKS: {"req": 6},
    MsgKind.TASK_SHOW: {"req": 7, "id": TID},
    MsgKind.RESOLVE: {"req": 8, "prefixes": ["01a2"]},
    MsgKind.TASK_RETRY: {"req": 9, "tasks": []},
    MsgKind.QUEUE_CONTROL: {"req": 10, "queue": "default", "action": "pause"},
    MsgKind.SUBMITTED: {"req": 1, "accepted": [TID], "rejected": []},
    MsgKind.RESULTS: {"results": []},
    MsgKind.CANCEL_REPLY: {"req": 3, "results": []},
    MsgKind.STATUS_REPLY: {"req": 4},
    MsgKind.WORKERS_REPLY: {"req": 5, "workers": []},
    MsgKind.TASKS_REPLY: {"req": 6, "tasks": []},
    MsgKind.TASK_SHOW_REPLY: {"req": 7},
    MsgKind.RESOLVE_REPLY: {"req": 8, "ids": []},
    MsgKind.TASK_RETRY_REPLY: {"req": 9, "results": []},
    MsgKind.QUEUE_CONTROL_REPLY: {
        "req": 10,
        "queue": "default",
        "paused": True,
        "changed": True,
        "pending": 0,
    },
    MsgKind.DISPATCH: {"tasks": []},
    MsgKind.CANCEL_TASKS: {"tasks": []},
    MsgKind.TASK_RESULTS: {"results": []},
    MsgKind.RETURN: {"tasks": []},
    MsgKind.DRAINING: {},
    MsgKind.BYE: {},
    MsgKind.ACK: {"tasks": []},
    MsgKind.RECALL: {"tasks": []},
    MsgKind.STARTED: {"tasks": []},
    MsgKind.SCHEDULE_CONTROL: {"req": 11, "action": "list"},
    MsgKind.SCHEDULE_CONTROL_REPLY: {"req": 11, "action": "list", "changed": False, "schedules": []},
    MsgKind.LIMIT_CONTROL: {"req": 12, "action": "list"},
    MsgKind.LIMIT_CONTROL_REPLY: {"req": 12, "action": "list", "changed": False, "limits": []},
    MsgKind.TASKS_STARTED: {"tasks": []},
    MsgKind.CODE_FETCH: {"hashes": [bytes(32)]},
    MsgKind.CODE_BLOBS: {"blobs": []},
    MsgKind.CODE_PUT: {"req": 11, "hash": bytes(32), "blob": b"x", "python": "3.11", "cloudpickle": "3.1.1"},
    MsgKind.CODE_PUT_REPLY: {"req": 11, "hash": bytes(32), "stored": True, "workers": 1},
    MsgKind.TASK_UPDATE: {"tasks": []},
    MsgKind.CONTROL: {"action": "drain"},
    MsgKind.TASK_LOGS: {"req": 11, "id": TID},
    MsgKind.TASK_LOGS_REPLY: {"req": 11, "found": False},
    MsgKind.PROGRESS: {"tasks": []},
    MsgKind.QUEUE_PURGE: {"req": 12, "queue": "default"},
    MsgKind.QUEUE_PURGE_REPLY: {"req": 12, "queue": "default", "count": 0},
    MsgKind.WORKER_CONTROL: {"req": 13, "worker": "w1", "action": "drain"},
    MsgKind.WORKER_CONTROL_REPLY: {"req": 13, "found": True},
}


def test_every_kind_has_a_schema_and_a_minimal_body() -> None:
    assert set(messages.SCHEMAS) == set(MsgKind)
    assert set(MINIMAL) == set(MsgKind)


@pytest.mark.parametrize("kind", list(MsgKind), ids=lambda k: k.name)
def test_encode_decode_roundtrip(kind: MsgKind) -> None:
    frames = messages.encode(kind, MINIMAL[kind])
    assert frames[0] == MAGIC == b"PF1"
    assert frames[1] == bytes([int(kind)])
    assert messages.decode(frames) == (kind, MINIMAL[kind])


def test_full_bodies_roundtrip() -> None:
    hello = {
        "version": 1,
        "role": "worker",
        "worker_id": "w1",
        "host": "h",
        "pid": 42,
        "queues": ["default"],
        "slots": {"cpu": 2, "io": 8},
        "tasks": {"m:f": {"kind": "cpu", "timeout_s": None, "retries": 0}},
        "holding": [{"id": TID, "attempt": 1}],
    }
    submit = {
        "req": 7,
        "wait": True,
        "tasks": [
            {
                "id": TID,
                "name": "m:f",
                "payload": codec.pack_call((1,), {}),
                "kind": "cpu",
                "queue": "q",
                "timeout_s": 1.5,
                "retries": 2,
            }
        ],
    }
    results = {
        "results": [{"id": TID, "attempt": 1, "state": "SUCCEEDED", "value": b"\x01", "duration_ms": 3}],
        "held": {"io": 1},
    }
    for kind, body in [(MsgKind.HELLO, hello), (MsgKind.SUBMIT, submit), (MsgKind.TASK_RESULTS, results)]:
        assert messages.decode(messages.encode(kind, body)) == (kind, body)


def _error(frames: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        messages.decode(frames)
    return info.value


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_wrong_frame_count(count: int) -> None:
    frames = [*messages.encode(MsgKind.STATUS, {"req": 1}), b"extra"][:count]
    if count == 4:
        assert len(frames) == 4
    err = _error(frames)
    assert err.code == ErrorCode.BAD_FRAME
    assert f"expected 3 frames, got {count}" in err.message


def test_bad_magic() -> None:
    err = _error([b"PF2", bytes([MsgKind.STATUS]), codec.pack({"req": 1})])
    assert err.code == ErrorCode.BAD_FRAME
    assert "bad magic" in err.message and "PF2" in err.message


def test_kind_frame_must_be_one_byte() -> None:
    err = _error([MAGIC, b"\x0d\x00", codec.pack({"req": 1})])
    assert err.code == ErrorCode.BAD_FRAME
    assert "one byte" in err.message
    assert _error([MAGIC, b"", codec.pack({"req": 1})]).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("byte", [0, 5, 99, 255])
def test_unknown_kind(byte: int) -> None:
    err = _error([MAGIC, bytes([byte]), codec.pack({})])
    assert err.code == ErrorCode.BAD_FRAME
    assert f"unknown message kind {byte}" in err.message


def test_bad_msgpack_body() -> None:
    err = _error([MAGIC, bytes([MsgKind.STATUS]), b"\xc1"])
    assert err.code == ErrorCode.BAD_FRAME
    assert err.message.startswith("STATUS: malformed msgpack")


def test_body_must_be_a_map() -> None:
    err = _error([MAGIC, bytes([MsgKind.STATUS]), codec.pack([1])])
    assert err.code == ErrorCode.BAD_REQUEST
    assert "body must be a map" in err.message


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (MsgKind.STATUS, {}, "req"),
        (MsgKind.SUBMIT, {"req": 1}, "tasks"),
        (MsgKind.HELLO, {"role": "client"}, "version"),
        (MsgKind.ERROR, {"code": "x"}, "message"),
        (MsgKind.STATUS, {"req": None}, "req"),  # nil counts as absent
    ],
)
def test_missing_required_field(kind: MsgKind, body: dict[str, Any], field: str) -> None:
    err = _error(messages.encode(kind, body))
    assert err.code == ErrorCode.BAD_REQUEST
    assert f"missing field {field!r}" in err.message
    assert err.message.startswith(kind.name)


@pytest.mark.parametrize(
    ("kind", "body", "field", "type_name"),
    [
        (MsgKind.STATUS, {"req": "1"}, "req", "str"),
        (MsgKind.STATUS, {"req": 1.0}, "req", "float"),
        (MsgKind.SUBMIT, {"req": 1, "tasks": {}}, "tasks", "dict"),
        (MsgKind.SUBMIT, {"req": 1, "tasks": [], "wait": 1}, "wait", "int"),
        (MsgKind.HELLO, {"version": 1, "role": b"client"}, "role", "bytes"),
        (MsgKind.WELCOME, {"version": 1, "master_id": "m", "liveness": 1.5}, "liveness", "float"),
    ],
)
def test_wrong_field_type(kind: MsgKind, body: dict[str, Any], field: str, type_name: str) -> None:
    err = _error(messages.encode(kind, body))
    assert err.code == ErrorCode.BAD_REQUEST
    assert f"field {field!r} has type {type_name}" in err.message


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (MsgKind.STATUS, {"req": True}, "req"),
        (MsgKind.HELLO, {"version": True, "role": "worker"}, "version"),
        (
            MsgKind.WELCOME,
            {"version": 1, "master_id": "m", "heartbeat_interval_s": False},
            "heartbeat_interval_s",
        ),
    ],
)
def test_bool_is_not_accepted_where_a_number_is_expected(
    kind: MsgKind, body: dict[str, Any], field: str
) -> None:
    err = _error(messages.encode(kind, body))
    assert err.code == ErrorCode.BAD_REQUEST
    assert f"field {field!r} has wrong type" in err.message


def test_bool_field_accepts_bool() -> None:
    assert (
        messages.decode(messages.encode(MsgKind.SUBMIT, {"req": 1, "tasks": [], "wait": False}))[1]["wait"]
        is False
    )


def test_numbers_accept_int_and_float() -> None:
    for t in (1, 1.5):
        entry = {"id": TID, "attempt": 1, "name": "m:f", "kind": "cpu", "payload": b"", "timeout_s": t}
        assert messages.check("x", entry, messages.DISPATCH_TASK)["timeout_s"] == t


def test_unknown_fields_are_ignored() -> None:
    body = {"req": 1, "future_field": [1, 2]}
    assert messages.decode(messages.encode(MsgKind.STATUS, body)) == (MsgKind.STATUS, body)


def test_check_entries_names_the_bad_entry() -> None:
    good = {"id": TID, "attempt": 1}
    with pytest.raises(ProtocolError) as info:
        messages.check_entries("RETURN.tasks", [good, {"id": TID, "attempt": "1"}], messages.TASK_REF)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert info.value.message.startswith("RETURN.tasks[1]: field 'attempt'")
    with pytest.raises(ProtocolError, match=r"RETURN.tasks\[0\]: body must be a map"):
        messages.check_entries("RETURN.tasks", [[TID, 1]], messages.TASK_REF)
    assert messages.check_entries("RETURN.tasks", [good], messages.TASK_REF) == [good]


@pytest.mark.parametrize(
    ("schema", "entry", "problem"),
    [
        (messages.SUBMIT_TASK, {"id": TID, "name": "m:f"}, "missing field 'payload'"),
        (messages.SUBMIT_TASK, {"id": "00", "name": "m:f", "payload": b""}, "field 'id' has type str"),
        (messages.SUBMIT_TASK, {"id": TID, "name": "m:f", "payload": b"", "retries": True}, "wrong type"),
        (messages.DISPATCH_TASK, {"id": TID, "attempt": 1, "name": "m:f", "payload": b""}, "'kind'"),
        (
            messages.TASK_RESULT,
            {"id": TID, "attempt": 1, "state": "FAILED", "lost": 1},
            "'lost' has type int",
        ),
        (
            messages.TASK_RESULT,
            {"id": TID, "attempt": 1, "state": "FAILED", "error": "x"},
            "'error' has type",
        ),
    ],
)
def test_entry_schemas(schema: Any, entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ProtocolError) as info:
        messages.check("e", entry, schema)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert problem in info.value.message


def test_body_item_budget_is_a_bad_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_BODY_ITEMS", 10)
    small = {"req": 1, "ids": [TID] * 3}
    assert messages.decode(messages.encode(MsgKind.RESULT_GET, small))[1] == small
    err = _error(messages.encode(MsgKind.RESULT_GET, {"req": 1, "ids": [TID] * 20}))
    assert err.code == ErrorCode.BAD_FRAME
    assert err.message.startswith("RESULT_GET: ")


def test_batch_entries_need_16_byte_task_ids() -> None:
    good = {"id": b"\x01" * 16, "attempt": 1, "state": "FAILED"}
    assert messages.check_entries("TASK_RESULTS.results", [good], messages.TASK_RESULT) == [good]
    bad = dict(good, id=b"short")
    with pytest.raises(ProtocolError, match=r"results\[1\]: field 'id' must be 16 bytes") as info:
        messages.check_entries("TASK_RESULTS.results", [good, bad], messages.TASK_RESULT)
    assert info.value.code == "bad_request"
