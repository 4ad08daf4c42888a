"""Descriptors and connections: pmaster's own descriptor limit, and a cap on the connections
each of its sockets holds.

ZeroMQ accepts every TCP connection it can, and has no per-socket cap. A flood of idle
connections would take every descriptor the process may open, and then the listener spins on
accept() failing (EMFILE) while real clients cannot connect and the journal cannot open a
file. So each socket is watched through a ZeroMQ socket monitor, which tells every accepted
connection and its descriptor: a connection accepted past the socket's cap is shut down at
once (shutdown(2) on ZeroMQ's descriptor, which ZeroMQ then closes itself), and headroom is
left for the other socket, the journal and the metrics endpoint. A connection that never
completes the ZeroMQ handshake is closed by ZeroMQ after HANDSHAKE_IVL_MS (set on the socket
before it binds: the listener copies it then).
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Mapping
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

log = structlog.get_logger("pmaster")

#: Descriptors kept for what is not a peer connection: the journal (its file, WAL, shared
#: memory, the checkpoint thread's connection), the listeners, ZeroMQ's own pipes, metrics.
RESERVED_FDS = 64
#: A TCP connection that has not completed the ZeroMQ handshake within this is closed.
HANDSHAKE_IVL_MS = 10_000
#: The monitor events a cap follows.
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft descriptor limit to the hard one; return (soft now, hard, soft before).
    Logged with the master's start (a start that fails prints one line, nothing else)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard, soft
        return hard, hard, soft
    return soft, hard, soft


def log_fd_limit(soft: int, hard: int, was: int) -> None:
    if soft != was:
        log.info("fd_limit_raised", soft=soft, hard=hard, was=was)
    else:
        log.info("fd_limit", soft=soft, hard=hard)


def per_socket_cap(fd_limit: int, sockets: int = 2) -> int:
    """Connections each of ``sockets`` sockets may hold under a descriptor limit, after the
    reserve (at least 8)."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit <= 0:
        fd_limit = 1 << 20
    return max(8, (fd_limit - RESERVED_FDS) // sockets)


class ConnectionCap:
    """Counts the connections a bound socket holds; shuts down those accepted past ``cap``.

    Fed by its own monitor (:meth:`watch`, read with :meth:`read` in the master's loop) or by
    another watcher of the socket's one monitor (CurveZMQ's, on its thread) through
    :meth:`on_event`. Set :attr:`endpoint` once the socket is bound."""

    def __init__(self, cap: int, name: str) -> None:
        self.cap = cap
        self.name = name
        #: the bound address: a descriptor is shut down only if it is a connection to it
        self.endpoint = ""
        self.open: set[int] = set()
        self.refused = 0
        self._capped = False
        self.monitor: zmq.Socket[bytes] | None = None

    def watch(self, sock: zmq.Socket[bytes]) -> None:
        """Monitor ``sock`` (before it binds)."""
        self.monitor = sock.get_monitor_socket(EVENTS)

    def read(self) -> None:
        """Handle what the own monitor reported (call when it is readable)."""
        if self.monitor is None:
            return
        for _ in range(10_000):
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.on_event(ev)

    def on_event(self, ev: Mapping[str, Any]) -> None:
        fd = int(ev["value"])
        if ev["event"] == zmq.EVENT_ACCEPTED:
            self.open.add(fd)
            if len(self.open) > self.cap:
                self._refuse(fd)
            return
        self.open.discard(fd)
        if self._capped and len(self.open) < self.cap:
            self._capped = False
            log.warning("connections_below_cap", socket=self.name, open=len(self.open), refused=self.refused)

    def _refuse(self, fd: int) -> None:
        self.refused += 1
        if not self._capped:  # once per episode; connections_below_cap ends it
            self._capped = True
            log.error(
                "connections_capped",
                socket=self.name,
                cap=self.cap,
                action="new connections are closed until some leave; raise the descriptor limit"
                " (LimitNOFILE) to allow more",
            )
        try:
            sock = socket.socket(fileno=fd)  # ZeroMQ's descriptor: shut down, never closed here
        except OSError:
            return  # already gone
        try:
            if self._ours(sock.getsockname()):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()

    def _ours(self, local: object) -> bool:
        """Whether a descriptor's local address is this socket's endpoint (the descriptor may
        have been closed and reused since the monitor told of it)."""
        if isinstance(local, tuple):
            return self.endpoint.startswith("tcp://") and self.endpoint.rsplit(":", 1)[-1] == str(local[1])
        return isinstance(local, str) and bool(local) and self.endpoint.endswith(local)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None
