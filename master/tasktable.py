"""The master's open tasks by id, with the tasks nothing has looked at yet kept cold.

A task submitted and queued, and not yet dispatched or looked up, needs no record of its
own: the tasks of one SUBMIT that share a lane also share their name, options and creation
time (a ``ColdBatch``), which also packs their ids and payloads side by side; the table
keeps only the id's entry pointing at the batch. That is about 270 bytes a pending task
less than a ``TaskRecord`` (and nothing for the garbage collector to walk). Any look-up by id (``get``, ``[]``, ``in``,
``pop``) turns a cold task into its record first (``thaw``), so the core's code reads and
changes records only; the scheduler thaws a task when it reaches the front of its lane.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from poolfleet.common.protocol import Kind
from poolfleet.master.state import TaskRecord

#: the width of a task id (common/ids.py); a cold task's id is found in its batch by it
ID_BYTES = 16
#: a payload bigger than this makes a record at once: its batch would keep a copy of it
#: after the task leaves the batch, until the batch's last task does (a record costs little
#: beside such a payload)
COLD_PAYLOAD_MAX = 1024


@dataclass(slots=True)
class ColdBatch:
    """What the cold tasks of one SUBMIT in one lane share, and their ids and payloads packed
    side by side (16 bytes of id, the payload, 4 bytes of offset a task)."""

    name: str
    queue: str
    kind: Kind
    route: str
    priority: int
    timeout_s: float | None
    retries: int | None
    created_at: float
    seq: int  # the scheduler's order number of the batch (the FIFO order across names)
    ids: bytearray = field(default_factory=bytearray)
    blob: bytearray = field(default_factory=bytearray)
    ends: array[int] = field(default_factory=lambda: array("I"))
    cursor: int = 0  # where the next thaw looks first: the scheduler takes the tasks in order

    def add(self, tid: bytes, payload: bytes) -> None:
        self.ids += tid
        self.blob += payload
        self.ends.append(len(self.blob))

    def index(self, tid: bytes, hint: int) -> int:
        """The position of ``tid`` in the batch, looked for at ``hint`` first."""
        ids = self.ids
        if ids.startswith(tid, hint * ID_BYTES):
            return hint
        i = ids.find(tid)
        while i % ID_BYTES:  # found across two ids: not it
            if i < 0:
                raise KeyError(tid)
            i = ids.find(tid, i + 1)
        return i // ID_BYTES

    def payload(self, k: int) -> bytes:
        return bytes(self.blob[self.ends[k - 1] if k else 0 : self.ends[k]])

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

    The dict holds the records; ``cold`` each cold task's batch by id. ``len``, ``in``,
    iteration, ``get``, ``[]`` and ``pop`` see both; ``values()`` thaws every cold task first
    (for the rare walks over all tasks that may change them), ``snapshot()`` does not."""

    __slots__ = ("cold",)

    def __init__(self) -> None:
        super().__init__()
        #: a cold task's batch by its id (the batch goes when no cold task refers to it)
        self.cold: dict[bytes, ColdBatch] = {}

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
        return ColdBatch(name, queue, kind, route, priority, timeout_s, retries, created_at, seq)

    def put_cold(self, tid: bytes, payload: bytes, batch: ColdBatch) -> None:
        """Keep ``tid`` cold in ``batch`` (or as its record at once, when its id or payload
        does not fit a batch: the scheduler's look-up finds either)."""
        if len(tid) != ID_BYTES or len(payload) > COLD_PAYLOAD_MAX:
            dict.__setitem__(self, tid, batch.record(tid, payload))
            return
        batch.add(tid, payload)
        self.cold[tid] = batch

    def thaw(self, tid: bytes) -> TaskRecord | None:
        """The record of cold task ``tid``, now kept as a record (None: not a cold task)."""
        batch = self.cold.pop(tid, None)
        if batch is None:
            return None
        k = batch.index(tid, batch.cursor)
        batch.cursor = k + 1
        rec = batch.record(tid, batch.payload(k))
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
        return self.cold.get(tid) if rec is None else rec

    def snapshot(self) -> Iterator[TaskRecord]:
        """Every open task, cold ones as throwaway records (nothing thawed): for reading only."""
        yield from dict.values(self)
        hints: dict[int, int] = {}  # a batch's tasks come in their order: look there first
        for tid, batch in list(self.cold.items()):
            k = batch.index(tid, hints.get(id(batch), 0))
            hints[id(batch)] = k + 1
            yield batch.record(tid, batch.payload(k))

    def cold_items(self) -> Iterator[tuple[bytes, ColdBatch]]:
        """Each cold task's id with its batch (nothing thawed)."""
        yield from self.cold.items()  # (a thaw meanwhile would be an error)

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
