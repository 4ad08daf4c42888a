"""The dashboard's 15-minute ring of load samples, built from STATUS and TASKS replies.

Every :data:`SAMPLE_INTERVAL_S` the dashboard asks the master (over the client socket, as
any client would) for STATUS and for the newest finished tasks, and :meth:`Ring.add` turns
the two replies into one :class:`Sample`: tasks finished and submitted per second since the
previous sample (from the counters of STATUS) and the run times of the tasks that finished
in between (from TASKS' ``finished_at`` and ``duration_ms``). Pure logic: the caller passes
the wall time and the replies.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from poolfleet.common.protocol import FINAL_STATES

SAMPLE_INTERVAL_S = 2.0
WINDOW_S = 15 * 60.0
#: Queue rates are tasks finished per second over this last stretch.
RATE_WINDOW_S = 60.0
#: Finished tasks read per sample for run times and queue rates (the newest ones; when more
#: finished in between, the queue rates are scaled up to the total STATUS counts).
SAMPLE_TASKS = 500


@dataclass(frozen=True)
class Sample:
    t: float
    finished_per_s: float
    submitted_per_s: float
    #: run times of the tasks sampled as finished since the previous sample; None when none did
    duration_p50_ms: float | None
    duration_max_ms: float | None


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Ring:
    """The samples of the last :data:`WINDOW_S` seconds and the recent finishes per queue."""

    def __init__(self, window_s: float = WINDOW_S, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=int(window_s / interval_s) + 1)
        self._lock = threading.Lock()
        #: (wall time, master_id, finished total, submitted total) of the previous sample
        self._prev: tuple[float, str, int, int] | None = None
        #: (finished_at, queue, weight) of the tasks seen finishing within RATE_WINDOW_S; the
        #: weight is above 1 when more tasks finished than the sample read
        self._recent: deque[tuple[float, str, float]] = deque()
        self._first_t: float | None = None

    def add(self, wall: float, status: dict[str, Any], finished: list[dict[str, Any]]) -> Sample | None:
        """Record the replies read at ``wall`` (taken before the requests were sent); returns the
        new sample, or None for the first one (or the first after a master restart)."""
        counts = status.get("counts") or {}
        done = sum(int(n) for s, n in counts.items() if s in FINAL_STATES)
        submitted = int(status.get("submitted_total") or 0)
        master_id = str(status.get("master_id") or "")
        with self._lock:
            prev, self._prev = self._prev, (wall, master_id, done, submitted)
            if prev is None or prev[1] != master_id or wall <= prev[0]:
                self._first_t = wall if self._first_t is None else self._first_t
                return None
            since = prev[0]
            seen = [e for e in finished if isinstance(e.get("finished_at"), int | float)]
            seen = [e for e in seen if since < e["finished_at"] <= wall]
            weight = max(1.0, (done - prev[2]) / len(seen)) if seen else 1.0
            durations = []
            for e in seen:
                self._recent.append((float(e["finished_at"]), str(e.get("queue", "")), weight))
                ms = e.get("duration_ms")
                if isinstance(ms, int | float):
                    durations.append(float(ms))
            while self._recent and self._recent[0][0] <= wall - RATE_WINDOW_S:
                self._recent.popleft()
            dt = wall - since
            sample = Sample(
                t=wall,
                # results expire, so the stored total can shrink: never a negative rate
                finished_per_s=max(0, done - prev[2]) / dt,
                submitted_per_s=max(0, submitted - prev[3]) / dt,
                duration_p50_ms=percentile(durations, 0.5) if durations else None,
                duration_max_ms=max(durations) if durations else None,
            )
            self.samples.append(sample)
            while self.samples and self.samples[0].t < wall - self.window_s:
                self.samples.popleft()
            return sample

    def series(self) -> dict[str, list[Any]]:
        """The samples as columns (what the charts draw)."""
        with self._lock:
            rows = [asdict(s) for s in self.samples]
        keys = ("t", "finished_per_s", "submitted_per_s", "duration_p50_ms", "duration_max_ms")
        return {k: [r[k] for r in rows] for k in keys}

    def queue_rates(self, wall: float) -> dict[str, float]:
        """Tasks finished per second by queue over the last :data:`RATE_WINDOW_S` (or since the
        first sample, when that is more recent)."""
        with self._lock:
            start = max(wall - RATE_WINDOW_S, self._first_t if self._first_t is not None else wall)
            span = max(wall - start, SAMPLE_INTERVAL_S)
            per: dict[str, float] = {}
            for at, queue, weight in self._recent:
                if at > start:
                    per[queue] = per.get(queue, 0.0) + weight
        return {q: n / span for q, n in per.items()}
