"""Task ids: 16 bytes, UUIDv7 layout, time-ordered, with a text form."""

from __future__ import annotations

import os
import uuid

import pytest

from poolfleet.common import ids
from poolfleet.common.errors import PoolfleetError


@pytest.fixture(autouse=True)
def fresh_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with a process that has made no id yet (a clock set back by a test
    would otherwise keep the later millisecond an earlier test used)."""
    monkeypatch.setattr(ids, "_clock", ids._Clock())


def test_sixteen_bytes_uuid_version_7_and_rfc_variant() -> None:
    tid = ids.new_task_id()
    assert isinstance(tid, bytes) and len(tid) == 16
    u = uuid.UUID(bytes=tid)
    assert u.version == 7
    assert u.variant == uuid.RFC_4122


@pytest.mark.parametrize("n", [1, 7, 8, 500])
def test_ids_made_in_bulk_have_the_same_layout(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    made = ids.new_task_ids(n)
    assert len(made) == n and len(set(made)) == n
    for tid in made:
        u = uuid.UUID(bytes=tid)
        assert len(tid) == 16 and u.version == 7 and u.variant == uuid.RFC_4122
        assert int.from_bytes(tid[:6], "big") == 1_700_000_000_123


def test_ids_are_unique() -> None:
    made = {ids.new_task_id() for _ in range(10_000)}
    assert len(made) == 10_000


def test_first_48_bits_are_unix_milliseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    tid = ids.new_task_id()
    assert int.from_bytes(tid[:6], "big") == 1_700_000_000_123


def test_ids_made_later_sort_later(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000, 1_700_000_000_000 + 200))
    monkeypatch.setattr(ids.time, "time_ns", lambda: next(clock) * 1_000_000)
    made = [ids.new_task_id() for _ in range(200)]
    assert made == sorted(made)  # bytes order is time order
    assert [ids.format_id(t) for t in made] == sorted(ids.format_id(t) for t in made)


def test_format_and_parse_roundtrip() -> None:
    tid = ids.new_task_id()
    text = ids.format_id(tid)
    assert len(text) == 36 and text.count("-") == 4
    assert ids.parse_id(text) == tid
    assert ids.parse_id(text.replace("-", "")) == tid
    assert ids.parse_id(f"  {text.upper()}\n") == tid


@pytest.mark.parametrize(
    "text", ["", "xyz", "0" * 31, "0" * 33, "g" * 32, "0190f1b2-0000-7000-8000-00000000000"]
)
def test_parse_errors_name_the_text(text: str) -> None:
    with pytest.raises(PoolfleetError) as info:
        ids.parse_id(text)
    assert str(info.value) == (
        f"not a task id: {text!r}; a task id is the 36-character form ptask prints, like "
        "0190f1b2-3c4d-7e5f-8a6b-7c8d9e0f1a2b, with or without its dashes (32 hex digits)"
    )


def test_the_example_in_the_error_is_a_valid_id() -> None:
    example = ids.ID_FORM.split("like ")[1].split(",")[0]
    assert len(example) == 36
    assert ids.format_id(ids.parse_id(example)) == example
    assert ids.parse_id(example.replace("-", "")) == ids.parse_id(example)


def test_ids_of_one_millisecond_count_up_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    made = ids.new_task_ids(1000) + [ids.new_task_id() for _ in range(100)] + ids.new_task_ids(50)
    assert made == sorted(made) and len(set(made)) == len(made)
    # the 74 counter bits, around the version and variant bits: each one past the one before
    counters = [
        (v >> 64 & 0xFFF) << 62 | (v & ids._LOW_MASK) for v in (int.from_bytes(t, "big") for t in made)
    ]
    assert counters == list(range(counters[0], counters[0] + len(made)))


def test_each_millisecond_starts_its_counter_at_a_random_value(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1_700_000_000_000, 1_700_000_000_000 + 100))
    monkeypatch.setattr(ids.time, "time_ns", lambda: next(clock) * 1_000_000)
    made = [ids.new_task_id() for _ in range(100)]
    assert len({t[6:] for t in made}) == 100  # no two seeds alike: drawn, not counted on


def test_a_clock_that_steps_back_a_little_keeps_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_700_000_000_500]
    monkeypatch.setattr(ids.time, "time_ns", lambda: now[0] * 1_000_000)
    first = ids.new_task_ids(10)
    now[0] -= 200  # an NTP slew, a VM resumed
    later = ids.new_task_ids(10)
    assert first + later == sorted(first + later)
    assert int.from_bytes(later[0][:6], "big") == 1_700_000_000_500


def test_a_clock_that_steps_back_far_is_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_700_000_100_000]
    monkeypatch.setattr(ids.time, "time_ns", lambda: now[0] * 1_000_000)
    ids.new_task_id()
    now[0] -= ids.STEP_BACK_MS + 1  # a clock that was set wrong, then corrected
    assert int.from_bytes(ids.new_task_id()[:6], "big") == now[0]


def test_a_counter_that_runs_out_moves_to_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_700_000_000_123_000_000)
    ids.new_task_id()
    ids._clock.counter = (1 << 74) - 3  # as if 2**73 ids were made in this millisecond
    made = ids.new_task_ids(5)
    assert made == sorted(made) and len(set(made)) == 5
    assert {int.from_bytes(t[:6], "big") for t in made} == {1_700_000_000_124}
    assert ids.new_task_id() > made[-1]


def test_a_forked_child_draws_its_own_counter() -> None:
    ids.new_task_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the millisecond its parent used is forgotten
        os.close(r)
        os.write(w, b"1" if ids._clock.ms == -1 else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
