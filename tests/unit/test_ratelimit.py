"""Fleet-wide rate limits as pure logic with a fake clock: a sliding window of starts."""

from __future__ import annotations

import pytest

from poolfleet.master.ratelimit import GUARD_MAX_S, RateLimits, guard_s, parse_rate, rate_text


def test_parse_and_print_rates() -> None:
    assert parse_rate("10/s") == (10, 1.0)
    assert parse_rate(" 100 / m ") == (100, 60.0)
    assert parse_rate("3/h") == (3, 3600.0)
    assert rate_text(100, 60.0) == "100/m"
    for bad in ("10", "10/d", "0/s", "-1/s", "x/s", "1000001/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_no_window_of_a_period_holds_more_than_the_count() -> None:
    limits = RateLimits()
    assert not limits and limits.allowance("m:f", 0.0) is None  # no limit: unlimited
    limits.set("m:f", 5, 1.0)
    assert limits
    starts: list[float] = []
    t = 0.0
    while t < 10.0:  # a backlog that always wants to start, polled every 10 ms
        n = limits.allowance("m:f", t)
        assert n is not None
        for _ in range(n):
            limits.took("m:f", t)
            starts.append(t)
        t = round(t + 0.01, 6)
    window = 1.0 + guard_s(1.0)
    for i, s in enumerate(starts):  # any window of the period plus its guard: at most 5
        assert sum(1 for x in starts[i:] if x < s + window) <= 5
    assert 40 <= len(starts) <= 50  # and it does let them go: 5 every 1.1 s


def test_opens_at_says_when_the_next_start_may_go() -> None:
    limits = RateLimits()
    limits.set("m:f", 2, 60.0)
    assert limits.opens_at("m:f", 0.0) == 0.0
    limits.took("m:f", 0.0)
    limits.took("m:f", 5.0)
    assert limits.allowance("m:f", 10.0) == 0
    assert limits.opens_at("m:f", 10.0) == 60.0 + GUARD_MAX_S  # the oldest leaves the window
    assert limits.allowance("m:f", 60.0 + GUARD_MAX_S) == 1


def test_set_again_is_no_change_and_a_lower_count_keeps_the_latest_starts() -> None:
    limits = RateLimits()
    assert limits.set("m:f", 3, 1.0)
    assert not limits.set("m:f", 3, 1.0)
    for t in (0.0, 0.1, 0.2):
        limits.took("m:f", t)
    assert limits.set("m:f", 2, 1.0)
    assert limits.allowance("m:f", 0.3) == 0
    assert limits.describe(0.3) == [
        {"name": "m:f", "count": 2, "period_s": 1.0, "rate": "2/s", "in_window": 2}
    ]
    assert limits.remove("m:f") and not limits.remove("m:f") and not limits
