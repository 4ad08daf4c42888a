"""The master's open tasks by id, with the tasks nothing has looked at yet kept cold.

A task submitted and queued, and not yet dispatched or looked up, needs no record of its
own: the tasks of one SUBMIT that share a lane also share their name, options and creation
time (a ``ColdBatch``), so each is kept as one bytes object, its batch's number packed in
front of its payload. That is about 200 bytes a pending task less than a ``TaskRecord``
(and nothing for the garbage collector to walk). Any look-up by id (``get``, ``[]``, ``in``,
``pop``) turns a cold task into its record first (``thaw``), so the core's code reads and
changes records only; the scheduler thaws a task when it reaches the front of its lane.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from poolfleet.common.protocol import Kind
from poolfleet.master.state import TaskRecord

_NO = struct.Struct("<I")


@dataclass(slots=True)
class ColdBatch:
    """What the cold tasks of one SUBMIT in one lane share."""

    no: int
    name: str
    queue: str
    kind: Kind
    route: str
    priority: int
    timeout_s: float | None
    retries: int | None
    created_at: float
    seq: int  # the scheduler's order number of the batch (the FIFO order across names)
    left: int = 0  # its tasks still cold

    def record(self, tid: bytes, payload: bytes) -> TaskRecord:
        return TaskRecord(
            id=tid,
            name=self.name,
            queue=self.queue,
            kind=self.kind,
            payload=payload,
            timeout_s=self.timeout_s,
            retries=self.retries,
            created_at=self.created_at,
            route=self.route,
            priority=self.priority,
            seq=self.seq,
        )


class TaskTable(dict[bytes, TaskRecord]):
    """Open tasks by id: records, and cold tasks that become records when looked up.

    The dict holds the records; ``cold`` the packed cold tasks. ``len``, ``in``, iteration,
    ``get``, ``[]`` and ``pop`` see both; ``values()`` thaws every cold task first (for the
    rare walks over all tasks that may change them), ``snapshot()`` does not."""

    __slots__ = ("_next_no", "batches", "cold")

    def __init__(self) -> None:
        super().__init__()
        self.cold: dict[bytes, bytes] = {}
        self.batches: dict[int, ColdBatch] = {}
        self._next_no = 0

    # -- cold tasks ------------------------------------------------------------------------
    def batch(
        self,
        name: str,
        queue: str,
        kind: Kind,
        route: str,
        priority: int,
        timeout_s: float | None,
        retries: int | None,
        created_at: float,
        seq: int,
    ) -> ColdBatch:
        self._next_no = (self._next_no + 1) & 0xFFFFFFFF
        while self._next_no in self.batches:  # wrapped round onto a batch still open
            self._next_no = (self._next_no + 1) & 0xFFFFFFFF
        b = ColdBatch(self._next_no, name, queue, kind, route, priority, timeout_s, retries, created_at, seq)
        self.batches[b.no] = b
        return b

    def put_cold(self, tid: bytes, payload: bytes, batch: ColdBatch) -> None:
        if not batch.left:  # new, or every task of it thawed since (then it went): it is back
            self.batches[batch.no] = batch
        self.cold[tid] = _NO.pack(batch.no) + payload
        batch.left += 1

    def thaw(self, tid: bytes) -> TaskRecord | None:
        """The record of cold task ``tid``, now kept as a record (None: not a cold task)."""
        packed = self.cold.pop(tid, None)
        if packed is None:
            return None
        (no,) = _NO.unpack_from(packed)
        batch = self.batches[no]
        batch.left -= 1
        if not batch.left:
            del self.batches[no]
        rec = batch.record(tid, packed[_NO.size :])
        dict.__setitem__(self, tid, rec)
        return rec

    def resolve(self, tid: bytes) -> TaskRecord | None:
        """For the scheduler: the record of a task queued cold, thawed now or by a look-up
        before (None: it has left, e.g. cancelled)."""
        rec = self.thaw(tid)
        return dict.get(self, tid) if rec is None else rec

    def peek(self, tid: bytes) -> TaskRecord | ColdBatch | None:
        """The record of ``tid``, or for a cold task its batch (name, queue, kind ...),
        without thawing it."""
        rec = dict.get(self, tid)
        if rec is not None:
            return rec
        packed = self.cold.get(tid)
        return None if packed is None else self.batches[_NO.unpack_from(packed)[0]]

    def snapshot(self) -> Iterator[TaskRecord]:
        """Every open task, cold ones as throwaway records (nothing thawed): for reading only."""
        yield from dict.values(self)
        batches = self.batches
        for tid, packed in self.cold.items():  # (a thaw meanwhile would be an error)
            yield batches[_NO.unpack_from(packed)[0]].record(tid, packed[_NO.size :])

    def cold_items(self) -> Iterator[tuple[bytes, ColdBatch]]:
        """Each cold task's id with its batch (nothing thawed)."""
        batches = self.batches
        for tid, packed in self.cold.items():  # (a thaw meanwhile would be an error)
            yield tid, batches[_NO.unpack_from(packed)[0]]

    def thaw_all(self) -> None:
        for tid in list(self.cold):
            self.thaw(tid)

    #: the record of an id, None for a cold task as for an unknown one: for the ids workers
    #: send (a worker never holds a cold task) on the paths every result takes (dict's own get)
    record_of = dict.get

    # -- the dict's look-ups, cold tasks included ------------------------------------------
    def __missing__(self, tid: bytes) -> TaskRecord:
        rec = self.thaw(tid) if self.cold else None
        if rec is None:
            raise KeyError(tid)
        return rec

    def get(self, tid: bytes, default: None = None) -> TaskRecord | None:  # type: ignore[override]
        rec = dict.get(self, tid)
        if rec is None and self.cold:
            rec = self.thaw(tid)
        return rec

    def __contains__(self, tid: object) -> bool:
        return dict.__contains__(self, tid) or tid in self.cold

    def pop(self, tid: bytes, default: None = None) -> TaskRecord | None:  # type: ignore[override]
        """Remove and return the record of ``tid`` (None: no such open task)."""
        if self.cold and not dict.__contains__(self, tid):
            self.thaw(tid)
        return dict.pop(self, tid, None)

    def __len__(self) -> int:
        return dict.__len__(self) + len(self.cold)

    def __iter__(self) -> Iterator[bytes]:
        yield from dict.__iter__(self)
        yield from list(self.cold)

    def values(self) -> Any:
        self.thaw_all()
        return dict.values(self)

    def items(self) -> Any:
        self.thaw_all()
        return dict.items(self)

    def keys(self) -> Any:
        self.thaw_all()
        return dict.keys(self)
