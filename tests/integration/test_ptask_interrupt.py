"""Ctrl-C during ``ptask submit --wait``, ``ptask result --wait`` and ``ptask map``, for real.

ptask runs as a subprocess against real daemons; the test reads its stderr until the task id
line appears, sends SIGINT, and checks what ptask says and that the task goes on on the master.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pf_cftasks
import pytest
from pfharness import BIN, Cluster, daemon_env, wait_for

from poolfleet.client import Client

ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("interrupt"))
    try:
        c.start_master()
        c.start_worker(tasks=("pf_cftasks",), name="wa")
        yield c
    finally:
        c.close()


class Ptask:
    """A ptask process whose stderr a thread collects as it comes."""

    def __init__(self, fleet: Cluster, *args: str, stdin: str | None = None) -> None:
        env = daemon_env()
        env["POOLFLEET_MASTER"] = fleet.client_endpoint
        self.proc = subprocess.Popen(
            [str(BIN / "ptask"), *args],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):  # type: ignore[union-attr]
            self._err.append(chunk)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def wait_stderr(self, pattern: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"ptask exited {self.proc.returncode}: {self.stderr}")
            return re.search(pattern, self.stderr)

        match: re.Match[str] = wait_for(found, timeout=60, what=f"{pattern!r} on ptask's stderr")
        return match

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(60)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """Kill it if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def state_of(fleet: Cluster, task_id: str) -> str | None:
    with Client(fleet.client_endpoint) as c:
        entry = c.results([task_id])[task_id]
    return None if entry is None else str(entry["state"])


def test_ctrl_c_during_submit_wait_says_how_to_follow_the_task(fleet: Cluster, tmp_path: Path) -> None:
    event = tmp_path / "go"
    p = Ptask(fleet, "submit", "pf_cftasks:wait_event", str(event), "--wait")
    try:
        task_id = p.wait_stderr(rf"submitted task ({ID})").group(1)
        wait_for(lambda: state_of(fleet, task_id) == "RUNNING", what="the task running")
        assert p.interrupt() == 130
    finally:
        p.kill()
    err = p.stderr
    assert f"task {task_id} goes on" in err
    assert f"ptask cancel {task_id}" in err and f"ptask result {task_id}" in err
    assert "Traceback" not in err
    assert state_of(fleet, task_id) == "RUNNING"  # the task went on
    event.touch()
    r = fleet.ptask("result", task_id, "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "SUCCEEDED"


def test_ctrl_c_during_result_wait_leaves_the_task_running(fleet: Cluster, tmp_path: Path) -> None:
    event = tmp_path / "go"
    with Client(fleet.client_endpoint) as c:
        f = c.submit(pf_cftasks.wait_event, str(event))
        wait_for(f.running, what="the task running")
        p = Ptask(fleet, "result", f.task_id, "--wait")
        try:
            p.wait_stderr(rf"task {f.task_id}; waiting")
            assert p.interrupt() == 130
        finally:
            p.kill()
        assert f"ptask cancel {f.task_id}" in p.stderr
        assert state_of(fleet, f.task_id) == "RUNNING"
        event.touch()
        assert f.result(60) is True


def test_ctrl_c_during_map_prints_its_message_below_the_progress_bar(fleet: Cluster, tmp_path: Path) -> None:
    never = str(tmp_path / "never")
    lines = "".join(json.dumps([never]) + "\n" for _ in range(3))
    p = Ptask(fleet, "map", "pf_cftasks:wait_event", "--from", "-", "--progress", stdin=lines)
    try:
        p.wait_stderr("pf_cftasks:wait_event")  # the bar is drawn

        def running() -> bool:
            with Client(fleet.client_endpoint) as c:
                return int(c.status()["counts"].get("RUNNING", 0)) > 0

        wait_for(running, what="a map task running")
        assert p.interrupt() == 130
    finally:
        p.kill()
    err = p.stderr
    message = err.index("ptask: error: interrupted after 0 results; cancelled")
    tail = err[message:]
    # nothing of the bar after the message: no redraw (carriage return, erase line), no bar
    assert "\r" not in tail and "\x1b[2K" not in tail and "━" not in tail, repr(tail)
