"""Task arguments decode on the worker within the codec's limits, with errors naming them."""

from __future__ import annotations

import struct

import msgpack
import pytest

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError
from poolfleet.worker.registry import TaskRegistry
from poolfleet.worker.runner import ARGUMENT_LIMITS, decode_call, execute


def test_ordinary_arguments_decode() -> None:
    assert decode_call(codec.pack_call([1, "a", [2, {"k": b"v"}]], {"x": None})) == (
        [1, "a", [2, {"k": b"v"}]],
        {"x": None},
    )


def _array_of_empties(n: int) -> bytes:
    return b"\xdd" + struct.pack(">I", n) + b"\x90" * n


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        # 1.2 million empty lists in two arrays: over the item budget of the whole document
        (
            b"\x92\x92" + _array_of_empties(600_000) * 2 + b"\x80",
            "more than 1000000 array items and map entries",
        ),
        # one array longer than arrays may be
        (b"\x92" + _array_of_empties(1_000_001) + b"\x80", "max_array_len(1000000)"),
        # a string longer than strings may be
        (msgpack.packb([["x" * (16 * 2**20 + 1)], {}]), "max_str_len"),
    ],
)
def test_arguments_over_a_limit_are_refused_naming_it(payload: bytes, named: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_call(payload)
    assert named in str(info.value)
    assert "decoding limits" in str(info.value) and ARGUMENT_LIMITS in str(info.value)


def test_a_refused_argument_fails_the_task_as_data() -> None:
    registry = TaskRegistry.load(())
    payload = b"\x92\x91" + _array_of_empties(1_000_001) + b"\x80"
    state, value, error, _, _ = execute(registry, b"\x01" * 16, 1, "poolfleet.worker.builtins:echo", payload)
    assert state == "FAILED" and value is None and error is not None
    assert error["type"] == "poolfleet.common.errors.DecodeError"
    assert "max_array_len" in error["message"]


def test_not_a_call_is_refused() -> None:
    with pytest.raises(DecodeError, match=r"\[args, kwargs\]"):
        decode_call(codec.pack({"a": 1}))
