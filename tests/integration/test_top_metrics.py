"""ptask top (snapshot, JSON, a real terminal) and pmaster --metrics, against real daemons."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import urllib.request
from collections.abc import Iterator

import pytest
from pfharness import BIN, Cluster, daemon_env, wait_for
from prometheus_client.parser import text_string_to_metric_families

from poolfleet.client import Client

# -- ptask top -------------------------------------------------------------------------


def test_top_json_snapshot_and_once(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        running = [c.submit("pf_testtasks:io_sleep", 20) for _ in range(3)]
        c.with_options(queue="nobody").submit("pf_testtasks:add", 1, 2).ack.result(10)  # type: ignore[union-attr]
        wait_for(lambda: c.status()["counts"]["RUNNING"] == 3, what="3 running tasks")
        r = cluster.ptask("top", "--json", "--interval", "0.2")
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert sorted(w["worker_id"] for w in snap["workers"]) == ["wa", "wb"]
        assert snap["slots"]["cpu"] == {"busy": 0, "total": 4, "queued": 0}
        assert snap["slots"]["io"]["busy"] == 3 and snap["slots"]["io"]["total"] == 8
        assert {"queue": "nobody", "kind": "cpu", "depth": 1} in snap["queues"]
        assert snap["finished_per_s"] == 0.0 and snap["submitted_per_s"] == 0.0

        r = cluster.ptask("top", "--once", "--interval", "0.2")
        assert r.returncode == 0, r.stderr
        for word in ("slots", "queues", "workers", "nobody", "wa", "wb", "io"):
            assert word in r.stdout
        for f in running:
            f.cancel()
        # tasks parked in a queue no worker serves: cancel them, or leaving `with` waits for them
        c.shutdown(cancel_futures=True)


def test_top_unreachable_is_one_line(tmp_path: object) -> None:
    r = subprocess.run(
        [str(BIN / "ptask"), "--master", "tcp://127.0.0.1:9", "top", "--once", "--timeout", "1"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "hint:" in r.stderr


def _read_until(fd: int, needle: bytes, timeout: float, buf: bytearray) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the terminal; got {bytes(buf[-2000:])!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other side closed
                chunk = b""
            assert chunk, f"terminal closed before {needle!r}; got {bytes(buf[-2000:])!r}"
            buf += chunk


@pytest.fixture
def top_on_a_terminal(cluster: Cluster) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``ptask top`` with a pseudo-terminal as its stdin, stdout and stderr."""
    master_fd, slave_fd = pty.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 140, 0, 0))
    env = daemon_env({"POOLFLEET_MASTER": cluster.client_endpoint, "TERM": "xterm"})
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [str(BIN / "ptask"), "top", "--interval", "0.2"],
        stdin=slave_fd,
        stdout=slave_fd,
        stderr=slave_fd,
        env=env,
        start_new_session=True,  # the pty becomes its controlling terminal
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    try:
        yield proc, master_fd, slave_fd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master_fd)
        os.close(slave_fd)


def test_top_live_quits_on_q(top_on_a_terminal: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, fd, slave = top_on_a_terminal
    buf = bytearray()
    _read_until(fd, b"q or Ctrl-C quits", 30, buf)  # a whole frame is drawn
    assert b"heartbeat" in buf and b"slots" in buf and b"wa" in buf
    assert not termios.tcgetattr(slave)[3] & termios.ICANON  # cbreak mode while running
    later = bytearray()
    _read_until(fd, b"q or Ctrl-C quits", 10, later)  # and redrawn: it refreshes
    os.write(fd, b"q")
    assert proc.wait(15) == 0
    assert termios.tcgetattr(slave)[3] & termios.ICANON  # the terminal mode is restored


def test_top_live_quits_on_ctrl_c(top_on_a_terminal: tuple[subprocess.Popen[bytes], int, int]) -> None:
    proc, fd, slave = top_on_a_terminal
    _read_until(fd, b"heartbeat", 30, bytearray())
    os.write(fd, b"\x03")  # the terminal turns it into SIGINT
    assert proc.wait(15) == 0
    assert termios.tcgetattr(slave)[3] & termios.ICANON


# -- pmaster --metrics --------------------------------------------------------------------


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), -1.0)


def test_metrics_scraped_and_parsed(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    master = c.start_master("--metrics", "127.0.0.1:0")
    url = master.wait_event("metrics_started")["url"]
    s = _scrape(url)
    assert _value(s, "poolfleet_workers_connected") == 0
    assert _value(s, "poolfleet_tasks_submitted_total") == 0
    c.start_worker(name="wa")
    c.start_worker(name="wb")
    wait_for(lambda: _value(_scrape(url), "poolfleet_workers_connected") == 2, what="2 workers in metrics")
    s = _scrape(url)
    assert _value(s, "poolfleet_slots", kind="cpu") == 4 and _value(s, "poolfleet_slots", kind="io") == 8

    with Client(c.client_endpoint) as cl:
        ok = [cl.submit("pf_testtasks:add", i, 1) for i in range(10)]
        bad = [cl.submit("pf_testtasks:boom", "x") for _ in range(2)]
        for f in ok:
            f.result(30)
        for f in bad:
            f.exception(30)
        cl.with_options(queue="nobody").submit("pf_testtasks:add", 1, 2).ack.result(10)  # type: ignore[union-attr]
        sleepers = [cl.submit("pf_testtasks:io_sleep", 20) for _ in range(3)]

        def settled() -> bool:
            s = _scrape(url)
            return (
                _value(s, "poolfleet_tasks_submitted_total") == 16
                and _value(s, "poolfleet_tasks_finished_total", state="SUCCEEDED") == 10
                and _value(s, "poolfleet_tasks_finished_total", state="FAILED") == 2
                and _value(s, "poolfleet_queue_depth", queue="nobody", kind="cpu") == 1
                and _value(s, "poolfleet_slots_busy", kind="io") == 3
                and _value(s, "poolfleet_tasks_running") == 3
            )

        wait_for(settled, what="metrics to reflect the tasks")
        s = _scrape(url)
        assert _value(s, "poolfleet_task_duration_seconds_count", task="pf_testtasks:add") == 10
        assert _value(s, "poolfleet_task_duration_seconds_count", task="pf_testtasks:boom") == 2
        assert _value(s, "poolfleet_task_duration_seconds_bucket", task="pf_testtasks:add", le="+Inf") == 10
        assert 0 < _value(s, "poolfleet_task_duration_seconds_sum", task="pf_testtasks:add") < 10
        assert _value(s, "poolfleet_slots_busy", kind="cpu") == 0
        for f in sleepers:
            f.cancel()
        cl.cancel([f.task_id for f in sleepers])
        wait_for(lambda: _value(_scrape(url), "poolfleet_slots_busy", kind="io") == 0, what="io slots free")
        wait_for(
            lambda: _value(_scrape(url), "poolfleet_tasks_finished_total", state="CANCELLED") >= 3,
            what="cancelled count",
        )
        # tasks parked in a queue no worker serves: cancel them, or leaving `with` waits for them
        cl.shutdown(cancel_futures=True)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=5)
    master.signal(signal.SIGTERM)
    assert master.wait(30) == 0


def test_metrics_off_by_default_and_bad_address(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    master = c.start_master()
    assert not master.events("metrics_started")
    bad = make_cluster()
    with pytest.raises(AssertionError, match="exited with 2"):  # a malformed --metrics: a usage error
        bad.start_master("--metrics", "nope")
    assert "pmaster: error: malformed metrics address 'nope'" in bad.procs[-1].log_tail()
