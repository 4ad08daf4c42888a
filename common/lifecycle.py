"""Signals, service-manager notification, and ending a child's process session.

Signal handlers only record the signal; the daemons' loops look at the flag.
``Notifier`` speaks systemd's sd_notify protocol on ``$NOTIFY_SOCKET`` (passed in
by the entry point, never read here from the environment).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from types import FrameType
from typing import Any


def kill_session(popen: subprocess.Popen[Any], wait_s: float = 10.0) -> None:
    """SIGKILL the session a child was started in (``start_new_session=True``: the child and
    whatever it started, pool children and forkserver included), then reap the child."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        popen.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass


class SignalFlag:
    """Counts SIGTERM/SIGINT; wakes a loop through a pipe the loop can poll."""

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    @property
    def fd(self) -> int:
        """Readable when a signal arrived."""
        return self._r

    def install(self, *signums: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.last = signum
        try:
            os.write(self._w, b"!")
        except OSError:
            pass

    def drain(self) -> None:
        try:
            while os.read(self._r, 512):
                pass
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Notifier:
    """Send sd_notify messages (READY=1, STOPPING=1, WATCHDOG=1) when a socket is given."""

    def __init__(self, notify_socket: str | None) -> None:
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if notify_socket:
            addr = notify_socket
            if addr.startswith("@"):
                addr = "\0" + addr[1:]
            self._addr = addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> bool:
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(f"READY=1\nMAINPID={os.getpid()}" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(watchdog_usec: str | None, watchdog_pid: str | None) -> float | None:
    """Half of systemd's WatchdogSec, if the watchdog is meant for this process."""
    if not watchdog_usec:
        return None
    if watchdog_pid and watchdog_pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(watchdog_usec)
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None
