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
#: Array items plus map entries in one message body, summed over the whole body.
MAX_BODY_ITEMS = 1_000_000
#: Entries of any one map in a message body (its fields, a task entry's, one per name a worker
#: offers). msgpack checks a map's length before building it, so a body that is one map of a
#: million keys is refused at once, not after 0.8 s of building it.
MAX_BODY_MAP_ITEMS = 10_000
#: msgpack's own nesting limit when packing.
_MAX_DEPTH = 512
#: The msgpack extension type code of a task reference (docs/PROTOCOL.md): its data is the
#: 16-byte id of the task whose result stands in its place. The only extension type poolfleet
#: uses; user data cannot produce it (the codec refuses every other extension).
REF_EXT = 1
_ID_BYTES = 16


class TaskRef:
    """A reference to another task's result, to stand in a task's arguments (at any depth):
    the master holds the task until that one has succeeded and puts its result in the place.
    The client's futures are TaskRefs too."""

    id_bytes: bytes

    def __init__(self, task_id: bytes) -> None:
        if not isinstance(task_id, bytes) or len(task_id) != _ID_BYTES:
            raise EncodeError("a task reference needs a 16-byte task id")
        self.id_bytes = task_id

    def __repr__(self) -> str:
        return f"TaskRef({self.id_bytes.hex()})"


def _type_name(obj: object) -> str:
    cls = type(obj)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _refuse(obj: object) -> object:
    if isinstance(obj, int):  # msgpack hands over the ints it cannot hold
        raise EncodeError(
            f"cannot encode an integer of {obj.bit_length()} bits with msgpack: "
            "integers must lie between -2**63 and 2**64-1"
        )
    raise EncodeError(
        f"cannot encode value of type {_type_name(obj)!r} with msgpack; "
        "use None, bool, int, float, str, bytes, list, tuple or dict"
    )


def check_map_keys(obj: Any) -> None:
    """Raise :class:`EncodeError` if a map anywhere in ``obj`` has a key that is not str or bytes.

    msgpack can encode such keys, but :func:`unpack` refuses them (``strict_map_key``).
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        cur, depth = stack.pop()
        if depth > _MAX_DEPTH:
            continue  # msgpack itself refuses nesting this deep (or a cycle)
        if isinstance(cur, dict):
            for key, value in cur.items():
                if not isinstance(key, str | bytes):
                    raise EncodeError(
                        f"cannot encode a map key of type {_type_name(key)!r} ({key!r:.40}); "
                        "map keys must be str or bytes"
                    )
                if isinstance(value, dict | list | tuple):
                    stack.append((value, depth + 1))
        elif isinstance(cur, list | tuple):
            stack.extend((v, depth + 1) for v in cur if isinstance(v, dict | list | tuple))


def _ref_default(found: list[bytes]) -> Any:
    """A packer hook that turns each :class:`TaskRef` into the reference extension type and
    records its id in ``found``."""

    def default(obj: object) -> object:
        if isinstance(obj, TaskRef):
            found.append(obj.id_bytes)
            return msgpack.ExtType(REF_EXT, obj.id_bytes)
        return _refuse(obj)

    return default


def pack(obj: Any, default: Any = None) -> bytes:
    """Encode ``obj``; raise :class:`EncodeError` naming the type msgpack cannot take."""
    try:
        data: bytes = msgpack.packb(obj, default=default or _refuse, use_bin_type=True, strict_types=False)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode value with msgpack: {exc}") from exc
    return data


#: Documents up to this size (and the string and binary limits) made only of
#: :data:`_SCALARS` and flat lists of them decode for sure: no map key to refuse, no
#: string or binary over its limit, far fewer items than the limit.
_PLAIN_MAX_BYTES = 64 * 1024
_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def _plain(obj: Any) -> bool:
    """True for a scalar, or a list/tuple whose items are scalars or flat lists/tuples of them
    (a task call is ``[args, kwargs]``: with no keyword arguments it is such a list)."""
    if type(obj) in _SCALARS:
        return True
    if type(obj) is not list and type(obj) is not tuple:
        return False
    for item in obj:
        t = type(item)
        if t in _SCALARS:
            continue
        if t is dict and not item:
            continue  # the empty kwargs of a call
        if (t is list or t is tuple) and all(type(x) in _SCALARS for x in item):
            continue
        return False
    return True


def pack_data(obj: Any, refs: list[bytes] | None = None) -> bytes:
    """Encode user data (task arguments, a task's value) and check :func:`unpack` takes it back.

    msgpack encodes a few things the decoder refuses on purpose (map keys other than
    str or bytes, over-long strings, documents over the size limit): they fail here,
    with an :class:`EncodeError`, where the error reaches whoever made the value.
    With ``refs`` (a list), each :class:`TaskRef` in ``obj`` becomes a reference and its id
    is appended to ``refs``; without, a TaskRef is refused like any other unknown type.
    """
    before = len(refs) if refs is not None else 0
    data = pack(obj, _ref_default(refs) if refs is not None else None)
    has_refs = refs is not None and len(refs) > before
    # no string or binary in it can be longer than the document itself
    if len(data) <= min(_PLAIN_MAX_BYTES, MAX_STR_BYTES, MAX_BIN_BYTES) and _plain(obj):
        return data  # nothing in it the decoder could refuse: skip the check (a third of the cost)
    try:
        unpack(data, ext_hook=_ignore_ref if has_refs else None)
    except DecodeError as exc:
        check_map_keys(obj)  # names the offending key when that is the problem
        raise EncodeError(f"value would not decode on the other side: {exc}") from None
    return data


class _ItemBudget:
    """Counts array elements and map entries as msgpack builds them; refuses past a limit.

    One byte of msgpack can become a 56-byte Python list, so a document's size alone does
    not bound the memory its decoding takes; this does.
    """

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def _take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise DecodeError(f"document holds more than {self.limit} array items and map entries")

    def list_hook(self, obj: list[Any]) -> list[Any]:
        self._take(len(obj) + 1)
        return obj

    def object_hook(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._take(len(obj) + 1)
        return obj


def _check_ref(code: int, data: bytes) -> bytes:
    if code != REF_EXT or len(data) != _ID_BYTES:
        raise DecodeError(f"unknown msgpack extension type {code} ({len(data)} bytes)")
    return data


def _ignore_ref(code: int, data: bytes) -> None:
    _check_ref(code, data)


def unpack(
    data: bytes,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_items: int | None = None,
    ext_hook: Any = None,
    max_map: int = MAX_MAP_ITEMS,
) -> Any:
    """Decode one msgpack document with limits; raise :class:`DecodeError` on any problem.

    ``max_items`` bounds the array items and map entries of the whole document (message
    bodies pass :data:`MAX_BODY_ITEMS`; task arguments and values have no such bound).
    Extension types are refused, unless ``ext_hook`` is given: it is called with each
    reference's code and data (see :data:`REF_EXT`) and its return value takes its place.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"document of {len(data)} bytes exceeds limit {max_bytes}", data[:64])
    hooks: dict[str, Any] = {}
    if max_items is not None:
        budget = _ItemBudget(max_items)
        hooks = {"list_hook": budget.list_hook, "object_hook": budget.object_hook}
    if ext_hook is not None:
        hooks["ext_hook"] = ext_hook
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_STR_BYTES,
            max_bin_len=MAX_BIN_BYTES,
            max_array_len=MAX_ARRAY_ITEMS,
            max_map_len=max_map,
            max_ext_len=_ID_BYTES if ext_hook is not None else 0,
            **hooks,
        )
    except DecodeError as exc:
        raise DecodeError(str(exc), data[:64]) from None
    except Exception as exc:  # msgpack raises a zoo of types on bad input
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}", data[:64]) from exc


