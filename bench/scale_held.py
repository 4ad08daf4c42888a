"""The scale run's held tasks: tasks that each depend on one other, and delayed tasks.

The submitter of bench/scale.py sends these after its pending tasks: ``n`` base tasks, ``n``
tasks each referring to one base task's result (a task reference in its arguments, so the
master scans, holds and later rewrites each one), and ``n`` delayed tasks that come due together
(one ``eta``) just after the idle phase, early in the drain.

The due time is the submitter's estimate, not a fixed delay: with a fixed ``delay_s`` of 30 s
(the eighth to eleventh rounds), a machine that submitted and drained in less than that ended
every drain waiting for the delayed tasks, so the drain rate it reported (47,000 tasks/s at 100
workers and at 1,000 alike) was the delay's, not the master's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from poolfleet.common.codec import REF_EXT
from poolfleet.common.ids import new_task_id


def held_entries(
    n: int, name: str, queue: str, payload: bytes, eta_for: Callable[[int], float]
) -> Iterator[dict[str, Any]]:
    """SUBMIT entries: ``n`` bases, ``n`` dependents (each referring to one base), ``n`` delayed;
    each dependent right after its base, so a batch never refers to a task not yet sent. The
    delayed ones share the ``eta`` that ``eta_for(n)`` gives when the first of them is made
    (``n``: how many are still to be sent)."""
    for _ in range(n):
        base = new_task_id()
        yield {"id": base, "name": name, "payload": payload, "queue": queue}
        ref = msgpack.packb([[msgpack.ExtType(REF_EXT, base)], {}], use_bin_type=True)
        yield {"id": new_task_id(), "name": name, "payload": ref, "queue": queue, "refs": True}
    eta = eta_for(n) if n else 0.0
    for _ in range(n):
        yield {"id": new_task_id(), "name": name, "payload": payload, "queue": queue, "eta": eta}


def held_open(counts: dict[str, int]) -> int:
    """Tasks still held back (WAITING or DELAYED) in a STATUS count."""
    return counts.get("WAITING", 0) + counts.get("DELAYED", 0)
