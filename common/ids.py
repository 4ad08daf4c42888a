"""Task ids: 128-bit, time-ordered (UUIDv7 layout), made by the client."""

from __future__ import annotations

import os
import threading
import time
import uuid

from poolfleet.common.errors import PoolfleetError


class _Entropy:
    """os.urandom read 4 KiB at a time: one call per id costs a system call that also hands
    the GIL to other threads (the client's connection thread), several times the rest of
    the id. Refilled after fork, so two processes never share bytes."""

    SIZE = 4096

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        with self.lock:
            if self.pos + n > len(self.buf):
                self.buf, self.pos = os.urandom(self.SIZE), 0
            out = self.buf[self.pos : self.pos + n]
            self.pos += n
            return out

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.buf, self.pos = b"", 0


_entropy = _Entropy()
os.register_at_fork(after_in_child=_entropy.reset)


def new_task_id() -> bytes:
    """A fresh 16-byte id: 48 bits of Unix milliseconds, version 7, 74 random bits."""
    return new_task_ids(1)[0]


def new_task_ids(n: int) -> list[bytes]:
    """``n`` fresh ids (see :func:`new_task_id`), sharing one clock reading."""
    prefix = ((time.time_ns() // 1_000_000) & ((1 << 48) - 1)).to_bytes(6, "big")
    size = 10 * n
    rand = _entropy.take(size) if size <= _Entropy.SIZE else os.urandom(size)
    out = []
    for i in range(0, size, 10):
        r = rand[i : i + 10]
        # version 7 in the high nibble of byte 6, RFC 4122 variant in the top bits of byte 8
        out.append(prefix + bytes((0x70 | (r[0] & 0x0F), r[1], 0x80 | (r[2] & 0x3F))) + r[3:])
    return out


def format_id(task_id: bytes) -> str:
    """Human form of an id (canonical UUID text)."""
    if len(task_id) != 16:
        return str(uuid.UUID(bytes=bytes(task_id)))  # raises ValueError, as uuid does
    h = task_id.hex()  # three times faster than uuid.UUID, on a per-task path
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


#: What a task id looks like, for error messages.
ID_FORM = (
    "a task id is the 36-character form ptask prints, like 0190f1b2-3c4d-7e5f-8a6b-7c8d9e0f1a2b, "
    "with or without its dashes (32 hex digits)"
)


def parse_id(text: str) -> bytes:
    """Parse the human form (with or without dashes) back to 16 bytes."""
    try:
        return uuid.UUID(text.strip()).bytes
    except ValueError as exc:
        raise PoolfleetError(f"not a task id: {text!r}; {ID_FORM}") from exc
