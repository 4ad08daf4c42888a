"""ptask waits for the master out loud: what the transport knows is said within about 2 s.

Without this, a command whose master is not running waits its whole ``--timeout``
in silence. The connection's socket monitor knows within milliseconds that
connects are refused (nothing listens at the endpoint) or that the security
handshake fails; ptask says so after ``NOTICE_AFTER_S`` and keeps trying until
``--timeout``, then exits 3 with the same words.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from poolfleet.client.cliopts import EXIT_REJECTED, EXIT_UNREACHABLE, UNREACHABLE_HINT, fail
from poolfleet.client.connection import Link

if TYPE_CHECKING:
    from poolfleet.client.client import Client
    from poolfleet.client.connection import Connection

#: How long ptask waits for the master before it says what the transport knows.
NOTICE_AFTER_S = 2.0
#: The default --timeout of commands that only read (status, workers, result without --wait).
QUERY_TIMEOUT_S = 5.0
KEY_REFUSED_HINT = "the master's --curve-clients-dir must hold this client's public key (NAME.key)"
HANDSHAKE_HINT = (
    "give --curve-server-key (the master's public key) and --curve-secret-key, "
    "or neither when the master uses no keys"
)


def hint_for(conn: Connection) -> str:
    """What to check, given what the transport said."""
    if conn.link == Link.AUTH_FAILED:
        return KEY_REFUSED_HINT
    if conn.link == Link.HANDSHAKE_FAILED:
        return HANDSHAKE_HINT
    if conn.link == Link.OPEN:
        return "check that --master is the endpoint pmaster serves clients on (its --clients)"
    return UNREACHABLE_HINT


def reach_master(client: Client, timeout: float) -> None:
    """Wait until the master has welcomed this client, or exit 3 after ``timeout`` seconds.

    After ``NOTICE_AFTER_S`` without a welcome, print (once, to stderr) what the transport
    knows, e.g. that nothing is listening at the endpoint, and that ptask keeps trying.
    """
    conn = client._conn
    start = time.monotonic()
    deadline = start + timeout
    notice_at = start + NOTICE_AFTER_S
    noticed = False
    while True:
        now = time.monotonic()
        target = deadline if noticed else min(deadline, notice_at)
        if conn.connected.wait(max(0.0, min(target - now, 0.25))):
            return
        if conn.broken is not None:
            client.close()
            fail(str(conn.broken), EXIT_REJECTED)
        now = time.monotonic()
        if now >= deadline:
            why = conn.link_problem() or f"the master at {client.master} did not answer"
            hint = hint_for(conn)
            client.close()
            fail(f"{why}, after {timeout:g} s of trying (--timeout)", EXIT_UNREACHABLE, hint)
        if not noticed and now >= notice_at:
            noticed = True
            problem = conn.link_problem()
            if problem and conn.peer_error is not None:  # it answered, so trying longer changes nothing
                client.close()
                fail(problem, EXIT_UNREACHABLE, hint_for(conn))
            if problem:
                typer.echo(
                    f"ptask: {problem}; ptask keeps trying until --timeout ({timeout:g} s) "
                    f"(hint: {hint_for(conn)})",
                    err=True,
                )
