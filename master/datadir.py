"""The master's data dir: one pmaster at a time (an exclusive lock), and whether it stopped cleanly."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from poolfleet.common.errors import ConfigError

LOCK_NAME = "pmaster.lock"
#: Written by a master that stopped cleanly (after its last commit), removed at start.
CLEAN_NAME = "clean-stop"


class DataDir:
    """Holds ``flock`` on ``<dir>/pmaster.lock`` from :meth:`lock` until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False
        self._top: Path | None = None  # the topmost directory this process made
        self._fd: int | None = None

    def lock(self) -> None:
        """Create the dir if needed and lock it; ConfigError naming the holder if it is taken."""
        if not self.path.exists():
            top = self.path.absolute()
            while not top.parent.exists():
                top = top.parent
            self.path.mkdir(parents=True)
            self.created = True
            self._top = top
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"data dir {self.path} is in use by another pmaster (pid {holder}); "
                "stop that one or give this one another --data-dir"
            ) from None
        # the pid only names the holder to a second master: on a full disk the lock holds without it
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def was_clean(self) -> bool:
        """Whether the last master on this dir stopped cleanly (or there was none)."""
        return (
            self.created or (self.path / CLEAN_NAME).exists() or not (self.path / "journal.sqlite3").exists()
        )

    def started(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / CLEAN_NAME).unlink()

    def stopped_cleanly(self) -> None:
        (self.path / CLEAN_NAME).write_text(f"{os.getpid()}\n")

    def release(self, remove_created: bool = False) -> None:
        """Unlock; with ``remove_created``, also remove the dir if this process made it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove_created and self._top is not None:
            shutil.rmtree(self._top, ignore_errors=True)
