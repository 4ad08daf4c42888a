"""Processes of a peers' run. redis-server and each peer run in a session of their own, so that
stopping one by its pid also stops what it forked; a peer's workers (Celery, RQ) stay in the
peer's session, so that stopping the peer stops them even where the peer could not. Standard
library only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def start(
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    own_session: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=own_session,
        )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0, group: bool = True) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: to the process's group (its session) with
    ``group``, then SIGKILL to whatever is left in it; else to the process alone."""

    def send(sig: signal.Signals) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
    if group:
        send(signal.SIGKILL)  # the leader is gone; what it forked may not be


class Group:
    """A peer's worker processes, their logs in a temp dir of their own."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs.append(start(argv, self.tmp / f"{name}.log", env, own_session=False))

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around the start of the group: an error in it stops them all, shows their logs, and
        goes on up."""
        try:
            yield
        except BaseException:
            self.close(failed=True)
            raise

    def close(self, failed: bool = False) -> None:
        """Stop them all; after a failure, show the end of each log first."""
        for proc in self.procs:
            stop(proc, group=False)
        self.procs.clear()
        if failed:
            for log in sorted(self.tmp.glob("*.log")):
                print(f"{log.name}: {log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)
