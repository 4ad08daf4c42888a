"""A standby master: sockets bound, every message answered with ERROR ``standby``, the lease
polled until this master takes it over.

Only masters on a PostgreSQL journal have a standby phase; the shell (server.py)
runs it before recovering the journal, and serves once it holds the lease.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.net import send_frames
from poolfleet.common.protocol import MAGIC, ErrorCode, MsgKind

if TYPE_CHECKING:
    from poolfleet.master.journal_api import Lease
    from poolfleet.master.server import Master

log = structlog.get_logger("pmaster")

MAX_READS_PER_TURN = 2000


def describe(active: dict[str, Any] | None) -> str:
    """The ERROR message: which master is active, and where, when the lease row says."""
    if not active or not active.get("live"):
        return "this master is a standby; no master holds the lease right now (a takeover is near)"
    return (
        f"this master is a standby; the active master is on {active['host']} (pid {active['pid']}),"
        f" serving clients at {active['clients']} and workers at {active['workers']}"
    )


def _req_of(frames: list[bytes]) -> int | None:
    try:
        _kind, body = messages.decode(frames)
    except ProtocolError:
        return codec.peek_req(frames[2]) if len(frames) == 3 and frames[0] == MAGIC else None
    req = body.get("req")
    return req if type(req) is int else None


class Standby:
    """Runs the standby phase of ``master`` until it holds the lease or is told to stop."""

    def __init__(self, master: Master, lease: Lease, clock: Callable[[], float] = time.monotonic) -> None:
        self.master = master
        self.lease = lease
        self.clock = clock
        self.active: dict[str, Any] | None = None
        self.answered = 0

    def _answer(self, sock: zmq.Socket[bytes], with_req: bool) -> None:
        message = describe(self.active)
        for _ in range(MAX_READS_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            body: dict[str, Any] = {"code": ErrorCode.STANDBY.value, "message": message}
            req = _req_of(frames[1:]) if with_req else None
            if req is not None:
                body["req"] = req
            try:
                send_frames(sock, [frames[0], *messages.encode(MsgKind.ERROR, body)], zmq.NOBLOCK)
            except zmq.ZMQError:
                continue  # the peer's queue is full or it is gone: it asks again
            self.answered += 1

    def _try(self) -> bool:
        m = self.master
        try:
            if self.lease.try_acquire(m.client_endpoint, m.worker_endpoint):
                return True
            self.active = self.lease.holder()
        except Exception as exc:  # noqa: BLE001 - the database may be away: ask again later
            log.warning("journal_unreachable", reason=str(exc).strip())
            self.active = None
        return False

    def wait(self) -> bool:
        """Serve as a standby; True once this master holds the lease, False on a stop signal."""
        m = self.master
        started = self.clock()
        if self._try():
            return True
        log.info(
            "master_standby",
            clients_endpoint=m.client_endpoint,
            workers_endpoint=m.worker_endpoint,
            master_id=m.master_id,
            active_master=(self.active or {}).get("holder"),
            active_host=(self.active or {}).get("host"),
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        m.notifier.ready(f"standby, serving no one on {m.client_endpoint} until it holds the lease")
        poller = zmq.Poller()
        poller.register(m.client_sock, zmq.POLLIN)
        poller.register(m.worker_sock, zmq.POLLIN)
        poller.register(m.signals.fd, zmq.POLLIN)
        interval = m.settings.renew_interval_s
        next_try = self.clock() + interval
        last_watchdog = 0.0
        while True:
            wait_ms = max(1, int((next_try - self.clock()) * 1000))
            if m.watchdog_s:
                wait_ms = min(wait_ms, int(m.watchdog_s * 1000))
            events = dict(poller.poll(wait_ms))
            if m.signals.fd in events:
                m.signals.drain()
                if m.signals.count:
                    return False
            if m.client_sock in events:
                self._answer(m.client_sock, True)
            if m.worker_sock in events:
                self._answer(m.worker_sock, False)
            now = self.clock()
            if m.watchdog_s and now - last_watchdog >= m.watchdog_s:
                last_watchdog = now
                m.notifier.watchdog()
            if now >= next_try:
                next_try = now + interval
                if self._try():
                    log.info("standby_ended", standby_s=round(now - started, 3), answered=self.answered)
                    return True
