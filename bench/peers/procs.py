"""Processes a peer's run starts (redis-server, Celery and RQ workers): each in a session of
its own, so that stopping it by its pid also stops what it forked. Standard library only."""

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
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
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
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the process's session, then SIGKILL to what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
            if sig == signal.SIGTERM:
                # the leader is gone; its forked children may not be
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


class Group:
    """A peer's worker processes, their logs in a temp dir of their own."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs.append(start(argv, self.tmp / f"{name}.log", env))

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
            stop(proc)
        self.procs.clear()
        if failed:
            for log in sorted(self.tmp.glob("*.log")):
                print(f"{log.name}: {log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)
