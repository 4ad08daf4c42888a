"""ptask map against real daemons: order, failures, stdin, --retry-failed, streaming."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pfharness import BIN, Cluster, daemon_env, wait_for

MAP_STDIN_1S = ("--from", "-", "--timeout", "1")


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_map_stdin_keeps_input_order_and_reports_failures(cluster: Cluster) -> None:
    # Later items finish first (decreasing sleeps on io slots); one raises; one line is not JSON.
    items = [[0.6], [0.45], [0.3], [0.15], [0.0]]
    text = "".join(json.dumps(i) + "\n" for i in items)
    r = cluster.ptask("map", "pf_testtasks:io_sleep", "--from", "-", input=text)
    assert r.returncode == 0, r.stderr
    out = _lines(r.stdout)
    assert [d["index"] for d in out] == [0, 1, 2, 3, 4]
    assert [d["result"] for d in out] == [f"slept {i[0]}" for i in items]
    assert all(d["state"] == "SUCCEEDED" and d["attempt"] == 1 for d in out)
    assert "succeeded" in r.stderr and "5" in r.stderr  # the summary table

    bad = '[1, 2]\n\n{"a": 3, "b": 4}\nnot json\n["x", 1]\n[5, 6]\n'
    r = cluster.ptask("map", "pf_testtasks:add", "--from", "-", input=bad)
    assert r.returncode == 1, r.stderr
    out = _lines(r.stdout)
    assert [d["index"] for d in out] == [0, 2, 3, 4, 5]  # index = input line, blank line skipped
    assert [d["state"] for d in out] == ["SUCCEEDED", "SUCCEEDED", "INVALID", "FAILED", "SUCCEEDED"]
    assert out[0]["result"] == 3 and out[1]["result"] == 7 and out[4]["result"] == 11
    assert "input line 4" in out[2]["error"]["message"]
    assert out[3]["error"]["type"] == "TypeError"
    assert "return a + b" in out[3]["error"]["traceback"]
    assert "2 items failed" in r.stderr


def test_map_file_json_summary_retries_and_retry_failed(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    markers = tmp_path / "markers"
    # items 1 and 3 fail on their first attempt (flaky counts attempts in a directory)
    rows = [[str(markers / f"m{i}"), 1 if i in (1, 3) else 0] for i in range(6)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = cluster.ptask("map", "pf_testtasks:flaky", "--from", str(src), "--out", str(out), "--json")
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["items"] == 6 and summary["succeeded"] == 4 and summary["failed"] == 2
    assert summary["retried"] == 0
    first = _lines(out.read_text())
    assert [d["state"] for d in first] == [
        "SUCCEEDED",
        "FAILED",
        "SUCCEEDED",
        "FAILED",
        "SUCCEEDED",
        "SUCCEEDED",
    ]
    assert "attempt 1 fails on purpose" in first[1]["error"]["message"]

    r = cluster.ptask(
        "map", "pf_testtasks:flaky", "--from", str(src), "--out", str(out), "--retry-failed", "--json"
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["summary"]
    assert summary["submitted"] == 2 and summary["kept"] == 4 and summary["succeeded"] == 6
    merged = _lines(out.read_text())
    assert [d["index"] for d in merged] == list(range(6))
    assert all(d["state"] == "SUCCEEDED" for d in merged)
    for i in (0, 2, 4, 5):  # kept as they were
        assert merged[i] == first[i]
    assert merged[1]["result"] == 2 and merged[1]["id"] != first[1]["id"]
    assert not list(tmp_path.glob(".out.jsonl.*"))  # the temporary file was renamed into place

    # --retries: the master reruns a failing attempt; the summary counts it as retried
    src2 = tmp_path / "in2.jsonl"
    src2.write_text(json.dumps([str(tmp_path / "m-retry"), 1]) + "\n")
    r = cluster.ptask("map", "pf_testtasks:flaky", "--from", str(src2), "--retries", "1", "--json")
    assert r.returncode == 0, r.stderr
    docs = _lines(r.stdout)
    assert docs[0]["attempt"] == 2 and docs[0]["result"] == 2
    assert docs[-1]["summary"]["retried"] == 1


def test_map_errors_are_one_line_with_a_hint(cluster: Cluster, tmp_path: Path) -> None:
    r = cluster.ptask("map", "pf_testtasks:nope", "--from", "-", input="[1]\n[2]\n")
    assert r.returncode == 4
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ptask: error: ")
    assert "unknown task" in r.stderr and "hint:" in r.stderr

    r = cluster.ptask("map", "pf_testtasks:add", "--from", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "hint:" in r.stderr

    r = cluster.ptask("map", "pf_testtasks:add", "--from", "-", "--retry-failed", input="[1, 2]\n")
    assert r.returncode == 2 and "--retry-failed needs --out" in r.stderr

    r = subprocess.run(
        [str(BIN / "ptask"), "--master", "tcp://127.0.0.1:9", "map", "pf_testtasks:add", *MAP_STDIN_1S],
        input="[1, 2]\n",
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=60,
    )
    assert r.returncode == 3
    assert r.stderr == (
        "ptask: error: nothing is listening at tcp://127.0.0.1:9, after 1 s of trying (--timeout) "
        "(hint: is pmaster running? check --master or POOLFLEET_MASTER)\n"
    )


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_map_streams_through_a_pipe_with_bounded_memory(cluster: Cluster) -> None:
    """20,000 lines of ~2 KB: results come back before stdin is closed, and memory stays bounded.

    The whole run moves about 80 MB (arguments and results, as text and as objects);
    a ptask that held them all would grow by far more than the bound below.
    """
    n = 20_000
    pad = "x" * 2000
    env = daemon_env({"POOLFLEET_MASTER": cluster.client_endpoint})
    proc = subprocess.Popen(
        [
            *(str(BIN / "ptask"), "map", "poolfleet.worker.builtins:echo", "--from", "-", "--kind", "io"),
            *("--window", "500", "--no-progress", "--json"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    write_error: list[BaseException] = []

    def feed() -> None:
        try:
            for i in range(n):
                proc.stdin.write(json.dumps([i, pad]) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            write_error.append(exc)

    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put("")

    writer = threading.Thread(target=feed, daemon=True)
    reader = threading.Thread(target=drain, daemon=True)
    try:
        writer.start()
        reader.start()
        baseline = 0
        deadline = time.monotonic() + 240
        for expected in range(n):
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"only {expected} results before the deadline") from None
            assert line, f"ptask exited early ({proc.poll()})"
            doc = json.loads(line)
            assert doc["index"] == expected and doc["state"] == "SUCCEEDED", doc
            assert doc["result"] == [expected, pad]
            if expected == 1000:
                baseline = _rss_kb(proc.pid, "VmRSS")
        # Every result arrived while standard input is still open: ptask streams.
        assert proc.poll() is None
        peak = _rss_kb(proc.pid, "VmHWM")
        writer.join(30)
        assert not write_error, write_error
        proc.stdin.close()
        assert proc.wait(60) == 0, proc.stderr.read()  # type: ignore[union-attr]
        reader.join(10)
        out = "".join(iter(lines.get_nowait, ""))
        summary = json.loads(out)["summary"]
        assert summary["items"] == n and summary["succeeded"] == n
        growth_mb = (peak - baseline) / 1024
        print(f"ptask RSS after 1,000 results {baseline / 1024:.0f} MB, peak {peak / 1024:.0f} MB")
        assert growth_mb < 40, f"ptask grew by {growth_mb:.0f} MB (baseline {baseline / 1024:.0f} MB)"
        assert peak / 1024 < 200, f"peak RSS {peak / 1024:.0f} MB"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass


def test_map_progress_bar_when_asked(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps([i, i]) + "\n" for i in range(50)))
    r = cluster.ptask("map", "pf_testtasks:add", "--from", str(src), "--progress")
    assert r.returncode == 0, r.stderr
    assert [d["result"] for d in _lines(r.stdout)] == [2 * i for i in range(50)]
    assert "50/50" in r.stderr and "/s" in r.stderr  # count and rate
    r = cluster.ptask("map", "pf_testtasks:add", "--from", str(src))  # stderr is no terminal: no bar
    assert "50/50" not in r.stderr


def test_map_interrupt_cancels_running_tasks(cluster: Cluster, tmp_path: Path) -> None:
    env = daemon_env({"POOLFLEET_MASTER": cluster.client_endpoint})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps([30]) + "\n" for _ in range(4)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [str(BIN / "ptask"), "map", "pf_testtasks:io_sleep", "--from", str(src), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: json.loads(cluster.ptask("status", "--json").stdout)["counts"]["RUNNING"] == 4)
        import signal

        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "interrupted" in err and "cancelled 4" in err and "--retry-failed" in err
        wait_for(lambda: json.loads(cluster.ptask("status", "--json").stdout)["counts"]["CANCELLED"] == 4)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
