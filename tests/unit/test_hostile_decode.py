"""Hostile input, property-tested: whatever bytes arrive, the codec returns a value or
raises DecodeError, and ``messages.decode`` returns a body valid for its kind or raises
ProtocolError with a known code -- never any other exception.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from poolfleet.common import codec, messages
from poolfleet.common.errors import DecodeError, ProtocolError
from poolfleet.common.protocol import MAGIC, ErrorCode, MsgKind

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODES = {c.value for c in ErrorCode}
ALL_FIELDS = sorted({f for s in messages.SCHEMAS.values() for f in s})

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
# ...and without NaN, for comparing round trips.
_plain = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Map keys drawn mostly from the real field names, so bodies get deep into validation.
_keys = st.sampled_from(ALL_FIELDS) | st.text(max_size=6)
_bodies = st.dictionaries(_keys, _values, max_size=8)


def _type_ok(value: Any, types: Any) -> bool:
    if isinstance(value, bool) and types is not bool:
        return False
    return isinstance(value, types)


def valid_for(kind: MsgKind, body: Any) -> bool:
    """An independent statement of the schema rules."""
    if not isinstance(body, dict):
        return False
    for field, (types, required) in messages.SCHEMAS[kind].items():
        value = body.get(field)
        if value is None:
            if required:
                return False
        elif not _type_ok(value, types):
            return False
    return True


def _decode_contract(frames: list[bytes]) -> tuple[MsgKind, dict[str, Any]] | ProtocolError:
    """decode() either returns a valid body or raises ProtocolError; any other exception fails."""
    try:
        kind, body = messages.decode(frames)
    except ProtocolError as exc:
        assert exc.code in CODES, exc.code
        assert exc.message
        return exc
    assert isinstance(kind, MsgKind)
    assert valid_for(kind, body), (kind, body)
    return kind, body


# -- codec ---------------------------------------------------------------------------
@PROPS
@given(st.binary(max_size=200))
def test_unpack_of_any_bytes_is_a_value_or_a_decode_error(data: bytes) -> None:
    try:
        codec.unpack(data, max_items=codec.MAX_BODY_ITEMS)
    except DecodeError:
        pass


@PROPS
@given(_values, st.data())
def test_unpack_of_mutated_documents_is_a_value_or_a_decode_error(value: Any, data: st.DataObject) -> None:
    try:
        doc = bytearray(codec.pack(value))
    except Exception:  # noqa: BLE001 - NaN keys and the like: not the point here
        assume(False)
        return
    for _ in range(data.draw(st.integers(1, 4))):
        if not doc:
            break
        i = data.draw(st.integers(0, len(doc) - 1))
        doc[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(doc)))
    try:
        codec.unpack(bytes(doc[:cut]))
    except DecodeError:
        pass


@PROPS
@given(st.binary(max_size=100))
def test_unpack_call_of_any_bytes_is_args_and_kwargs_or_a_decode_error(data: bytes) -> None:
    try:
        args, kwargs = codec.unpack_call(data)
    except DecodeError:
        return
    assert isinstance(args, list) and isinstance(kwargs, dict)


@pytest.mark.parametrize(
    "header",
    [
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        b"\xdd\x7f\xff\xff\xff",  # array32 of 2 billion items
        b"\xdf\x7f\xff\xff\xff",  # map32 of 2 billion pairs
        b"\xc9\xff\xff\xff\xff\x01",  # ext32: refused
    ],
)
def test_lying_length_headers_fail_fast(header: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(DecodeError):
        codec.unpack(header + b"\x00" * 16)
    assert time.perf_counter() - start < 0.5


def test_deep_nesting_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        codec.unpack(b"\x91" * 100_000 + b"\xc0")


def _empty_lists(count: int) -> bytes:
    """An array of ``count`` empty arrays: one byte each on the wire, ~60 bytes each in Python."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def test_item_budget_bounds_what_a_body_may_expand_to() -> None:
    small = _empty_lists(1000)  # 1000 items in the outer array, plus 1001 arrays
    assert len(codec.unpack(small, max_items=2001)) == 1000
    with pytest.raises(DecodeError, match="more than 2000 array items"):
        codec.unpack(small, max_items=2000)
    # the same document spread over nested arrays counts just the same
    nested = b"\x92" + _empty_lists(600) + _empty_lists(600)
    with pytest.raises(DecodeError, match="array items and map entries"):
        codec.unpack(nested, max_items=1000)
    with pytest.raises(DecodeError):
        codec.unpack(codec.pack({str(i): i for i in range(600)} | {"x": list(range(600))}), max_items=1000)


