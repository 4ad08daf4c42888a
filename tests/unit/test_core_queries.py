"""Pure parts of the inspection requests: id ranges for prefixes and --since, request checks,
durations and text shortening in ptask."""

from __future__ import annotations

import pytest

from poolfleet.client.cli_ops import SHORT_CHARS, parse_duration, shorten
from poolfleet.client.client import id_prefix
from poolfleet.common.errors import PoolfleetError, ProtocolError
from poolfleet.common.ids import new_task_id
from poolfleet.master.core_queries import Filters, id_floor, prefix_range, worker_id_of


def test_prefix_range_spans_exactly_the_ids_with_that_prefix() -> None:
    low, high = prefix_range("01a2f")
    assert low.hex() == "01a2f" + "0" * 27 and high.hex() == "01a2f" + "f" * 27
    assert prefix_range("0" * 32) == (bytes(16), bytes(16))


def test_id_floor_is_the_first_id_of_that_millisecond() -> None:
    tid = new_task_id()
    ms = int.from_bytes(tid[:6], "big")
    assert id_floor(ms / 1000) <= tid < id_floor((ms + 1) / 1000)
    assert id_floor(-5) == bytes(16)


def test_filters_refuse_what_a_request_cannot_mean() -> None:
    with pytest.raises(ProtocolError, match="states must be among"):
        Filters({"req": 1, "states": ["DONE"]})
    with pytest.raises(ProtocolError, match="limit must be between 1 and 1000"):
        Filters({"req": 1, "limit": 0})
    with pytest.raises(ProtocolError, match="before must be a 16-byte id"):
        Filters({"req": 1, "before": b"\x01"})
    f = Filters({"req": 1, "states": ["FAILED"], "name": "m:f"})
    assert f.match("m:f", "q", "FAILED", None) and not f.match("m:g", "q", "FAILED", None)
    assert not f.only_state and Filters({"req": 1}).only_state


def test_id_prefix_takes_dashes_and_case_and_refuses_the_rest() -> None:
    assert id_prefix(" 01A2-F ") == "01a2f"
    for bad in ("", "xyz", "0" * 33):
        with pytest.raises(PoolfleetError, match="not a task id or id prefix"):
            id_prefix(bad)


def test_durations_and_shortening() -> None:
    assert [parse_duration(t) for t in ("30s", "10m", "1.5h", "1d")] == [30, 600, 5400, 86400]
    with pytest.raises(PoolfleetError, match="like 30s, 10m"):
        parse_duration("10 minutes")
    long = "x" * (SHORT_CHARS + 1)
    assert shorten(long, False) == "x" * SHORT_CHARS + f"... ({SHORT_CHARS + 1} characters; --full shows all)"
    assert shorten(long, True) == long


def test_worker_id_of_an_identity() -> None:
    assert worker_id_of(b"build-7/5f0e9d8c7b6a") == "build-7"
    assert worker_id_of(b"plain") == "plain"
