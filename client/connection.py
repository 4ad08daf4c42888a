"""The client's link to the master: one background thread owns the DEALER socket.

Callers hand it work through a queue and a wake-up pipe. It batches submits,
matches replies to requests by ``req`` number, resends what the master has
not acknowledged after a reconnect or a master restart (task ids make resent
submits idempotent) and re-subscribes to the results it still waits for.

It heartbeats while idle too, so an idle connection stays known to be alive and
the first request after a pause is never taken for one the master ignored. A
ZeroMQ socket monitor tells what the transport knows long before any reply is
due: that nothing listens at the endpoint, or that the security handshake fails
(see :meth:`Connection.link_problem`).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from poolfleet.common import messages
from poolfleet.common.batching import chunks
from poolfleet.common.curve import load_client_keys, set_client_keys
from poolfleet.common.errors import MasterUnreachable, ProtocolError, RemoteError
from poolfleet.common.net import parse_endpoint, send_frames, tune
from poolfleet.common.protocol import OPEN_STATES, PROTOCOL_VERSION, ErrorCode, MsgKind, Role

# A library must not print on its users' stdout: log through stdlib logging, so nothing
# below WARNING shows unless the application configures logging.
log = structlog.wrap_logger(
    logging.getLogger("poolfleet.client"),
    processors=[structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)],
)

#: Tasks per SUBMIT message (and ids per RESULT_GET when resyncing). The master handles a
#: message in one piece, so this bounds how long others wait behind it: with 2,000 a STATUS
#: waited 38 ms at the median while a million tasks were submitted, with 500 it waits 19 ms,
#: at the same submit rate (docs/BENCHMARKS.md, scale).
SUBMIT_BATCH = 500
#: The client tells the master (HEARTBEAT "received") how many bytes of pushed results it has
#: read at least this often: the master pushes a client at most 16 MiB ahead of its reading.
REPORT_BYTES = 4 * 1024 * 1024
ResultHandler = Callable[[dict[str, Any]], None]
#: Called with a task id when the master says a slot started that task.
StartedHandler = Callable[[bytes], None]

#: Transport events the connection follows (see :meth:`Connection.link_problem`).
MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Link:
    """What the transport last said about the link to the master (states are strings)."""

    CONNECTING = "connecting"  # no TCP connection yet, and none refused either
    REFUSED = "refused"  # connects are refused: nothing listens at the endpoint
    OPEN = "open"  # a transport connection is up (the master has not necessarily answered)
    HANDSHAKE_FAILED = "handshake_failed"  # the security handshake failed (keys)
    AUTH_FAILED = "auth_failed"  # the master refused this client's key


@dataclass
class _Request:
    kind: MsgKind
    body: dict[str, Any]
    future: Future[dict[str, Any]]
    sent_at: float = 0.0
    task_ids: list[bytes] = field(default_factory=list)


#: The shortest time between two moves to the next master on ERROR standby.
MOVE_GAP_S = 0.2


class Connection:
    """Thread-safe handle; all socket work happens on its own thread."""

    def __init__(
        self,
        endpoint: str,
        on_result: ResultHandler,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        curve_server_key: str | None = None,
        curve_secret_key: str | None = None,
        on_started: StartedHandler | None = None,
    ) -> None:
        #: several masters (an active one and its standbys), comma-separated: the client moves
        #: to the next on ERROR standby or when the one it talks to falls silent
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()] or [endpoint]
        for ep in self.endpoints:
            parse_endpoint(ep)
        self.endpoint = self.endpoints[0]
        self._move_due: float | None = None
        self._moved_at = 0.0
        self.on_result = on_result
        self.on_started = on_started
        #: called with the entries of each PROGRESS push (on this connection's thread)
        self.on_progress: Callable[[list[dict[str, Any]]], None] | None = None
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        # read the key files now, so a bad path fails in the caller's thread
        self._curve_keys = load_client_keys(curve_server_key, curve_secret_key)
        self.ctx = zmq.Context()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # a wake-up is in the pipe: callers skip the write (one syscall and one thread switch
        # per call otherwise), and the thread takes everything queued meanwhile in one go
        self._poked = False
        self._req = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._waiting: set[bytes] = set()  # task ids whose results we wait for
        #: bytes of pushed results read on this connection, and as last reported to the master
        self._pushed_in = 0
        self._reported = 0
        self._closed = threading.Event()
        self.master_id: str | None = None
        self.broken: Exception | None = None
        self.connected = threading.Event()
        #: transport state from the socket monitor (a str of :class:`Link`), written by the thread
        self.link = Link.CONNECTING
        #: the first error the peer sent that answered no request (e.g. HELLO refused), if any
        self.peer_error: str | None = None
        self.sock: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._busy_since = 0.0  # when the connection last went from idle to waiting for the master
        self._thread = threading.Thread(target=self._loop, name="poolfleet-client", daemon=True)
        self._thread.start()

    # -- API for other threads --------------------------------------------------
    def request(self, kind: MsgKind, body: dict[str, Any]) -> Future[dict[str, Any]]:
        """Send a request; the future gets the reply body (or RemoteError)."""
        fut: Future[dict[str, Any]] = Future()
        self._put("request", _Request(kind, body, fut))
        return fut

    def submit(self, entries: list[dict[str, Any]], wait: bool) -> Future[dict[str, Any]]:
        """Queue task entries; the future gets the merged SUBMITTED reply."""
        fut: Future[dict[str, Any]] = Future()
        self._put("submit", (entries, wait, fut))
        return fut

    def mark(self) -> threading.Event:
        """An event set once everything queued before it has been handed to the socket."""
        ev = threading.Event()
        self._put("mark", ev)
        return ev

    def watch(self, task_ids: list[bytes]) -> Future[dict[str, Any]]:
        """Ask to be pushed the results of these tasks; the future gets the first reply."""
        fut: Future[dict[str, Any]] = Future()
        self._put("watch", (task_ids, fut))
        return fut

    def on_own_thread(self) -> bool:
        """Whether the caller runs on the connection's thread (in a result callback)."""
        return threading.current_thread() is self._thread

    def link_problem(self) -> str | None:
        """Why the master has not answered, as far as the transport knows; None once it has.

        Meant for a caller that has waited a second or two: a refused connect is reported
        within a few hundred milliseconds of the first try.
        """
        if self.connected.is_set() and self.link == Link.OPEN:
            return None
        ep = self.endpoint
        if self.link == Link.REFUSED:
            return f"nothing is listening at {ep}"
        if self.link == Link.AUTH_FAILED:
            return f"the master at {ep} refused this client's CurveZMQ key"
        if self.link == Link.HANDSHAKE_FAILED:
            return f"the CurveZMQ handshake with {ep} failed"
        if self.link == Link.OPEN and self.peer_error is not None:
            return f"{ep} refused this client: {self.peer_error}"
        if self.link == Link.OPEN:
            return f"connected to {ep}, but no pmaster has answered there"
        return f"no connection to {ep} yet (the host does not answer)"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._put("close", None)
        self._thread.join(timeout=5)

    def _put(self, what: str, item: Any) -> None:
        if self._closed.is_set():
            raise MasterUnreachable("the client is closed")
        if self.broken is not None and what != "close":
            raise self.broken
        self._inbox.put((what, item))
        if self._poked:
            return
        self._poked = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the thread ------------------------------------------------------------
    def _open(self) -> None:
        self._close_socket()
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        tune(sock, endpoint=self.endpoint)
        if self._curve_keys is not None:
            set_client_keys(sock, self._curve_keys)
        self._monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        self.poller.register(self._monitor, zmq.POLLIN)
        sock.connect(self.endpoint)
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)
        self._raw_send(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": Role.CLIENT.value})
        self._pushed_in = self._reported = 0
        self.last_heard = time.monotonic()

    def _close_socket(self) -> None:
        if self._monitor is not None:
            self.poller.unregister(self._monitor)
            if self.sock is not None:
                self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
            self.sock = None

    def _read_monitor(self) -> None:
        while self._monitor is not None:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.link = Link.OPEN
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.link = Link.AUTH_FAILED
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.link = Link.HANDSHAKE_FAILED
            elif self.link in (Link.AUTH_FAILED, Link.HANDSHAKE_FAILED):
                pass  # the transport reconnects after a failed handshake: the failure is the news
            elif event == zmq.EVENT_CONNECTED:
                self.link = Link.OPEN
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self.link = Link.REFUSED
            elif event == zmq.EVENT_DISCONNECTED:
                self.link = Link.CONNECTING

    def _raw_send(self, kind: MsgKind, body: dict[str, Any]) -> None:
        if self.sock is None:
            return
        try:
            send_frames(self.sock, messages.encode(kind, body), zmq.NOBLOCK)
            self.last_sent = time.monotonic()
        except zmq.Again:
            log.warning("client_send_dropped", kind=kind.name)

    def _loop(self) -> None:
        self.poller = zmq.Poller()
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.last_sent = 0.0
        self._open()
        try:
            while not self._closed.is_set():
                events = dict(self.poller.poll(int(self.heartbeat_interval_s * 500)))
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    # after the drain (a poke written meanwhile would be lost with it) and before
                    # taking the inbox (what is put from now on pokes again)
                    self._poked = False
                self._take_inbox()
                # the monitor first: its news (connected) is older than any message read now
                if self._monitor is not None and self._monitor in events:
                    self._read_monitor()
                if self.sock is not None and self.sock in events:
                    self._read()
                self._keepalive()
        finally:
            self._fail_all(MasterUnreachable("the client was closed"))
            self._close_socket()
            self.ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _take_inbox(self) -> None:
        submits: list[tuple[list[dict[str, Any]], bool, Future[dict[str, Any]]]] = []
        marks: list[threading.Event] = []
        while True:
            try:
                what, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if submits and (what == "watch" or (what == "request" and item.kind is MsgKind.CANCEL)):
                # in order: a CANCEL or a RESULT_GET must not overtake the SUBMIT of its task
                # (other requests, such as STATUS, go ahead of the batch being built)
                self._send_submits(submits)
                submits = []
            if what == "request":
                self._send_request(item)
            elif what == "submit":
                submits.append(item)
            elif what == "watch":
                ids, fut = item
                self._waiting.update(ids)
                self._send_request(
                    _Request(MsgKind.RESULT_GET, {"ids": list(ids), "wait": True, "progress": True}, fut)
                )
            elif what == "mark":
                marks.append(item)
            elif what == "close":
                self._closed.set()
        if submits:
            self._send_submits(submits)
        for ev in marks:
            ev.set()

    def _send_submits(self, submits: list[tuple[list[dict[str, Any]], bool, Future[dict[str, Any]]]]) -> None:
        # Group by 'wait' and pack many callers' tasks into few messages.
        for wait in (True, False):
            group = [s for s in submits if s[1] is wait]
            entries = [e for s in group for e in s[0]]
            if not entries:
                continue
            futures = [s[2] for s in group]
            if wait:
                self._waiting.update(e["id"] for e in entries)
            parts: list[Future[dict[str, Any]]] = []
            for chunk in chunks(entries, SUBMIT_BATCH, "payload"):
                part: Future[dict[str, Any]] = Future()
                parts.append(part)
                self._send_request(
                    _Request(
                        MsgKind.SUBMIT,
                        {"tasks": chunk, "wait": wait, "progress": wait},
                        part,
                        task_ids=[e["id"] for e in chunk],
                    )
                )
            _join_replies(parts, futures)

    def _send_request(self, r: _Request) -> None:
        req = next(self._req)
        r.body["req"] = req
        r.sent_at = time.monotonic()
        self._pending[req] = r
        self._raw_send(r.kind, r.body)

    def _read(self) -> None:
        for _ in range(1000):
            if self.sock is None:
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                kind, body = messages.decode(frames)
            except ProtocolError as exc:
                log.warning("frame_rejected", peer="master", reason=exc.message)
                continue
            if kind is MsgKind.RESULTS and "req" not in body:
                self._pushed_in += len(frames[-1])
            self._handle(kind, body)

    def _handle(self, kind: MsgKind, body: dict[str, Any]) -> None:
        if kind is MsgKind.WELCOME and body.get("version") != PROTOCOL_VERSION:
            self._break(
                RemoteError(
                    "bad_version",
                    f"master speaks protocol {body.get('version')}, this client speaks {PROTOCOL_VERSION}",
                )
            )
            return
        if kind is MsgKind.WELCOME or kind is MsgKind.HEARTBEAT:
            if body.get("pushes_paused"):
                self._refetch()
            master_id = body.get("master_id")
            if isinstance(master_id, str) and master_id != self.master_id:
                restarted = self.master_id is not None
                self.master_id = master_id
                self.connected.set()
                if restarted:
                    self._resync("master restarted")
            return
        req = body.get("req")
        if req is None and self._pushed(kind, body):
            return
        r = self._pending.pop(req, None) if isinstance(req, int) else None
        if kind is MsgKind.ERROR:
            self._on_error(body, req, r)
            return
        if r is None:
            return  # a duplicate reply to a resent request
        if kind is MsgKind.RESULTS:
            for entry in body["results"]:
                state = entry.get("state")
                if state == "RUNNING":  # a RESULT_GET (a resync) tells what a lost notice would
                    self._started(entry.get("id"))
                elif state not in OPEN_STATES:
                    self._deliver(entry)
        _set(r.future, body)

    def _pushed(self, kind: MsgKind, body: dict[str, Any]) -> bool:
        """A push of the master's (no ``req``): results, started tasks, progress; True if so."""
        if kind is MsgKind.RESULTS:
            for entry in body["results"]:
                self._deliver(entry)
        elif kind is MsgKind.TASKS_STARTED:
            for ref in body["tasks"]:
                self._started(ref.get("id") if isinstance(ref, dict) else None)
        elif kind is MsgKind.PROGRESS:
            if self.on_progress is not None:
                try:
                    self.on_progress([e for e in body["tasks"] if isinstance(e, dict)])
                except Exception:  # a user callback must not kill the connection
                    log.exception("progress_callback_failed")
        else:
            return False
        return True

    def _on_error(self, body: dict[str, Any], req: Any, r: _Request | None) -> None:
        """An ERROR: fails the request it answers; a standby's moves on to the next master."""
        err = RemoteError(body["code"], body["message"])
        if body["code"] == ErrorCode.STANDBY and len(self.endpoints) > 1:
            if r is not None:
                self._pending[req] = r  # kept: sent again to the next master
            if self._move_due is None:  # at most one move per gap: two standbys, no spin
                self._move_due = max(time.monotonic(), self._moved_at + MOVE_GAP_S)
            return
        if r is not None:
            _set(r.future, exc=err)
        elif body["code"] == ErrorCode.BAD_VERSION:
            self._break(err)
        else:
            if self.peer_error is None:
                self.peer_error = str(body["message"])
            log.warning("master_error", code=body["code"], reason=body["message"])

    def _started(self, tid: Any) -> None:
        if self.on_started is None or not isinstance(tid, bytes) or tid not in self._waiting:
            return
        try:
            self.on_started(tid)
        except Exception:  # a user callback must not kill the connection
            log.exception("started_callback_failed")

    def _deliver(self, entry: dict[str, Any]) -> None:
        tid = entry.get("id")
        if isinstance(tid, bytes):
            self._waiting.discard(tid)
        try:
            self.on_result(entry)
        except Exception:  # a user callback must not kill the connection
            log.exception("result_callback_failed")

    def _keepalive(self) -> None:
        """Heartbeat, busy or idle; reconnect when the master is silent while we wait for it.

        Silence counts from the later of the last message heard and the moment this
        connection started waiting: a request sent after an idle spell is never resent
        at once because the spell was long.
        """
        now = time.monotonic()
        busy = bool(self._pending or self._waiting)
        if not busy:
            self._busy_since = 0.0
        elif not self._busy_since:
            self._busy_since = now
        limit = self.heartbeat_interval_s * self.liveness
        silent_s = now - max(self.last_heard, self._busy_since)
        if self._move_due is not None and now >= self._move_due:
            self._move("standby")
            return
        if busy and silent_s > limit:
            log.info("master_silent", silent_s=round(silent_s, 3), endpoint=self.endpoint)
            if len(self.endpoints) > 1:
                self._move("silent")
                return
            self._open()
            self._resync("reconnected")
            return
        # idle, only over a live transport: heartbeats queued while nothing is connected would
        # pile up in the socket and reach the next master all at once
        behind = self._pushed_in - self._reported >= REPORT_BYTES
        if behind or (now - self.last_sent >= self.heartbeat_interval_s and (busy or self.link == Link.OPEN)):
            self._reported = self._pushed_in
            self._raw_send(MsgKind.HEARTBEAT, {"received": self._pushed_in} if self._pushed_in else {})

    def _refetch(self) -> None:
        """The master paused its pushes to us (we read too slowly) and has resumed them: fetch
        the results we still wait for, one batch at a time (each reply read before the next
        is asked for)."""
        ids = list(self._waiting)
        log.info("client_refetch", reason="pushes_paused", waiting=len(ids))

        def step(i: int) -> None:
            if i >= len(ids) or self._closed.is_set():
                return
            fut: Future[dict[str, Any]] = Future()
            fut.add_done_callback(lambda f: None if f.exception() else step(i + SUBMIT_BATCH))
            self._send_request(
                _Request(MsgKind.RESULT_GET, {"ids": ids[i : i + SUBMIT_BATCH], "wait": True}, fut)
            )

        step(0)

    def _move(self, why: str) -> None:
        """Talk to the next master of the list from now on, and resend what waits for one."""
        self._move_due = None
        self._moved_at = time.monotonic()
        i = (self.endpoints.index(self.endpoint) + 1) % len(self.endpoints)
        self.endpoint = self.endpoints[i]
        log.info("master_moved", reason=why, endpoint=self.endpoint)
        self._open()
        self._resync(f"moved to {self.endpoint}")

    def _resync(self, why: str) -> None:
        """Resend unacknowledged requests and re-subscribe to awaited results."""
        log.info("client_resync", reason=why, unacked=len(self._pending), waiting=len(self._waiting))
        for r in list(self._pending.values()):
            self._raw_send(r.kind, r.body)
        if self._waiting:
            ids = list(self._waiting)
            for i in range(0, len(ids), SUBMIT_BATCH):
                self._send_request(
                    _Request(
                        MsgKind.RESULT_GET,
                        {"ids": ids[i : i + SUBMIT_BATCH], "wait": True, "progress": True},
                        Future(),
                    )
                )

    def _break(self, exc: Exception) -> None:
        """The master speaks another protocol: fail everything, now and later."""
        log.error("master_refused", reason=str(exc))
        self.broken = exc
        self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        for r in self._pending.values():
            _set(r.future, exc=exc)
        self._pending.clear()


def _set(
    fut: Future[dict[str, Any]], body: dict[str, Any] | None = None, exc: BaseException | None = None
) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(body or {})


def _join_replies(parts: list[Future[dict[str, Any]]], callers: list[Future[dict[str, Any]]]) -> None:
    """When every part of a batched submit is acknowledged, answer every caller."""
    remaining = [len(parts)]
    merged: dict[str, Any] = {"accepted": [], "rejected": []}
    lock = threading.Lock()

    def done(f: Future[dict[str, Any]]) -> None:
        with lock:
            remaining[0] -= 1
            exc = f.exception()
            if exc is not None:
                merged.setdefault("error", exc)
            else:
                body = f.result()
                merged["accepted"].extend(body.get("accepted", []))
                merged["rejected"].extend(body.get("rejected", []))
                for key in ("unserved", "served"):  # queues no connected worker serves: a warning
                    if body.get(key):
                        merged[key] = sorted({*merged.get(key, []), *body[key]})
            if remaining[0]:
                return
        for c in callers:
            if "error" in merged:
                _set(c, exc=merged["error"])
            else:
                _set(c, merged)

    for p in parts:
        p.add_done_callback(done)
