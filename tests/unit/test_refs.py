"""Task references in the codec, the client's options for tasks that wait, and ptask's parsing."""

from __future__ import annotations

import datetime as dt

import msgpack
import pytest

from poolfleet.client.cli_later import parse_at, parse_delay, with_refs
from poolfleet.client.client import TaskOptions, TaskRef, eta_epoch, ref_ids
from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, EncodeError, PoolfleetError
from poolfleet.common.ids import format_id

A, B = b"a" * 16, b"b" * 16


def test_a_reference_is_the_documented_fixext_16_and_user_data_cannot_make_one() -> None:
    found: list[bytes] = []
    payload = codec.pack_call([codec.TaskRef(A)], {}, found)
    assert found == [A]
    assert bytes((0xD8, codec.REF_EXT)) + A in payload  # d8 01 + the 16 id bytes
    with pytest.raises(DecodeError, match="max_ext_len"):
        codec.unpack(payload)  # a worker (or anything decoding user data) refuses it
    with pytest.raises(EncodeError, match="TaskRef"):
        codec.pack_call([codec.TaskRef(A)], {})  # only where references are asked for
    with pytest.raises(DecodeError):
        codec.refs_in(msgpack.packb([[msgpack.ExtType(2, A)], {}]))  # another code
    with pytest.raises(DecodeError):
        codec.refs_in(msgpack.packb([[msgpack.ExtType(1, b"short")], {}]))


def test_references_at_any_depth_are_found_and_replaced_by_the_results() -> None:
    found: list[bytes] = []
    call = [[1, codec.TaskRef(A), {"k": [codec.TaskRef(B), codec.TaskRef(A)]}], {"kw": codec.TaskRef(B)}]
    payload = codec.pack_call(call[0], call[1], found)  # type: ignore[arg-type]
    assert codec.refs_in(payload) == [A, B, A, B] == found
    out = codec.substitute_refs(payload, {A: codec.pack([1, 2]), B: codec.pack({"x": None})})
    assert codec.unpack(out) == [[1, [1, 2], {"k": [{"x": None}, [1, 2]]}], {"kw": {"x": None}}]
    with pytest.raises(DecodeError, match="KeyError"):
        codec.substitute_refs(payload, {A: codec.pack(1)})


def test_futures_and_task_refs_name_their_task() -> None:
    tid = TaskRef(format_id(A))
    assert tid.id_bytes == A and TaskRef(A).id_bytes == A
    assert ref_ids([tid, format_id(B)]) == (A, B)
    with pytest.raises(PoolfleetError, match="not a task id"):
        TaskRef("nope")
    with pytest.raises(PoolfleetError, match="after= takes"):
        ref_ids([3])  # type: ignore[list-item]
    entry = TaskOptions(delay_s=2, eta=5.0, after=(A,)).apply({})
    assert entry == {"delay_s": 2.0, "eta": 5.0, "after": [A]}


def test_an_eta_must_be_an_aware_datetime() -> None:
    aware = dt.datetime(2026, 12, 24, 18, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert eta_epoch(aware) == dt.datetime(2026, 12, 24, 17, tzinfo=dt.UTC).timestamp()
    with pytest.raises(PoolfleetError, match="no time zone"):
        eta_epoch(dt.datetime(2026, 12, 24, 18))


def test_ptask_durations_times_and_references() -> None:
    assert [parse_delay(t) for t in ("90s", "90", "1.5m", "2h", "1d")] == [90, 90, 90, 7200, 86400]
    with pytest.raises(PoolfleetError, match="--delay"):
        parse_delay("soon")
    assert parse_at("2026-12-24T18:00:00+01:00") == parse_at("2026-12-24T17:00:00Z")
    with pytest.raises(PoolfleetError, match="offset"):
        parse_at("2026-12-24T18:00:00")
    with pytest.raises(PoolfleetError, match="ISO 8601"):
        parse_at("Christmas")
    seen: list[str] = []

    def resolve(text: str) -> str:
        seen.append(text)
        return format_id(A)

    out = with_refs([1, {"$ref": "0190"}, {"k": [{"$ref": "0191"}], "$ref": "not alone"}], resolve)
    assert isinstance(out[1], TaskRef) and out[1].id_bytes == A
    assert isinstance(out[2]["k"][0], TaskRef) and out[2]["$ref"] == "not alone"
    assert seen == ["0190", "0191"]
