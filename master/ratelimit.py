"""Fleet-wide rate limits: at most N starts of a task per period, across every worker (pure
logic, injected monotonic clock).

A limit is a sliding window, not a token bucket: the master keeps the dispatch times of the
last N starts of the name, and the next one may go only once the oldest of them is a whole
window old. So no window of one period ever holds more than N starts (a token bucket would
let a burst of N follow a full one). The window is the period plus a small guard
(``guard_s``): the master counts a start when it dispatches the task, and the worker starts
it a moment later; the guard keeps the starts the workers make within the limit too, while
the time from dispatch to start varies by less than it.

Dispatch times are kept in memory only: after a master restart each window starts empty.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

#: The periods a limit may be given in (``10/s``, ``100/m``, ``1000/h``), in seconds.
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
#: Starts per period at most (the window keeps one time per start).
MAX_COUNT = 100_000
#: The guard added to a period: a tenth of it, at most this long.
GUARD_MAX_S = 0.25
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")


def guard_s(period_s: float) -> float:
    return min(period_s / 10, GUARD_MAX_S)


def parse_rate(text: str) -> tuple[int, float]:
    """``10/s``, ``100/m`` or ``1000/h`` as (count, period in seconds); ValueError naming the
    problem otherwise."""
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(f"a rate limit looks like 10/s, 100/m or 1000/h, not {text!r}")
    count = int(m.group(1))
    check_rate(count, PERIODS[m.group(2)])
    return count, PERIODS[m.group(2)]


def check_rate(count: object, period_s: object) -> None:
    """ValueError unless ``count`` starts per ``period_s`` is a limit the master keeps."""
    if type(count) is not int or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"a rate limit's count must be an integer from 1 to {MAX_COUNT}, not {count!r}")
    if period_s not in PERIODS.values():
        raise ValueError(f"a rate limit's period must be 1, 60 or 3600 seconds, not {period_s!r}")


def rate_text(count: int, period_s: float) -> str:
    """The form ``parse_rate`` reads: ``10/s``."""
    unit = next((u for u, s in PERIODS.items() if s == period_s), None)
    return f"{count}/{unit}" if unit else f"{count}/{period_s:g}s"


@dataclass
class Limit:
    """One name's limit and the dispatch times of its last ``count`` starts."""

    count: int
    period_s: float
    starts: deque[float] = field(default_factory=deque)

    @property
    def window_s(self) -> float:
        return self.period_s + guard_s(self.period_s)

    def _expire(self, now: float) -> None:
        window = self.window_s
        while self.starts and now - self.starts[0] >= window:
            self.starts.popleft()


class RateLimits:
    """The limits by task name; falsy while there are none (dispatch then skips them)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Limit] = {}

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def set(self, name: str, count: int, period_s: float) -> bool:
        """Set (or change) a name's limit; False when it already was exactly that. A change keeps
        the starts counted so far."""
        check_rate(count, period_s)
        old = self.by_name.get(name)
        if old is not None and (old.count, old.period_s) == (count, period_s):
            return False
        starts = old.starts if old is not None else deque()
        self.by_name[name] = Limit(count, period_s, deque(list(starts)[-count:]))
        return True

    def remove(self, name: str) -> bool:
        return self.by_name.pop(name, None) is not None

    def allowance(self, name: str, now: float) -> int | None:
        """How many starts of ``name`` may go now (None: it has no limit)."""
        lim = self.by_name.get(name)
        if lim is None:
            return None
        lim._expire(now)
        return lim.count - len(lim.starts)

    def took(self, name: str, now: float) -> None:
        """One start of ``name`` went out now."""
        self.by_name[name].starts.append(now)

    def opens_at(self, name: str, now: float) -> float:
        """When the next start of ``name`` may go (``now`` if it may go now)."""
        lim = self.by_name.get(name)
        if lim is None:
            return now
        lim._expire(now)
        if len(lim.starts) < lim.count:
            return now
        return lim.starts[-lim.count] + lim.window_s

    def describe(self, now: float) -> list[dict[str, object]]:
        """Every limit with the starts in its current window, by name."""
        out: list[dict[str, object]] = []
        for name in sorted(self.by_name):
            lim = self.by_name[name]
            lim._expire(now)
            out.append(
                {
                    "name": name,
                    "count": lim.count,
                    "period_s": lim.period_s,
                    "rate": rate_text(lim.count, lim.period_s),
                    "in_window": len(lim.starts),
                }
            )
        return out


__all__ = ["MAX_COUNT", "PERIODS", "Limit", "RateLimits", "check_rate", "guard_s", "parse_rate"]
