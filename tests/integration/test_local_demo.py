"""ptask local, make demo's script, shell completion and --json on every command."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pfharness import BIN, daemon_env, wait_for

from poolfleet.client import Client

ROOT = Path(__file__).resolve().parents[2]
MARK = "POOLFLEET_TEST_MARK"


def marked_pids(mark: str) -> list[int]:
    """Live processes (ours) whose environment carries ``mark``: everything a test started."""
    pids = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def mark() -> Iterator[str]:
    """A tag put in the environment of what the test starts; survivors are killed, by pid."""
    value = uuid.uuid4().hex
    yield value
    for pid in marked_pids(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def local_argv(*extra: str) -> list[str]:
    return [
        str(BIN / "ptask"),
        "local",
        "--workers",
        "2",
        "--tasks",
        "pf_testtasks",
        "--cpu",
        "1",
        "--io",
        "2",
        "--clients-endpoint",
        "tcp://127.0.0.1:0",
        "--workers-endpoint",
        "tcp://127.0.0.1:0",
        *extra,
    ]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(min(0.5, max(0.0, deadline - time.monotonic()))):
                return proc.stdout.readline()
            assert proc.poll() is None, f"ptask local exited with {proc.returncode}"
    finally:
        sel.close()
    raise AssertionError("ptask local printed nothing in time")


def test_local_command_runs_with_endpoint_and_labelled_logs(mark: str) -> None:
    r = subprocess.run(
        local_argv("--command", "ptask submit pf_testtasks:add 2 40 --wait && ptask workers --json"),
        capture_output=True,
        text=True,
        timeout=180,
        env=daemon_env({MARK: mark, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}),
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "42" in out
    workers = json.loads(out[-1])
    assert sorted(w["worker_id"] for w in workers) == ["local-1", "local-2"]
    assert "export POOLFLEET_MASTER=tcp://127.0.0.1:" in r.stdout
    lines = r.stderr.splitlines()
    assert any(ln.startswith("pmaster | ") and "master_started" in ln for ln in lines)
    assert any(ln.startswith("local-1 | ") and "worker_registered" in ln for ln in lines)
    assert any(ln.startswith("local-2 | ") and "worker_stopped" in ln for ln in lines)
    assert any(ln.startswith("pmaster | ") and "master_stopped" in ln for ln in lines)
    assert not any(ln.lstrip().startswith("{") for ln in lines)  # JSON logs are rendered readably
    assert marked_pids(mark) == []

    # the command's exit status is ptask's
    r = subprocess.run(
        local_argv("--workers", "1", "--log-level", "warning", "--command", "exit 7"),
        capture_output=True,
        text=True,
        timeout=180,
        env=daemon_env({MARK: mark}),
    )
    assert r.returncode == 7, r.stderr
    assert "master_started" not in r.stderr  # below --log-level
    assert marked_pids(mark) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_local_stops_everything_on_a_signal(mark: str, sig: int) -> None:
    proc = subprocess.Popen(
        local_argv("--json", "--log-level", "warning"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=daemon_env({MARK: mark}),
    )
    try:
        banner = json.loads(read_line(proc, 120))
        names = sorted(p["name"] for p in banner["processes"])
        assert names == ["local-1", "local-2", "pmaster"]
        data_dir = Path(banner["data_dir"])
        assert banner["temporary_data_dir"] and data_dir.is_dir()
        with Client(banner["clients_endpoint"]) as c:
            assert c.submit("pf_testtasks:add", 1, 2).result(30) == 3
            assert c.submit("pf_testtasks:io_sleep", 0.01).result(30) == "slept 0.01"
        pids = {p["pid"] for p in banner["processes"]}
        assert pids <= set(marked_pids(mark))
        proc.send_signal(sig)
        assert proc.wait(120) == 0
        _, err = proc.communicate(timeout=10)
        assert not err.strip(), err  # warnings and errors only: none on a clean stop
        wait_for(lambda: not marked_pids(mark), timeout=20, what="every daemon to exit")
        assert not data_dir.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.communicate(timeout=10)


def test_local_reports_a_worker_that_cannot_start(mark: str) -> None:
    r = subprocess.run(
        local_argv("--tasks", "no_such_module_here"),
        capture_output=True,
        text=True,
        timeout=180,
        env=daemon_env({MARK: mark}),
    )
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ptask: error: local-") and "before it was ready" in last and "hint:" in last
    assert "no_such_module_here" in r.stderr  # the worker's own message, labelled
    assert marked_pids(mark) == []


def test_demo_script(mark: str) -> None:
    """What 'make demo' runs: a mixed batch through ptask local, then everything stopped."""
    env = daemon_env({MARK: mark, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    env.pop("PYTHONPATH", None)
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    rows = {line.split()[0] + " " + line.split()[1] for line in out.splitlines() if "SUCCEEDED" in line}
    assert {"cpu count_primes(30000)", "io fetch(https://example.org/a)"} <= rows
    assert "3245" in out  # primes below 30000
    assert '"hello from a cmd task"' in out
    assert "summary: 5 succeeded, 0 failed" in out
    assert "stopped: the master and both workers have exited" in out
    assert out.count("SUCCEEDED") >= 6 + 5
    assert marked_pids(mark) == []


def test_shell_completion_is_installable() -> None:
    env = daemon_env({"SHELL": "/bin/bash"})
    # Typer guesses the shell from the parent processes unless told to take it from the
    # argument; the guess fails when no shell is among them (a test run started in the background)
    explicit = {**env, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    r = subprocess.run(
        [str(BIN / "ptask"), "--show-completion", "bash"],
        capture_output=True,
        text=True,
        env=explicit,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "_ptask_completion" in r.stdout and "complete " in r.stdout
    r = subprocess.run([str(BIN / "ptask"), "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert "--install-completion" in r.stdout


def test_every_command_has_json_and_help() -> None:
    from poolfleet.client.cli import app

    names = [cmd.name or (cmd.callback.__name__ if cmd.callback else "") for cmd in app.registered_commands]
    assert {"submit", "run", "result", "status", "workers", "cancel", "map", "top", "local"} <= set(names)
    for name in names:
        r = subprocess.run([str(BIN / "ptask"), name, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "--json" in r.stdout, f"ptask {name} has no --json"
