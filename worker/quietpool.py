"""The process pool of kind cpu: multiprocessing.Pool with a quieter worker-handler thread."""

from __future__ import annotations

from multiprocessing.pool import Pool
from typing import Any


class QuietPool(Pool):
    """A ``multiprocessing.Pool`` whose worker-handler thread wakes only when it has work.

    The stock handler thread also waits on the pipe the results come back through, so it
    wakes, and scans the children, on every result, while the result thread reads it: about
    8 us of CPU and a hand-off of the GIL per result, 5 % of a core while two children run
    15 ms tasks. Here it wakes on what it acts on: a child exiting (its process sentinel,
    which the pool keeps watching) and the pool's own change notices (close, terminate, the
    task cache running empty).
    """

    def _get_sentinels(self) -> list[Any]:
        return [self._change_notifier._reader]  # type: ignore[attr-defined]
