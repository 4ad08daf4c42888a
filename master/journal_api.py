"""The journal interface the master shell uses, and the choice of backend.

Two backends offer it: :class:`~poolfleet.master.journal.SqliteJournal`, one
file in the data dir (the default), and
:class:`~poolfleet.master.journal_pg.PostgresJournal`, the same tables in a
PostgreSQL database shared by an active master and its standbys. The core
stages writes through the smaller ``JournalPort`` (core_base.py); the shell
commits, recovers, expires and, on PostgreSQL, holds the lease.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

from poolfleet.common.errors import ConfigError
from poolfleet.master.core_base import JournalPort
from poolfleet.master.settings import MasterSettings, check_journal_url, is_postgres

__all__ = ["JournalStore", "Lease", "LeaseLost", "check_journal_url", "is_postgres", "open_journal"]


class LeaseLost(Exception):
    """This master's lease is gone (taken over, expired, or the database is unreachable):
    it must write nothing more and step down."""


class Lease(Protocol):
    """The active master's hold on a shared journal (PostgreSQL only)."""

    @property
    def token(self) -> int | None: ...
    def try_acquire(self, clients: str, workers: str) -> bool: ...
    def renew(self) -> None: ...
    def release(self) -> None: ...
    def holder(self) -> dict[str, Any] | None: ...
    def previous_released(self) -> bool: ...


class JournalStore(JournalPort, Protocol):
    """Every journal operation of the master: the core's staging and lookups (JournalPort),
    and the shell's commit, recovery reads and expiry."""

    has_lease: bool
    schema_version: int
    start_defer_s: float
    clock: Callable[[], float]

    @property
    def staged(self) -> int: ...
    def commit(self, final: bool = False) -> int: ...
    def next_start_due(self) -> float | None: ...
    def unstage_inserts(self, ids: set[bytes]) -> None: ...
    def stage_mark(self, wall: float) -> None: ...
    def load_open(self) -> Iterator[tuple[Any, ...]]: ...
    def load_task_defs(self) -> list[tuple[str, str, float | None, int]]: ...
    def load_deps(self) -> list[tuple[bytes, bytes, int]]: ...
    def load_schedules(self) -> list[tuple[Any, ...]]: ...
    def load_limits(self) -> list[tuple[str, int, float]]: ...
    def final_counts(self) -> dict[str, int]: ...
    def paused_queues(self) -> list[str]: ...
    def expire(self, now: float, limit: int = 5000) -> dict[str, int]: ...
    def checkpoint(self) -> None: ...
    def close(self) -> None: ...


def redact(url: str) -> str:
    """The URL as logged: never with a password (there should be none, see check_journal_url)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def open_journal(settings: MasterSettings, holder: str) -> JournalStore:
    """The journal the settings name; ``holder`` identifies this master in a lease."""
    if is_postgres(settings.journal):
        try:
            from poolfleet.master.journal_pg import PostgresJournal
        except ImportError as exc:
            raise ConfigError(
                f"a PostgreSQL journal needs psycopg 3: pip install 'poolfleet[postgres]' ({exc})"
            ) from None

        assert settings.journal is not None
        return PostgresJournal(settings.journal, holder, settings.lease_s)
    from poolfleet.master.journal import SqliteJournal

    return SqliteJournal(settings.data_dir / "journal.sqlite3", settings.journal_sync)
