"""What the ptask commands kept in their own modules (map, top, local) share with ``cli``.

Those modules cannot import :mod:`poolfleet.client.cli` while they load, since
``cli`` imports them to register them; ``fail`` and ``make_client`` reach it at
call time, so every command reports errors and builds its client the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from poolfleet.client.client import Client

EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REJECTED = 4
UNREACHABLE_HINT = "is pmaster running? check --master or POOLFLEET_MASTER"

MasterOpt = Annotated[
    str | None,
    typer.Option(
        "--master", "-m", envvar="POOLFLEET_MASTER", help="Master's client endpoint [tcp://127.0.0.1:5555]."
    ),
]


def fail(message: str, code: int, hint: str = "") -> NoReturn:
    """Print ``ptask: error: ...`` (one line, with a hint) and exit with ``code``."""
    from poolfleet.client import cli

    cli.fail(message, code, hint)


def make_client(master: str | None, timeout: float) -> Client:
    """A client for --master (or the global option / POOLFLEET_MASTER), keys included."""
    from poolfleet.client import cli

    return cli.make_client(master, timeout)
