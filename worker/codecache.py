"""The worker's shipped functions by hash, as fetched from the master: LRU, bounded by bytes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shipped:
    """A pickled function and the versions that pickled it."""

    digest: bytes
    blob: bytes
    python: str
    cloudpickle: str


class CodeCache:
    """Shipped functions this worker holds, least recently used dropped first beyond ``max_bytes``
    (a dropped one is fetched again when a task needs it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, Shipped] = OrderedDict()
        self.bytes = 0

    def get(self, digest: bytes) -> Shipped | None:
        found = self._items.get(digest)
        if found is not None:
            self._items.move_to_end(digest)
        return found

    def add(self, item: Shipped) -> None:
        old = self._items.pop(item.digest, None)
        if old is not None:
            self.bytes -= len(old.blob)
        self._items[item.digest] = item
        self.bytes += len(item.blob)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped.blob)

    def __len__(self) -> int:
        return len(self._items)
