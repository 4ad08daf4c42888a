"""The dashboard's pure parts: the ring of samples (wall times and replies given), its
settings checks, the address its client connects to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from poolfleet.common.errors import ConfigError
from poolfleet.master.dashboard.api import ApiError, parse_since, queue_rows
from poolfleet.master.dashboard.samples import Ring, percentile
from poolfleet.master.dashboard.server import check_dashboard_settings, connect_url
from poolfleet.master.settings import MasterSettings


def status(done: int, submitted: int, master_id: str = "m1") -> dict[str, Any]:
    return {"master_id": master_id, "counts": {"PENDING": 3, "SUCCEEDED": done}, "submitted_total": submitted}


def finished(at: float, ms: float, queue: str = "default") -> dict[str, Any]:
    return {"finished_at": at, "duration_ms": ms, "queue": queue, "state": "SUCCEEDED"}


def test_rates_come_from_the_counters_and_durations_from_tasks_finished_in_between() -> None:
    ring = Ring(window_s=60, interval_s=2)
    assert ring.add(100.0, status(0, 0), []) is None  # the first sample only sets the base
    s = ring.add(102.0, status(10, 14), [finished(101.0, 5.0), finished(101.5, 7.0), finished(99.0, 100.0)])
    assert s is not None
    assert s.finished_per_s == 5.0 and s.submitted_per_s == 7.0
    # the task that finished before the previous sample was counted then, not now
    assert s.duration_max_ms == 7.0 and s.duration_p50_ms in (5.0, 7.0)
    s = ring.add(104.0, status(10, 14), [finished(101.0, 5.0)])
    assert s is not None and s.finished_per_s == 0.0 and s.duration_p50_ms is None
    assert ring.series()["t"] == [102.0, 104.0]


def test_expired_results_and_a_master_restart_never_give_negative_rates() -> None:
    ring = Ring(window_s=60, interval_s=2)
    ring.add(100.0, status(50, 50), [])
    s = ring.add(102.0, status(40, 52), [])  # ten results expired, two submitted
    assert s is not None and s.finished_per_s == 0.0 and s.submitted_per_s == 1.0
    assert ring.add(104.0, status(0, 0, master_id="m2"), []) is None  # a new master: a new base
    s = ring.add(106.0, status(4, 4, master_id="m2"), [])
    assert s is not None and s.finished_per_s == 2.0


def test_the_ring_keeps_only_its_window() -> None:
    ring = Ring(window_s=10, interval_s=2)
    for i in range(20):
        ring.add(100.0 + 2 * i, status(i, i), [])
    t = ring.series()["t"]
    assert t[-1] == 138.0 and t[0] >= 128.0


def test_queue_rates_count_each_finish_once_over_the_last_minute() -> None:
    ring = Ring(window_s=900, interval_s=2)
    ring.add(1000.0, status(0, 0), [])
    tasks = [finished(1000.5 + i * 0.1, 1.0, "a") for i in range(10)] + [finished(1001.0, 1.0, "b")]
    ring.add(1002.0, status(11, 11), tasks)
    ring.add(1004.0, status(11, 11), tasks)  # the same tasks again: already counted
    rates = ring.queue_rates(1004.0)
    assert rates == {"a": 10 / 4.0, "b": 1 / 4.0}
    ring.add(1100.0, status(11, 11), [])
    assert ring.queue_rates(1100.0) == {}


def test_queue_rates_scale_up_when_more_finished_than_the_sample_read() -> None:
    ring = Ring(window_s=900, interval_s=2)
    ring.add(1000.0, status(0, 0), [])
    # 400 finished, the sample read the newest 4: three of queue a, one of b
    tasks = [finished(1001.0, 1.0, "a")] * 3 + [finished(1001.5, 1.0, "b")]
    ring.add(1002.0, status(400, 400), tasks)
    assert ring.queue_rates(1002.0) == {"a": 300 / 2.0, "b": 100 / 2.0}


def test_percentile_and_since() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([5.0], 0.99) == 5.0
    assert parse_since("10m") == 600 and parse_since("1.5h") == 5400
    for bad in ("", "10", "m", "-1m", "10x"):
        with pytest.raises(ApiError):
            parse_since(bad)


def test_queue_rows_join_depths_pauses_workers_and_rates() -> None:
    st = {
        "queues": [{"queue": "q", "kind": "cpu", "depth": 2}, {"queue": "q", "kind": "io", "depth": 1}],
        "paused": ["p"],
    }
    workers = [{"queues": ["default", "q"]}, {"queues": ["default"]}]
    rows = queue_rows(st, workers, {"r": 0.5})
    assert [r["queue"] for r in rows] == ["default", "p", "q", "r"]
    by = {r["queue"]: r for r in rows}
    assert by["q"]["depth"] == {"cpu": 2, "io": 1} and by["q"]["pending"] == 3 and by["q"]["workers"] == 1
    assert by["p"]["paused"] is True and by["default"]["workers"] == 2 and by["r"]["rate_per_s"] == 0.5


def test_off_loopback_needs_a_token_or_tls_or_insecure(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    public = "0.0.0.0:8080"
    with pytest.raises(ConfigError, match=r"refusing to serve the dashboard on 0\.0\.0\.0:8080"):
        check_dashboard_settings(MasterSettings(dashboard=public))
    with pytest.raises(ConfigError, match="refusing"):
        check_dashboard_settings(MasterSettings(dashboard=":8080"))  # every address
    check_dashboard_settings(MasterSettings(dashboard="127.0.0.1:8080"))
    check_dashboard_settings(MasterSettings(dashboard="[::1]:8080"))
    check_dashboard_settings(MasterSettings(dashboard=public, dashboard_token_file=token))
    tls = {"dashboard_tls_cert": tmp_path / "c.pem", "dashboard_tls_key": tmp_path / "k.pem"}
    check_dashboard_settings(MasterSettings(dashboard=public, **tls))  # type: ignore[arg-type]
    check_dashboard_settings(MasterSettings(dashboard=public, insecure=True))
    token.write_text("two words of it but long enough")
    with pytest.raises(ConfigError, match="one word"):
        check_dashboard_settings(MasterSettings(dashboard=public, dashboard_token_file=token))
    with pytest.raises(ConfigError, match="both"):
        MasterSettings(dashboard=public, dashboard_tls_cert=tmp_path / "c.pem")


def test_connect_url_reaches_a_wildcard_bind_over_loopback() -> None:
    assert connect_url("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
    assert connect_url("tcp://[::]:5555") == "tcp://[::1]:5555"
    assert connect_url("tcp://10.1.2.3:5555") == "tcp://10.1.2.3:5555"
    assert connect_url("ipc:///run/pf.sock") == "ipc:///run/pf.sock"