def test_message_bodies_get_the_item_budget_but_task_payloads_do_not() -> None:
    half = codec.MAX_BODY_ITEMS // 2 + 1  # each array within max_array_len, together over the budget
    bomb = b"\x81\xa3req\x92" + _empty_lists(half) + _empty_lists(half)
    start = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        messages.decode([MAGIC, bytes([MsgKind.STATUS]), bomb])
    assert info.value.code == ErrorCode.BAD_FRAME
    assert "array items and map entries" in info.value.message
    assert time.perf_counter() - start < 10
    # task arguments are the task author's business: a big list of lists still travels
    payload = codec.pack_call([[[] for _ in range(codec.MAX_BODY_ITEMS // 2 + 10)]] * 3, {})
    args, _ = codec.unpack_call(payload)
    assert len(args) == 3


# -- messages --------------------------------------------------------------------------
@PROPS
@given(st.lists(st.binary(max_size=40), max_size=5))
def test_decode_of_any_frames(frames: list[bytes]) -> None:
    _decode_contract(frames)


@PROPS
@given(st.sampled_from(list(MsgKind)), _bodies)
def test_every_kind_validates_arbitrary_bodies(kind: MsgKind, body: dict[str, Any]) -> None:
    try:
        frames = messages.encode(kind, body)
    except Exception:  # noqa: BLE001 - unencodable draws are not messages
        assume(False)
        return
    out = _decode_contract(frames)
    if isinstance(out, ProtocolError):
        assert not valid_for(kind, codec.unpack(frames[2]))
        assert out.code == ErrorCode.BAD_REQUEST
        assert out.message.startswith(kind.name)
        # the message names the field at fault
        assert any(repr(f) in out.message for f in messages.SCHEMAS[kind]), out.message
    else:
        assert out[0] is kind
        assert valid_for(kind, body)


def _field_value(types: Any) -> st.SearchStrategy[Any]:
    by_type: dict[Any, st.SearchStrategy[Any]] = {
        int: st.integers(min_value=-(2**63), max_value=2**64 - 1),
        str: st.text(max_size=10),
        bytes: st.binary(max_size=20),
        bool: st.booleans(),
        list: st.lists(_plain, max_size=3),
        dict: st.dictionaries(st.text(max_size=5), _plain, max_size=3),
    }
    if isinstance(types, tuple):
        return st.one_of([by_type.get(t, st.floats(allow_nan=False)) for t in types])
    return by_type[types]


@st.composite
def _valid_message(draw: st.DrawFn) -> tuple[MsgKind, dict[str, Any]]:
    kind = draw(st.sampled_from(list(MsgKind)))
    body: dict[str, Any] = {}
    for field, (types, required) in messages.SCHEMAS[kind].items():
        if required or draw(st.booleans()):
            body[field] = draw(_field_value(types))
    return kind, body


@PROPS
@given(_valid_message())
def test_every_kind_accepts_the_bodies_its_schema_describes(msg: tuple[MsgKind, dict[str, Any]]) -> None:
    kind, body = msg
    assert messages.decode(messages.encode(kind, body)) == (kind, body)


@PROPS
@given(_valid_message(), st.data())
def test_mutated_valid_messages_are_valid_or_protocol_errors(
    msg: tuple[MsgKind, dict[str, Any]], data: st.DataObject
) -> None:
    frames = messages.encode(*msg)
    which = data.draw(st.integers(0, 2))
    frame = bytearray(frames[which])
    for _ in range(data.draw(st.integers(1, 3))):
        if frame and data.draw(st.booleans()):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
        else:
            del frame[data.draw(st.integers(0, len(frame))) :]
    frames[which] = bytes(frame)
    _decode_contract(frames)


@PROPS
@given(
    st.sampled_from(
        [
            ("SUBMIT.tasks", messages.SUBMIT_TASK),
            ("DISPATCH.tasks", messages.DISPATCH_TASK),
            ("TASK_RESULTS.results", messages.TASK_RESULT),
            ("RETURN.tasks", messages.TASK_REF),
        ]
    ),
    st.lists(st.dictionaries(_keys, _values, max_size=8) | _values, max_size=4),
)
def test_batch_entries_are_checked_one_by_one(where_schema: tuple[str, Any], entries: list[Any]) -> None:
    where, schema = where_schema
    try:
        checked = messages.check_entries(where, entries, schema)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST
        assert exc.message.startswith(where + "[")
        return
    assert checked == entries
    for entry in checked:
        for field, (types, required) in schema.items():
            value = entry.get(field)
            assert (value is None and not required) or _type_ok(value, types)