def pack_call(
    args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], refs: list[bytes] | None = None
) -> bytes:
    """Encode a task's arguments as the opaque ``payload`` the master stores and forwards
    (with ``refs``: task references allowed in them, their ids appended; see pack_data)."""
    for key in kwargs:
        if not isinstance(key, str):
            raise EncodeError(f"keyword argument names must be str, not {type(key).__name__}")
    return pack_data([list(args), kwargs], refs)


def refs_in(payload: bytes) -> list[bytes]:
    """The ids of the task references in a payload, in order (DecodeError if malformed)."""
    found: list[bytes] = []

    def hook(code: int, data: bytes) -> None:
        found.append(_check_ref(code, data))

    unpack(payload, ext_hook=hook)
    return found


def substitute_refs(payload: bytes, values: dict[bytes, bytes]) -> bytes:
    """The payload with each reference replaced by the value (msgpack bytes) of its task.

    Raises DecodeError (a malformed payload or value, or a reference with no value) or
    EncodeError (the result cannot be encoded again).
    """
    decoded: dict[bytes, Any] = {}

    def hook(code: int, data: bytes) -> Any:
        tid = _check_ref(code, data)
        if tid not in decoded:
            decoded[tid] = unpack(values[tid])
        return decoded[tid]

    return pack(unpack(payload, ext_hook=hook))


def first_arg(payload: bytes) -> Any:
    """The first positional argument of a :func:`pack_call` payload, reading no further
    (None if there is none or the payload is not a call)."""
    u = msgpack.Unpacker(raw=False, max_buffer_size=len(payload) + 1)
    u.feed(payload)
    try:
        if u.read_array_header() != 2 or u.read_array_header() < 1:
            return None
        return u.unpack()
    except Exception:  # noqa: BLE001 - anything malformed has no first argument
        return None


def unpack_body(data: bytes) -> Any:
    """Decode a message body, within the limits of one (:data:`MAX_BODY_ITEMS`,
    :data:`MAX_BODY_MAP_ITEMS`)."""
    return unpack(data, max_items=MAX_BODY_ITEMS, max_map=MAX_BODY_MAP_ITEMS)


def peek_req(data: bytes, fields: int = 64) -> int | None:
    """The ``req`` of a body that may not decode (too big, malformed), read from its first
    ``fields`` fields without building the rest; None if not found."""
    u = msgpack.Unpacker(
        raw=False,
        max_buffer_size=len(data) + 1,
        max_str_len=MAX_STR_BYTES,
        max_bin_len=MAX_BIN_BYTES,
        max_array_len=MAX_ARRAY_ITEMS,
        max_map_len=2**31 - 1,  # the header only: nothing is built
        max_ext_len=0,
    )
    u.feed(data)
    try:
        n = u.read_map_header()
        for _ in range(min(n, fields)):
            key = u.unpack()
            if key == "req":
                value = u.unpack()
                return value if type(value) is int else None
            u.skip()
    except Exception:  # noqa: BLE001 - any failure: no req to echo
        return None
    return None


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
