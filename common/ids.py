"""Task ids: 128-bit, time-ordered (UUIDv7 layout), made by the client."""

from __future__ import annotations

import os
import threading
import time
import uuid

from poolfleet.common.errors import PoolfleetError

#: The 74 bits after the version and variant bits: a counter within one millisecond.
_COUNTER_BITS = 74
_LOW_BITS = 62  # below the variant bits
_LOW_MASK = (1 << _LOW_BITS) - 1
#: A millisecond's counter starts at a random number below this, so that it can count up
#: by 2**73 ids before it runs out (then it moves on to the next millisecond).
_SEED_LIMIT = 1 << (_COUNTER_BITS - 1)
#: A clock that steps back by more than this is followed (the order of ids made across that
#: step is lost): otherwise one reading far ahead would date every later id of the process.
STEP_BACK_MS = 1000


class _Clock:
    """The millisecond and counter the last id was made with (RFC 9562, section 6.2, method
    2: monotonic random). A new millisecond starts the counter at a random value; ids made in
    the same millisecond count up from it, so every id this process makes sorts after the one
    before it, also when many share a clock reading or the clock steps back (by up to
    ``STEP_BACK_MS``).

    That order matters for the journal: the master inserts a SUBMIT's tasks in their order,
    and ids in order land on the B-tree's last pages. With 74 random bits instead, the 50,000
    ids of one ``submit_many`` (one clock reading) were spread over the whole run of tasks
    written so far, and each commit of 1,000 of them wrote 500-900 pages to the WAL instead
    of 40-60 (docs/BENCHMARKS.md, fourteenth round). Reset after fork, so that a child
    never continues its parent's counter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ms = -1
        self.counter = 0

    def take(self, n: int) -> tuple[int, int]:
        """Reserve ``n`` ids: (millisecond, first counter value)."""
        ms = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
        with self.lock:
            if self.ms - STEP_BACK_MS <= ms <= self.ms:
                ms, first = self.ms, self.counter + 1
                if first + n > 1 << _COUNTER_BITS:  # the counter ran out: the next millisecond
                    ms, first = ms + 1, int.from_bytes(os.urandom(10), "big") % _SEED_LIMIT
            else:
                first = int.from_bytes(os.urandom(10), "big") % _SEED_LIMIT
            self.ms, self.counter = ms, first + n - 1
            return ms, first

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.ms, self.counter = -1, 0


_clock = _Clock()
os.register_at_fork(after_in_child=lambda: _clock.reset())


def new_task_id() -> bytes:
    """A fresh 16-byte id: 48 bits of Unix milliseconds, version 7, 74 bits of a counter
    that starts at a random value each millisecond (see :class:`_Clock`)."""
    return new_task_ids(1)[0]


def new_task_ids(n: int) -> list[bytes]:
    """``n`` fresh ids (see :func:`new_task_id`), in ascending order, sharing one clock
    reading."""
    ms, first = _clock.take(n)
    top = (ms << 80) | (0x7 << 76) | (0b10 << 62)
    return [
        (top | ((c >> _LOW_BITS) << 64) | (c & _LOW_MASK)).to_bytes(16, "big")
        for c in range(first, first + n)
    ]


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
