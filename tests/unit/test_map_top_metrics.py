"""Pure parts of ptask map, ptask top, ptask local and the metrics renderer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poolfleet.client.cli_map import MapAbort, iter_items, parse_line, read_previous
from poolfleet.client.local import Child, LogMerger
from poolfleet.client.top import render, with_rates
from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import Kind
from poolfleet.master.metrics import MetricsRecorder, parse_listen
from poolfleet.master.registry import WorkerInfo

# -- ptask map ---------------------------------------------------------------------------


def test_parse_line_arguments_keywords_and_bad_input() -> None:
    assert (parse_line(0, "[1, 2]").args, parse_line(0, "[1, 2]").kwargs) == ([1, 2], {})
    assert parse_line(3, '{"a": 1}').kwargs == {"a": 1}
    bad = parse_line(4, "nope").record
    assert bad is not None and bad["state"] == "INVALID" and bad["index"] == 4
    assert "input line 5: not JSON" in bad["error"]["message"]
    scalar = parse_line(0, "42").record
    assert scalar is not None and "not int" in scalar["error"]["message"]


def test_iter_items_keeps_successes_of_a_previous_run() -> None:
    lines = ["[0]\n", "[1]\n", "\n", "[3]\n", "[4]\n", "[5]\n"]
    previous = iter(
        [
            {"index": 0, "state": "SUCCEEDED", "result": 0},
            {"index": 1, "state": "FAILED", "error": {}},
            {"index": 3, "state": "SUCCEEDED", "result": 3},
            {"index": 4, "state": "INVALID", "error": {}},
            # 5 is missing: an interrupted run; it runs again
        ]
    )
    items = list(iter_items(lines, previous))
    assert [i.index for i in items] == [0, 1, 3, 4, 5]
    assert [i.kept for i in items] == [True, False, True, False, False]
    assert items[1].args == [1] and items[1].record is None
    assert items[0].record == {"index": 0, "state": "SUCCEEDED", "result": 0}


def test_read_previous_refuses_what_is_not_map_output(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"index": 0, "state": "SUCCEEDED"}\n\n{"index": 2, "state": "FAILED"}\n')
    assert [r["index"] for r in read_previous(good)] == [0, 2]
    for text in ("hello\n", '{"index": 2}\n{"index": 1}\n', '{"no": "index"}\n'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(MapAbort):
            list(read_previous(bad))


# -- ptask top ---------------------------------------------------------------------------


def _snap(at: float, finished: int, submitted: int, master_id: str = "m1") -> dict[str, Any]:
    return {
        "master": "tcp://127.0.0.1:5555",
        "master_id": master_id,
        "uptime_s": 10.0,
        "at": at,
        "counts": {"PENDING": 1, "RUNNING": 2, "FAILED": 1},
        "finished_total": finished,
        "submitted_total": submitted,
        "queues": [{"queue": "default", "kind": "cpu", "depth": 1}],
        "slots": {"cpu": {"busy": 2, "total": 4, "queued": 0}},
        "workers": [
            {
                "worker_id": "w1",
                "host": "h",
                "pid": 7,
                "queues": ["default"],
                "slots": {"cpu": 4},
                "busy": {"cpu": 2},
                "last_heartbeat_s": 0.4,
            }
        ],
    }


def test_throughput_from_deltas() -> None:
    first = with_rates(None, _snap(100.0, 10, 20))
    assert first["finished_per_s"] is None
    second = with_rates(first, _snap(102.0, 30, 50))
    assert second["finished_per_s"] == 10.0 and second["submitted_per_s"] == 15.0
    expired = with_rates(second, _snap(103.0, 5, 50))  # old results expired: counts dropped
    assert expired["finished_per_s"] == 0.0
    restarted = with_rates(second, _snap(103.0, 0, 0, master_id="m2"))
    assert restarted["finished_per_s"] is None


def test_top_frame_shows_tables() -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(render(with_rates(_snap(1.0, 1, 1), _snap(2.0, 3, 3))))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for word in ("slots", "queues", "workers", "w1", "cpu:2/4", "2.0/s", "q or Ctrl-C quits"):
        assert word in text


# -- ptask local -------------------------------------------------------------------------


def test_log_merger_labels_and_renders_json() -> None:
    out = io.StringIO()
    merger = LogMerger(out, "info", as_json=False, color=False, width=7)
    child = Child("local-1", cast(Any, None), "36")
    ev = {
        "event": "worker_registered",
        "level": "info",
        "timestamp": "2025-01-01T12:34:56.789012Z",
        "daemon": "pworker",
        "worker_id": "local-1",
        "slots": {"cpu": 2},
    }
    assert merger.line(child, json.dumps(ev)) == ev
    merger.line(child, json.dumps(ev | {"level": "debug", "event": "hidden"}))
    merger.line(child, "Traceback (most recent call last):")
    lines = out.getvalue().splitlines()
    assert lines == [
        'local-1 | 12:34:56.789 info    worker_registered slots={"cpu": 2}',
        "local-1 | Traceback (most recent call last):",
    ]
    out = io.StringIO()
    LogMerger(out, "info", as_json=True, color=False, width=7).line(child, "plain")
    assert json.loads(out.getvalue()) == {"source": "local-1", "line": "plain"}


# -- metrics -----------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":9100") == ("", 9100)
    for bad in ("9100", "host:", "a:99999", "tcp://x:1"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_metrics_text_parses_and_counts() -> None:
    w = WorkerInfo(b"id", "w1", "h", 1, ("default",), {Kind.CPU: 2, Kind.IO: 4}, 0.0, 0.0)
    w.add(b"t1", Kind.CPU)
    w.add(b"t2", Kind.CPU)
    w.add(b"t3", Kind.CPU)  # prefetched beyond the slots: busy is capped at the slot count
    depths = {("default", Kind.CPU): 5, ('we"ird\\q', Kind.IO): 1}
    master: Any = SimpleNamespace(
        submitted_total=12,
        scheduler=SimpleNamespace(depths=lambda: depths, paused={"slow"}),
        registry=SimpleNamespace(workers={b"id": w}),
        core=SimpleNamespace(
            waits={b"x": None},
            delayed_n=2,
            counters={"task_retries": 4, "retried_by_request": 2, "progress_reports": 9},
            reporting_progress=lambda: 3,
        ),
    )
    rec = MetricsRecorder()
    rec.observe("m:f", "SUCCEEDED", 3.0)
    rec.observe("m:f", "SUCCEEDED", 700.0)
    rec.observe("m:f", "FAILED", None)
    text = rec.render(master)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("poolfleet_tasks_submitted_total", ())] == 12
    assert samples[("poolfleet_tasks_finished_total", (("state", "SUCCEEDED"),))] == 2
    assert samples[("poolfleet_tasks_finished_total", (("state", "FAILED"),))] == 1
    assert samples[("poolfleet_queue_depth", (("kind", "cpu"), ("queue", "default")))] == 5
    assert samples[("poolfleet_queue_depth", (("kind", "io"), ("queue", 'we"ird\\q')))] == 1
    assert samples[("poolfleet_slots_busy", (("kind", "cpu"),))] == 2
    assert samples[("poolfleet_tasks_running", ())] == 3
    assert samples[("poolfleet_tasks_held", (("state", "WAITING"),))] == 1
    assert samples[("poolfleet_tasks_held", (("state", "DELAYED"),))] == 2
    assert samples[("poolfleet_task_duration_seconds_bucket", (("le", "0.005"), ("task", "m:f")))] == 1
    assert samples[("poolfleet_task_duration_seconds_bucket", (("le", "0.5"), ("task", "m:f")))] == 1
    assert samples[("poolfleet_task_duration_seconds_bucket", (("le", "1.0"), ("task", "m:f")))] == 2
    assert samples[("poolfleet_task_duration_seconds_count", (("task", "m:f"),))] == 2
    assert samples[("poolfleet_task_duration_seconds_sum", (("task", "m:f"),))] == pytest.approx(0.703)
    assert samples[("poolfleet_queue_paused", (("queue", "slow"),))] == 1
    assert samples[("poolfleet_queues_paused", ())] == 1
    assert samples[("poolfleet_task_retries_total", ())] == 4
    assert samples[("poolfleet_tasks_retried_total", ())] == 2
    assert samples[("poolfleet_progress_reports_total", ())] == 9
    assert samples[("poolfleet_tasks_reporting_progress", ())] == 3
    # a queue that drained is still reported, at zero; so is a resumed one
    depths.clear()
    master.scheduler.paused = set()
    again = rec.render(master)
    assert 'poolfleet_queue_depth{queue="default",kind="cpu"} 0' in again
    assert 'poolfleet_queue_paused{queue="slow"} 0' in again


def test_shared_cli_pieces_match_cli() -> None:
    from poolfleet.client import cli, cliopts

    for name in ("EXIT_TASK_FAILED", "EXIT_USAGE", "EXIT_UNREACHABLE", "EXIT_REJECTED"):
        assert getattr(cliopts, name) == getattr(cli, name), name
    registered = {c.name for c in cli.app.registered_commands}
    assert {"map", "top", "local"} <= registered
