"""Fixtures of the integration tests beyond tests/conftest.py's: a real PostgreSQL server."""

from pfpostgres import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]
