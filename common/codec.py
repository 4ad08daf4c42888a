"""The msgpack codec: the only module of poolfleet that imports msgpack.

Decoding always applies size limits, so a hostile frame cannot make the
daemons allocate without bound. Encoding never falls back to pickle: a value
msgpack cannot represent raises :class:`EncodeError` naming its type.
"""

from __future__ import annotations

from typing import Any

import msgpack

from poolfleet.common.errors import DecodeError, EncodeError
from poolfleet.common.protocol import DEFAULT_MAX_MESSAGE_BYTES

#: Limits applied while decoding (bytes for buffers, items for containers).
MAX_STR_BYTES = 16 * 1024 * 1024
MAX_BIN_BYTES = DEFAULT_MAX_MESSAGE_BYTES
MAX_ARRAY_ITEMS = 1_000_000
MAX_MAP_ITEMS = 1_000_000


def _refuse(obj: object) -> object:
    cls = type(obj)
    name = cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    raise EncodeError(
        f"cannot encode value of type {name!r} with msgpack; "
        "use None, bool, int, float, str, bytes, list, tuple or dict"
    )


def pack(obj: Any) -> bytes:
    """Encode ``obj``; raise :class:`EncodeError` naming the type msgpack cannot take."""
    try:
        data: bytes = msgpack.packb(obj, default=_refuse, use_bin_type=True, strict_types=False)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value with msgpack: {exc}") from exc
    return data


def unpack(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Decode one msgpack document with limits; raise :class:`DecodeError` on any problem."""
    if len(data) > max_bytes:
        raise DecodeError(f"document of {len(data)} bytes exceeds limit {max_bytes}", data[:64])
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_BIN_BYTES,
            max_array_len=MAX_ARRAY_ITEMS,
            max_map_len=MAX_MAP_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}", data[:64]) from exc


def pack_call(args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]) -> bytes:
    """Encode a task's arguments as the opaque ``payload`` the master stores and forwards."""
    for key in kwargs:
        if not isinstance(key, str):
            raise EncodeError(f"keyword argument names must be str, not {type(key).__name__}")
    return pack([list(args), kwargs])


def unpack_call(payload: bytes) -> tuple[list[Any], dict[str, Any]]:
    """Decode a payload made by :func:`pack_call`."""
    doc = unpack(payload)
    if (
        not isinstance(doc, list)
        or len(doc) != 2
        or not isinstance(doc[0], list)
        or not isinstance(doc[1], dict)
    ):
        raise DecodeError("payload must be [args, kwargs]", payload[:64])
    return doc[0], doc[1]
