"""Split batches so that no message outgrows the size limit.

Batches are the normal case on the wire; they are cut by count and by the
bytes of their opaque parts (payloads, values), whichever comes first, so a
batch of large arguments never exceeds ZMQ_MAXMSGSIZE.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

#: Aim well under the default 64 MiB message limit.
MAX_BATCH_BYTES = 8 * 1024 * 1024
OVERHEAD_BYTES = 64


def chunks(
    entries: Sequence[dict[str, Any]], max_items: int, field: str, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[dict[str, Any]]]:
    """Yield runs of ``entries`` of at most ``max_items`` and about ``max_bytes`` each.

    An entry larger than ``max_bytes`` on its own travels alone.
    """
    batch: list[dict[str, Any]] = []
    size = 0
    for e in entries:
        blob = e.get(field)
        n = OVERHEAD_BYTES + (len(blob) if isinstance(blob, bytes | str) else 0)
        if batch and (len(batch) >= max_items or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(e)
        size += n
    if batch:
        yield batch
