"""Per-task output and progress: the worker's capture (bounded tail, throttled updates, pieces
for the pool child's pipe) and the master's live tail (offsets, overlaps, gaps)."""

from __future__ import annotations

import logging
import sys
import threading

from poolfleet.master.core_live import LIVE_OUTPUT, Live, progress_report
from poolfleet.worker.capture import (
    NOTICE_CHARS,
    UPDATE_INTERVAL_S,
    TaskCapture,
    current_capture,
    install,
    progress,
    split_update,
)

TID = bytes(16)


def test_the_capture_keeps_the_last_characters_and_counts_all() -> None:
    cap = TaskCapture(TID, 1, 10)
    for i in range(100):
        cap.write(f"{i % 10}")
    assert cap.tail() == "0123456789" and cap.end == 100
    final = cap.final()
    assert final == {"output": "0123456789", "output_end": 100}
    assert TaskCapture(TID, 1, 10).final() is None  # wrote and reported nothing


def test_updates_carry_only_what_is_new_at_most_every_interval() -> None:
    cap = TaskCapture(TID, 1, 1000)
    cap.write("abc")
    assert cap.take_update(10.0) == {"output": "abc", "at": 0}
    cap.write("de")
    assert cap.take_update(10.0 + UPDATE_INTERVAL_S / 2) is None  # too soon
    assert cap.take_update(10.0 + 2 * UPDATE_INTERVAL_S) == {"output": "de", "at": 3}
    assert cap.take_update(20.0) is None  # nothing new
    cap.report(1.7, "x" * 500)
    update = cap.take_update(30.0)
    assert update is not None and update["progress"]["fraction"] == 1.0
    assert update["progress"]["message"] == "x" * 200 and "output" not in update


def test_an_update_skips_what_the_bound_dropped() -> None:
    cap = TaskCapture(TID, 1, 4)
    cap.write("0123456789")
    assert cap.take_update(1.0) == {"output": "6789", "at": 6}


def test_pieces_fit_one_pipe_write_and_keep_their_offsets() -> None:
    text = "é" * (NOTICE_CHARS * 2 + 5)
    pieces = split_update({"output": text, "at": 7, "progress": {"fraction": 0.5, "message": "", "at": 1.0}})
    assert [p["at"] for p in pieces] == [7, 7 + NOTICE_CHARS, 7 + 2 * NOTICE_CHARS]
    assert "".join(p["output"] for p in pieces) == text
    assert "progress" in pieces[-1] and all("progress" not in p for p in pieces[:-1])
    assert all(len(p["output"].encode()) * 2 < 4096 for p in pieces)


def test_streams_and_logging_route_to_the_capture_of_each_thread() -> None:
    install()
    caps = [TaskCapture(TID, n, 1000) for n in range(2)]
    started = threading.Barrier(2)

    def run(cap: TaskCapture) -> None:
        token = current_capture.set(cap)
        try:
            started.wait(5)
            print(f"print {cap.attempt}")
            sys.stderr.write(f"stderr {cap.attempt}\n")
            logging.getLogger("t").warning("log %d", cap.attempt)
            progress(0.25, f"p{cap.attempt}")
        finally:
            current_capture.reset(token)

    threads = [threading.Thread(target=run, args=(c,)) for c in caps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for cap in caps:
        n = cap.attempt
        assert cap.tail() == f"print {n}\nstderr {n}\nWARNING t: log {n}\n"
        assert cap.progress is not None and cap.progress[:2] == (0.25, f"p{n}")
    progress(0.5)  # outside a task: nothing happens


def test_the_masters_live_tail_takes_only_new_text_and_restarts_after_a_gap() -> None:
    live = Live(1)
    live.add(0, "hello ")
    live.add(3, "lo world")  # overlaps: only " world"... after offset 6 is new
    assert (live.text, live.end) == ("hello world", 11)
    live.add(0, "hello")  # a repeat
    assert live.end == 11
    live.add(20, "later")  # a gap: text the worker did not send
    assert (live.text, live.end) == ("later", 25)
    live.add(25, "x" * (LIVE_OUTPUT + 3))
    assert len(live.text) == LIVE_OUTPUT and live.end == 25 + LIVE_OUTPUT + 3


def test_progress_reports_are_checked() -> None:
    assert progress_report({"fraction": 2, "message": "m", "at": 1}) == {
        "fraction": 1.0,
        "message": "m",
        "at": 1.0,
    }
    assert progress_report({"fraction": "half", "message": "m", "at": 1}) is None
    assert progress_report([1, 2]) is None
