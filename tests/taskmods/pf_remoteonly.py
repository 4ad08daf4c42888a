"""A task module the test process never imports: its exception type is unknown to the client."""

from __future__ import annotations


class RemoteOnlyError(Exception):
    pass


def fail() -> None:
    raise RemoteOnlyError("only the worker knows this type")
