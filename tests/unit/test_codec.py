"""The msgpack codec: round trips, clear encode errors, bounded and strict decoding."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, EncodeError, PoolfleetError

# Everything the codec promises to carry unchanged (lists stay lists, str keys).
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@settings(deadline=None)
@given(_values)
def test_roundtrip_preserves_value(value: Any) -> None:
    assert codec.unpack(codec.pack(value)) == value


def test_roundtrip_keeps_bytes_and_str_apart_and_turns_tuples_into_lists() -> None:
    doc = {"s": "text", "b": b"\x00\xff", "t": (1, (2, 3)), "f": 1.5, "n": None, "ok": True}
    out = codec.unpack(codec.pack(doc))
    assert out == {"s": "text", "b": b"\x00\xff", "t": [1, [2, 3]], "f": 1.5, "n": None, "ok": True}
    assert isinstance(out["b"], bytes) and isinstance(out["s"], str)


class Custom:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "'set'"),
        (frozenset(), "'frozenset'"),
        (object(), "'object'"),
        (Custom(), f"'{__name__}.Custom'"),
        ({"deep": [1, {"x": Custom()}]}, f"'{__name__}.Custom'"),
        (1j, "'complex'"),
    ],
)
def test_encode_error_names_the_type(value: object, type_name: str) -> None:
    with pytest.raises(EncodeError) as info:
        codec.pack(value)
    assert type_name in str(info.value)
    assert isinstance(info.value, PoolfleetError) and isinstance(info.value, TypeError)


def test_encode_error_for_out_of_range_int_says_so() -> None:
    assert codec.unpack(codec.pack(2**64 - 1)) == 2**64 - 1
    assert codec.unpack(codec.pack(-(2**63))) == -(2**63)
    with pytest.raises(EncodeError, match="integer of 65 bits") as info:
        codec.pack(2**64)
    assert "-2**63 and 2**64-1" in str(info.value)
    with pytest.raises(EncodeError, match="integer"):
        codec.pack(-(2**63) - 1)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # the one byte msgpack never uses
        b"\x93\x01",  # array of 3 with one item: truncated
        b"\x01\x02",  # two documents where one is expected
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"\xd4\x01\x00",  # ext types are refused
        b"\x81\x01\x02",  # {1: 2}: map keys must be str or bytes
        b"",
    ],
)
def test_decode_error_on_garbage_keeps_the_bytes(garbage: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        codec.unpack(garbage)
    assert info.value.data == garbage
    assert str(info.value).startswith("malformed msgpack")


def test_decode_error_keeps_only_a_prefix_of_large_input() -> None:
    data = b"\xc1" + b"x" * 1000
    with pytest.raises(DecodeError) as info:
        codec.unpack(data)
    assert info.value.data == data[:64]


def test_oversized_document_is_rejected_before_decoding() -> None:
    data = codec.pack("x" * 100)
    assert codec.unpack(data, max_bytes=len(data)) == "x" * 100
    with pytest.raises(DecodeError, match=f"{len(data)} bytes exceeds limit {len(data) - 1}"):
        codec.unpack(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"\xdd\xff\xff\xff\xff", "max_array_len"),  # array32 claiming 4 billion items
        (b"\xdf\xff\xff\xff\xff", "max_map_len"),  # map32 claiming 4 billion pairs
    ],
)
def test_container_headers_over_the_limits_are_refused(header: bytes, what: str) -> None:
    with pytest.raises(DecodeError, match=what):
        codec.unpack(header)


def test_string_and_binary_limits_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_STR_BYTES", 8)
    monkeypatch.setattr(codec, "MAX_BIN_BYTES", 8)
    assert codec.unpack(codec.pack("12345678")) == "12345678"
    with pytest.raises(DecodeError, match="max_str_len"):
        codec.unpack(codec.pack("123456789"))
    with pytest.raises(DecodeError, match="max_bin_len"):
        codec.unpack(codec.pack(b"123456789"))


def test_pack_call_roundtrip() -> None:
    payload = codec.pack_call((1, "a", [2]), {"k": {"x": b"y"}})
    assert codec.unpack_call(payload) == ([1, "a", [2]], {"k": {"x": b"y"}})
    assert codec.unpack(payload) == [[1, "a", [2]], {"k": {"x": b"y"}}]


def test_pack_call_refuses_non_str_keyword_names() -> None:
    with pytest.raises(EncodeError, match="keyword argument names must be str, not int"):
        codec.pack_call((), {1: "x"})  # type: ignore[dict-item]


def test_pack_call_refuses_unencodable_argument_naming_its_type() -> None:
    with pytest.raises(EncodeError, match="'set'"):
        codec.pack_call(({1},), {})


def test_pack_call_refuses_map_keys_the_decoder_would_refuse() -> None:
    # msgpack itself encodes {1: 'a'}, but the other side decodes with strict map keys:
    # fail now, naming the key, rather than on the worker.
    with pytest.raises(EncodeError, match=r"map key of type 'int' \(1\)"):
        codec.pack_call(([{"ok": {1: "a"}}],), {})
    with pytest.raises(EncodeError, match="map key of type 'tuple'"):
        codec.pack_call((), {"k": {(1, 2): "a"}})


def test_pack_data_refuses_what_unpack_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_STR_BYTES", 4)
    with pytest.raises(EncodeError, match="would not decode"):
        codec.pack_data(["12345"])
    assert codec.unpack(codec.pack_data(["1234"])) == ["1234"]


def test_check_map_keys_terminates_on_cycles() -> None:
    loop: list[Any] = []
    loop.append(loop)
    codec.check_map_keys(loop)  # returns: the depth guard stops the walk
    with pytest.raises(EncodeError):
        codec.pack(loop)


@pytest.mark.parametrize(
    "doc",
    [
        {"args": [], "kwargs": {}},  # a map, not [args, kwargs]
        [[1]],  # one element
        [[1], {}, {}],  # three elements
        [{"a": 1}, {}],  # args not a list
        [[1], [2]],  # kwargs not a map
        "text",
    ],
)
def test_unpack_call_validates_shape(doc: Any) -> None:
    payload = codec.pack(doc)
    with pytest.raises(DecodeError, match=r"payload must be \[args, kwargs\]") as info:
        codec.unpack_call(payload)
    assert info.value.data == payload[:64]


def test_unpack_call_on_garbage_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="malformed msgpack"):
        codec.unpack_call(b"\xc1")


def test_item_budget_bounds_a_whole_document() -> None:
    doc = [[1, 2, 3], {"a": 1, "b": 2}]  # 2 + 3 + 2 items and entries, plus 1 per container
    assert codec.unpack(codec.pack(doc), max_items=10) == doc
    with pytest.raises(DecodeError, match="more than 9 array items and map entries") as info:
        codec.unpack(codec.pack(doc), max_items=9)
    assert info.value.data == codec.pack(doc)
    assert codec.unpack(codec.pack(doc)) == doc  # no budget unless asked for


@pytest.mark.parametrize(
    "value",
    [None, 3, "x", b"y", [1, "a", b"b", None, 2.5, True], [[1, 2], {}], ((1, 2), (3,))],
)
def test_plain_values_round_trip_through_the_fast_path(value: Any) -> None:
    assert codec._plain(value)
    assert codec.unpack(codec.pack_data(value)) == codec.unpack(codec.pack(value))


@pytest.mark.parametrize("value", [[{"k": 1}], {"a": 1}, [[[1]]], [{1: 2}], [object()]])
def test_values_with_maps_or_nesting_take_the_checked_path(value: Any) -> None:
    assert not codec._plain(value)
