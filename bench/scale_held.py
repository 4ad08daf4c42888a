"""The scale run's held tasks: tasks that each depend on one other, and delayed tasks.

The submitter of bench/scale.py sends these after its pending tasks: ``n`` base tasks, ``n``
tasks each referring to one base task's result (a task reference in its arguments, so the
master scans, holds and later rewrites each one), and ``n`` tasks delayed by ``DELAY_S``, long
enough to be held through the idle phase and to come due during the drain.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from poolfleet.common.codec import REF_EXT
from poolfleet.common.ids import new_task_id

#: How long the delayed tasks wait: past the end of a million-task submit and the idle phase.
DELAY_S = 30.0


def held_entries(n: int, name: str, queue: str, payload: bytes) -> Iterator[dict[str, Any]]:
    """SUBMIT entries: ``n`` bases, ``n`` dependents (each referring to one base), ``n`` delayed;
    each dependent right after its base, so a batch never refers to a task not yet sent."""
    for _ in range(n):
        base = new_task_id()
        yield {"id": base, "name": name, "payload": payload, "queue": queue}
        ref = msgpack.packb([[msgpack.ExtType(REF_EXT, base)], {}], use_bin_type=True)
        yield {"id": new_task_id(), "name": name, "payload": ref, "queue": queue, "refs": True}
    for _ in range(n):
        yield {"id": new_task_id(), "name": name, "payload": payload, "queue": queue, "delay_s": DELAY_S}


def held_open(counts: dict[str, int]) -> int:
    """Tasks still held back (WAITING or DELAYED) in a STATUS count."""
    return counts.get("WAITING", 0) + counts.get("DELAYED", 0)
