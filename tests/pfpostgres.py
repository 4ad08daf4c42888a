"""A real PostgreSQL server for tests (bench/pgserver.py): ``pg_server`` (one per test session,
on 127.0.0.1) and ``pg_url`` (a new, empty database on it for each test). Import both fixtures
into a test module to use them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from pfharness import unavailable

from bench.pgserver import PgServer, PgUnavailable, running_server

__all__ = ["PgServer", "pg_server", "pg_url", "server_for_tests"]


@contextlib.contextmanager
def server_for_tests(listen: str = "127.0.0.1", wrap: list[str] | None = None) -> Iterator[PgServer]:
    """``running_server``, skipped (failed on CI) where PostgreSQL is not installed."""
    try:
        with running_server(listen, wrap) as server:
            yield server
    except PgUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with server_for_tests() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A new empty database, as a URL this process can connect with."""
    return pg_server.local_url(pg_server.new_database())
