"""Start real pmaster and pworker processes on loopback for a benchmark run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from poolfleet.common.lifecycle import kill_session

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLFLEET_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """One daemon process logging JSON lines to a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, wrap: list[str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [*(wrap or []), *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                cwd=str(ROOT),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the first log event called ``name``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"{name}"' in line:
                    ev: dict[str, Any] = json.loads(line)
                    if ev.get("event") == name:
                        return ev
            if self.popen.poll() is not None:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no {name} event within {timeout} s")

    def rss_mb(self) -> float:
        """Resident set size (VmRSS) in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the process has used, all its threads."""
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the whole session (pool children, forkserver)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        kill_session(self.popen, 5)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BenchCluster:
    """A master with a journal in a temp dir, and workers, on random loopback ports."""

    def __init__(self, master_args: tuple[str, ...] = (), wrap_master: list[str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="poolfleet-bench-"))
        self.workers: list[Daemon] = []
        self.master = Daemon(
            "pmaster",
            [
                str(BIN / "pmaster"),
                "--clients",
                "tcp://127.0.0.1:0",
                "--workers",
                "tcp://127.0.0.1:0",
                "--data-dir",
                str(self.tmp / "data"),
                "--log-level",
                "info",
                *master_args,
            ],
            self.tmp / "pmaster.log",
            wrap_master,
        )
        ev = self.master.event("master_started")
        self.client_endpoint: str = ev["clients_endpoint"]
        self.worker_endpoint: str = ev["workers_endpoint"]

    def add_worker(
        self, cpu: int = 2, io: int = 50, extra: tuple[str, ...] = (), wrap: list[str] | None = None
    ) -> Daemon:
        n = len(self.workers) + 1
        w = Daemon(
            f"pworker{n}",
            [
                str(BIN / "pworker"),
                "--master",
                self.worker_endpoint,
                "--cpu",
                str(cpu),
                "--io",
                str(io),
                "--worker-id",
                f"bench-w{n}",
                "--tasks",
                "bench.tasks",
                "--log-level",
                "info",
                *extra,
            ],
            self.tmp / f"pworker{n}.log",
            wrap,
        )
        w.event("worker_registered")
        self.workers.append(w)
        return w

    def close(self, keep_logs: bool = False) -> None:
        """Stop every daemon; remove the temp dir unless ``keep_logs``."""
        for d in [*self.workers, self.master]:
            d.stop()
        import shutil

        if not keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> BenchCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
