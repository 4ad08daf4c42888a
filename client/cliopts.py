"""What the ptask commands kept in their own modules (map, top, local) share with ``cli``.

Those modules cannot import :mod:`poolfleet.client.cli` while they load, since
``cli`` imports them to register them; ``fail`` and ``make_client`` reach it at
call time, so every command reports errors and builds its client the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from poolfleet.common.errors import EncodeError, MasterUnreachable, PoolfleetError, RemoteError

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

# The options of a task, shared by ptask submit, run and schedule add.
TaskArg = Annotated[str, typer.Argument(help="The task, as module:function.")]
ArgsArg = Annotated[list[str] | None, typer.Argument(help="Arguments: JSON values, or plain strings.")]
KwargsOpt = Annotated[str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")]
KindOpt = Annotated[str | None, typer.Option("--kind", help="cpu or io (default: the task's own).")]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="Queue to submit to [default].")]
RetriesOpt = Annotated[int | None, typer.Option("--retries", help="Retries after a failure.")]
PriorityOpt = Annotated[
    int | None,
    typer.Option(
        "--priority", min=-100, max=100, help="Higher starts first within its queue (-100 to 100) [0]."
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


@contextmanager
def asking(master: str | None, timeout: float, refused_exit: int = EXIT_USAGE) -> Iterator[Client]:
    """A client for one command's requests, closed afterwards, with ptask's exits: 3 the master
    unreachable; 2 a bad request (``refused_exit`` for any other refusal by the master); 2 a
    bad argument."""
    client = make_client(master, timeout)
    try:
        yield client
    except MasterUnreachable as exc:
        fail(str(exc), EXIT_UNREACHABLE, UNREACHABLE_HINT)
    except RemoteError as exc:
        fail(exc.message, EXIT_USAGE if exc.code == "bad_request" else refused_exit)
    except (PoolfleetError, EncodeError) as exc:
        fail(str(exc), EXIT_USAGE)
    finally:
        client.close()
