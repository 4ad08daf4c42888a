"""Task ids: 128-bit, time-ordered (UUIDv7 layout), made by the client."""

from __future__ import annotations

import os
import time
import uuid

from poolfleet.common.errors import PoolfleetError


def new_task_id() -> bytes:
    """A fresh 16-byte id: 48 bits of Unix milliseconds, version 7, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return value.to_bytes(16, "big")


def format_id(task_id: bytes) -> str:
    """Human form of an id (canonical UUID text)."""
    return str(uuid.UUID(bytes=bytes(task_id)))


def parse_id(text: str) -> bytes:
    """Parse the human form (with or without dashes) back to 16 bytes."""
    try:
        return uuid.UUID(text.strip()).bytes
    except ValueError as exc:
        raise PoolfleetError(f"not a task id: {text!r} (expected 32 hex digits)") from exc
