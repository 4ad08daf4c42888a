"""A throwaway redis-server for Celery and RQ: loopback, a free port, a temp dir, no snapshots;
stopped by its pid. Standard library only."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.peers import procs

INSTALL_HINT = "redis-server is not on PATH (Debian: apt-get install redis-server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def version(binary: str) -> str:
    """``7.0.15`` from ``redis-server --version``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or "?"


class RedisServer:
    """``with RedisServer() as r:`` ... ``r.url``; raises RuntimeError if it does not come up."""

    def __init__(self, binary: str | None = None, timeout_s: float = 30.0) -> None:
        found = binary or shutil.which("redis-server")
        if not found:
            raise RuntimeError(INSTALL_HINT)
        self.binary = found
        self.version = version(found)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.port = free_port()
        argv = [found, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.tmp), "--daemonize", "no"]
        self.proc = procs.start(argv, self.tmp / "redis.log")
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.tmp / "redis.log").read_text(errors="replace")[-1000:]
                self.close()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}"

    def close(self) -> None:
        procs.stop(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
