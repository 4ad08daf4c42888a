"""The pmaster shell: one thread, one poller, two ROUTER sockets, the journal.

Each loop turn reads what has arrived on both sockets and hands it, decoded,
to the master core (core.py), which decides everything; then runs the core's
timers and a dispatch round, commits the journal once (group commit) and only
then sends what waited for the commit: acknowledgements, results, result
acknowledgements to workers. DISPATCH and direct replies go out at once.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import structlog
import zmq

from poolfleet.common import codec, messages
from poolfleet.common.batching import chunks
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.lifecycle import Notifier, SignalFlag
from poolfleet.common.net import last_endpoint, send_frames, tune
from poolfleet.common.protocol import MAGIC, ErrorCode, MsgKind, Role
from poolfleet.master import worker_api
from poolfleet.master.conncap import EVENTS as CAP_EVENTS
from poolfleet.master.conncap import (
    HANDSHAKE_IVL_MS,
    ConnectionCap,
    log_fd_limit,
    per_socket_cap,
    raise_fd_limit,
)
from poolfleet.master.core import MasterCore, Send
from poolfleet.master.datadir import DataDir
from poolfleet.master.journal_api import JournalStore, Lease, LeaseLost, open_journal
from poolfleet.master.journal_staging import START_DEFER_S, JournalUnavailable
from poolfleet.master.settings import MasterSettings

if TYPE_CHECKING:
    from poolfleet.common.curve import MasterCurve
    from poolfleet.master.registry import WorkerRegistry
    from poolfleet.master.scheduler import Scheduler

log = structlog.get_logger("pmaster")

#: pmaster's exit status when it lost its lease on a shared journal and stepped down.
EXIT_LEASE_LOST = 3
MAX_READS_PER_TURN = 2000
#: Reading one socket stops after this long, so that a turn (and a STATUS answer) never waits
#: behind a flood of batches: what is left is read in the next turn, after a commit.
READ_BUDGET_S = 0.01
#: A commit nobody but the workers' ACKs waits for gathers the writes of the turns within this
#: long, or this many (see Master._may_wait).
COMMIT_GATHER_S = 0.02
COMMIT_GATHER_OPS = 5000
SWEEP_INTERVAL_S = 1.0
EXPIRE_BATCH = 5000
#: Freed memory is handed back once at least this many open tasks have drained to at most
#: TRIM_AT_TASKS.
TRIM_AFTER_TASKS = 50_000
TRIM_AT_TASKS = 1_000
#: Bytes of result pushes a client may leave unread (by its own count, the "received" of its
#: HEARTBEAT) before the master stops pushing to it: a client that does not read its socket
#: costs the master at most this much (and ZeroMQ's queue), not every result it waits for.
PUSH_BUDGET_BYTES = 16 * 1024 * 1024
#: A client's push accounting is forgotten after this long without a push or a report.
PUSH_STATE_IDLE_S = 600.0
#: While the journal cannot be written, its commit is tried again this often.
JOURNAL_RETRY_S = 0.5


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where there is one."""
    import ctypes

    try:
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


#: Inspection requests answered at once: the core's handler and the reply's kind.
_QUERIES: dict[MsgKind, tuple[Callable[[MasterCore, dict[str, Any]], dict[str, Any]], MsgKind]] = {
    MsgKind.TASKS: (lambda core, body: core.tasks_list(body["req"], body), MsgKind.TASKS_REPLY),
    MsgKind.TASK_SHOW: (lambda core, body: core.task_show(body["req"], body["id"]), MsgKind.TASK_SHOW_REPLY),
    MsgKind.RESOLVE: (lambda core, body: core.resolve(body["req"], body["prefixes"]), MsgKind.RESOLVE_REPLY),
    MsgKind.TASK_LOGS: (
        lambda core, body: core.task_logs(body["req"], body["id"], body.get("after")),
        MsgKind.TASK_LOGS_REPLY,
    ),
    MsgKind.WORKER_CONTROL: (
        lambda core, body: core.worker_control(body["req"], body["worker"], body["action"]),
        MsgKind.WORKER_CONTROL_REPLY,
    ),
}
#: Control requests: the core answers them itself (after the commit that records them), given
#: (core, client, body, monotonic now, wall now).
_CONTROLS: dict[MsgKind, Callable[[MasterCore, bytes, dict[str, Any], float, float], None]] = {
    MsgKind.TASK_RETRY: lambda core, c, body, now, wall: core.task_retry(
        c, body["req"], body["tasks"], now, wall
    ),
    MsgKind.QUEUE_CONTROL: lambda core, c, body, now, wall: core.queue_control(
        c, body["req"], body["queue"], body["action"]
    ),
    MsgKind.SCHEDULE_CONTROL: lambda core, c, body, now, wall: core.schedule_control(
        c, body["req"], body, wall
    ),
    MsgKind.LIMIT_CONTROL: lambda core, c, body, now, wall: core.limit_control(c, body["req"], body, now),
    MsgKind.QUEUE_PURGE: lambda core, c, body, now, wall: core.queue_purge(c, body["req"], body, now, wall),
}
#: Requests that steer the fleet: logged with the client's key name; with CurveZMQ keys on,
#: only for client keys in the admin keys directory (--curve-admin-dir). Listing schedules or
#: limits only looks.
CONTROL_KINDS = frozenset(
    (
        MsgKind.TASK_RETRY,
        MsgKind.QUEUE_CONTROL,
        MsgKind.QUEUE_PURGE,
        MsgKind.WORKER_CONTROL,
        MsgKind.SCHEDULE_CONTROL,
        MsgKind.LIMIT_CONTROL,
    )
)


def _has_input(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message waits to be read on ``sock``."""
    return bool(cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN)


def _steers(kind: MsgKind, body: dict[str, Any]) -> bool:
    if kind in (MsgKind.SCHEDULE_CONTROL, MsgKind.LIMIT_CONTROL):
        return body.get("action") != "list"
    return kind in CONTROL_KINDS


class Master:
    """The pmaster daemon. ``run()`` blocks until stopped by a signal.

    ``clock`` is monotonic (liveness, backoff, pacing); ``wall`` gives the timestamps and
    result TTLs kept in the journal.
    """

    def __init__(
        self,
        settings: MasterSettings,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        watchdog_s: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall = wall
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s
        self.master_id = uuid.uuid4().hex
        self.fd_limits = raise_fd_limit()  # before any socket or file is opened
        self.data_dir = DataDir(settings.data_dir)
        self.data_dir.lock()  # before anything touches the journal: one master per dir
        try:
            self.clean_start = self.data_dir.was_clean()
            self.journal: JournalStore = open_journal(settings, self.master_id)
            self.journal.start_defer_s = START_DEFER_S
            self.journal.clock = clock
            #: the lease on a shared (PostgreSQL) journal; None: SQLite, one master per data dir
            self.lease: Lease | None = cast("Lease", self.journal) if self.journal.has_lease else None
            self._renew_at = 0.0
            self._last_commit = -math.inf  # clock time of the last commit (see _may_wait)
            #: (monotonic) until when this master may act on its last renewal of the lease
            self._lease_until = float("inf")
            self.core = MasterCore(settings, self.journal, self.master_id)
            from poolfleet.master.gate import ShippingGate

            self.gate = ShippingGate(settings)
            #: the ZAP user id (the client's public key) of the client message being handled
            self._peer_key: str | None = None
            self.started_at = clock()
            self.signals = SignalFlag()
            # Two I/O threads: the client socket gets one of its own (see _bind), so a STATUS or
            # a SUBMIT never queues behind the traffic of a hundred busy workers. With one shared
            # thread, STATUS probes waited up to 160 ms in ZeroMQ while 100 workers drained a
            # queue, though no loop turn took more than 70 ms (docs/BENCHMARKS.md, profiling).
            self.ctx = zmq.Context(io_threads=2)
            self.curve: MasterCurve | None = None
            if settings.has_curve:  # the ZAP handler must run before the sockets bind
                from poolfleet.common.curve import MasterCurve

                self.curve = MasterCurve(self.ctx, *settings.curve_paths, admins_dir=settings.curve_admin_dir)
            self.caps: list[ConnectionCap] = []
            self.client_sock = self._bind(settings.clients, Role.CLIENT)
            self.worker_sock = self._bind(settings.workers, Role.WORKER)
        except BaseException:
            journal = getattr(self, "journal", None)
            if journal is not None:
                journal.close()
            ctx = getattr(self, "ctx", None)
            if ctx is not None:
                ctx.destroy(linger=0)
            self.data_dir.release(remove_created=True)  # a master that failed leaves no new dir
            raise
        self.metrics_server: Any = None
        self.dashboard: Any = None
        self._task_peak = 0
        #: why the journal cannot be written (None: it can), since when, and what was refused
        self._journal_down: str | None = None
        self._down_since = 0.0
        self._down_refused = 0
        self._retry_at = 0.0
        self._sweep_failing = False
        #: per client: [bytes pushed, bytes it reports read, when last touched], and the
        #: clients whose pushes are paused (they fetch what they missed, see _client_heartbeat)
        self._push_acct: dict[bytes, list[float]] = {}
        self._paused: set[bytes] = set()

    # the core's parts, for metrics and tools
    @property
    def registry(self) -> WorkerRegistry:
        return self.core.registry

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def tasks(self) -> dict[bytes, Any]:
        return self.core.tasks

    @property
    def submitted_total(self) -> int:
        return self.core.submitted_total

    # -- setup ---------------------------------------------------------------
    def _bind(self, url: str, role: Role) -> zmq.Socket[bytes]:
        from poolfleet.common.net import parse_endpoint

        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        tune(sock, self.settings.max_message_bytes, url)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)  # idle TCP connections go (conncap.py)
        sock.setsockopt(zmq.AFFINITY, 0b01 if role is Role.WORKER else 0b10)  # I/O thread 0 or 1
        cap = ConnectionCap(
            per_socket_cap(self.fd_limits[0]), "workers" if role is Role.WORKER else "clients"
        )
        if self.curve is not None:  # one monitor per socket: the CurveZMQ watcher feeds the cap
            self.curve.secure(sock, role, cap.on_event, CAP_EVENTS)
        else:
            cap.watch(sock)
        self.caps.append(cap)
        sock.bind(parse_endpoint(url).bind_url())
        cap.endpoint = last_endpoint(sock)
        return sock

    @property
    def client_endpoint(self) -> str:
        return last_endpoint(self.client_sock)

    @property
    def worker_endpoint(self) -> str:
        return last_endpoint(self.worker_sock)

    def recover(self) -> None:
        """Load unfinished tasks from the journal after a (re)start."""
        pending, out = self.core.recover(
            self.journal.load_open(),
            self.journal.load_task_defs(),
            self.journal.final_counts(),
            self.clock(),
            hold_pending=not self.clean_start,
            wall=self.wall(),
            deps=self.journal.load_deps(),
        )
        self.core.scheduler.paused.update(self.journal.paused_queues())
        self.core.recover_schedules(self.journal.load_schedules(), self.journal.load_limits(), self.wall())
        self.data_dir.started()
        self._report_invalid()
        log.info(
            "journal_recovered",
            pending=pending,
            at_workers=out,
            task_defs=len(self.core.task_defs),
            clean_stop=self.clean_start,
        )

    def _report_invalid(self) -> None:
        """Rows of the journal that are neither loaded nor results: one line, left alone."""
        unknown = getattr(self.journal, "unknown_states", None)  # the SQLite journal checks them
        bad = [(tid, f"unknown state {state!r}") for tid, state in (unknown() if unknown else [])]
        bad += self.core.invalid_rows
        if not bad:
            return
        reasons: dict[str, int] = {}
        for _, why in bad:
            reasons[why] = reasons.get(why, 0) + 1
        log.error(
            "journal_rows_invalid",
            count=len(bad),
            reasons=reasons,
            ids=[format_id(t) if isinstance(t, bytes) and len(t) == 16 else repr(t) for t, _ in bad[:20]],
            action="left in the journal, not run and not counted; see OPERATIONS.md, a damaged journal",
        )

    # -- main loop -------------------------------------------------------------
    def run(self) -> int:
        self.signals.install()
        try:
            if self.lease is not None and not self._take_lease():
                return self._stop_standby()
            self.recover()
            if self.lease is not None:
                self._renew(self.clock())  # recovery may have been long: still ours?
            return self._serve()
        except LeaseLost as exc:
            return self._step_down(str(exc))

    def _take_lease(self) -> bool:
        """Standby until this master holds the lease (False: stopped by a signal first)."""
        from poolfleet.master.standby import Standby

        assert self.lease is not None
        began = self.clock()
        if not Standby(self, self.lease).wait():
            return False
        self._lease_until = began + self.settings.lease_s
        self._renew(self.clock())
        # a master that released its lease stopped cleanly: nothing to hold for its workers
        self.clean_start = self.lease.previous_released()
        log.info(
            "lease_acquired",
            token=self.lease.token,
            previous_released=self.clean_start,
            lease_s=self.settings.lease_s,
            master_id=self.master_id,
        )
        return True

    def _renew(self, now: float) -> None:
        """Renew the lease (LeaseLost if the database says it is another master's now)."""
        assert self.lease is not None
        self.lease.renew()
        self._lease_until = now + self.settings.lease_s
        self._renew_at = now + self.settings.renew_interval_s

    def _check_lease(self) -> None:
        """Before sending: a master whose last renewal is a lease old may no longer be the
        active one (a pause, a database that does not answer); it sends nothing more."""
        if self.clock() >= self._lease_until:
            raise LeaseLost(f"the lease was not renewed within {self.settings.lease_s} s")

    def _serve(self) -> int:
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        poller.register(self.signals.fd, zmq.POLLIN)
        log_fd_limit(*self.fd_limits)
        caps = [c for c in self.caps if c.monitor is not None]
        for c in caps:
            poller.register(c.monitor, zmq.POLLIN)
        if self.settings.metrics:
            from poolfleet.master.metrics import start_metrics_server

            self.metrics_server = start_metrics_server(self, self.settings.metrics)
            self.core.on_finished = self.metrics_server.observe
        if self.settings.dashboard:
            from poolfleet.master.dashboard.server import start_dashboard

            self.dashboard = start_dashboard(self.settings, self.client_endpoint)
        log.info(
            "master_started",
            connection_cap=self.caps[0].cap,
            clients_endpoint=self.client_endpoint,
            workers_endpoint=self.worker_endpoint,
            data_dir=str(self.settings.data_dir),
            master_id=self.master_id,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        self.notifier.ready(f"serving clients on {self.client_endpoint}")
        last_sweep = last_watchdog = 0.0
        try:
            while True:
                timeout_ms = self._poll_timeout_ms()
                events = dict(poller.poll(timeout_ms))
                now = self.clock()
                if self.signals.fd in events:
                    self.signals.drain()
                    if self.signals.count:
                        break
                for c in caps:
                    if c.monitor in events:
                        c.read()
                if self.lease is not None and now >= self._renew_at:
                    self._renew(now)  # first: a master resumed after a pause learns it lost the lease
                # clients first: their requests (STATUS above all) wait at most one turn's work
                if self.client_sock in events:
                    self._read(self.client_sock, self._on_client_frames)
                behind = self.worker_sock in events and self._read(self.worker_sock, self._on_worker_frames)
                wall = self.wall()
                self.core.tick(now, wall, behind)
                self._send_all(self.core.take_out())
                self._push_all(self.core.take_pushes(before_commit=True))
                if now - last_sweep >= SWEEP_INTERVAL_S:
                    last_sweep = now
                    self._sweep(wall)
                    self._forget_idle_pushes(now)
                    self._trim()
                    # Long-lived objects (a million pending tasks) leave the cyclic collector's
                    # sight: a full collection over them stalled the loop for 0.2-0.7 s. Young
                    # objects are still collected; tasks are freed by reference counting.
                    gc.freeze()
                self._commit(now, wall)
                if self.metrics_server is not None:
                    self.metrics_server.publish(now)
                if self.watchdog_s and now - last_watchdog >= self.watchdog_s:
                    last_watchdog = now
                    self.notifier.watchdog()
        finally:
            self._close_caps()
        return self.shutdown()

    def _close_caps(self) -> None:
        for c in self.caps:
            c.close()

    def _poll_timeout_ms(self) -> int:
        now = self.clock()
        wait = self.core.next_timer_s(now)
        if self.lease is not None:
            wait = min(wait, self._renew_at - now)
        if self.watchdog_s:
            wait = min(wait, self.watchdog_s)
        if self._journal_down is not None:
            wait = min(wait, self._retry_at - now)
        if self.journal.staged:  # a commit that waits (see _may_wait)
            wait = min(wait, max(0.0, self._last_commit + COMMIT_GATHER_S - now))  # no commit yet: -inf
        start_due = self.journal.next_start_due()
        if start_due is not None:
            wait = min(wait, start_due - now)
        return max(1, int(wait * 1000))

    # -- the journal commit ----------------------------------------------------
    def _commit(self, now: float, wall: float) -> None:
        """Commit what the turn staged, then send what waited for it. A commit that fails (a
        full disk) leaves the master running: see MasterCore.commit_failed."""
        if self._may_wait(now):
            return
        self._last_commit = now
        if self._journal_down is not None:
            if now < self._retry_at and not self.core.fresh:
                return  # nothing new to try, and not yet time to try again
            self._retry_at = now + JOURNAL_RETRY_S
            if not self.journal.staged:
                self.journal.stage_mark(wall)  # a write that tells whether the journal is back
        try:
            self.journal.commit()
        except JournalUnavailable as exc:
            self._journal_failed(str(exc), now)
            return
        if self._journal_down is not None:
            log.warning(
                "journal_available",
                down_s=round(now - self._down_since, 3),
                refused_submits=self._down_refused,
            )
            self._journal_down = None
        self._flush()

    def _may_wait(self, now: float) -> bool:
        """Whether this turn's commit may wait for the next turns (COMMIT_GATHER_S): when more
        messages wait to be read and no client waits for it, only workers for the ACK of their
        results (the results are pushed already, and each worker keeps them until that ACK).
        Results finish at scattered places of the journal (a thousand workers each finish their
        own run of tasks): one commit of several turns writes each of those pages once, instead
        of once per turn."""
        core = self.core
        if not self.journal.staged or core.after_commit or core.fresh or self._journal_down is not None:
            return False
        if not (_has_input(self.worker_sock) or _has_input(self.client_sock)):
            return False  # nothing more to read: the loop would idle, so the commit costs no one
        return now - self._last_commit < COMMIT_GATHER_S and self.journal.staged < COMMIT_GATHER_OPS

    def _journal_failed(self, reason: str, now: float) -> None:
        before = len(self.core.out)
        withdrawn = self.core.commit_failed(reason)
        self.journal.unstage_inserts(withdrawn)
        refused = sum(1 for s in self.core.out[before:] if s.kind is MsgKind.ERROR)
        if self._journal_down is None:  # once per episode; journal_available ends it
            self._down_since = now
            self._down_refused = 0
            self._retry_at = now + JOURNAL_RETRY_S
            log.error(
                "journal_unavailable",
                reason=reason,
                staged=self.journal.staged,
                withdrawn=len(withdrawn),
                action="submits refused, results held until a commit succeeds",
            )
        self._journal_down = reason
        self._down_refused += refused
        self._send_all(self.core.take_out())

    def shutdown(self) -> int:
        """Stop accepting, commit what is staged, close sockets; exit status 0."""
        self.notifier.stopping()
        log.info("master_stopping", signal=self.signals.last, open_tasks=len(self.core.tasks))
        self._stop_dashboard()
        clean = True
        try:
            self.journal.commit(final=True)  # the deferred starts too: a clean stop holds nothing back
            self._flush()
        except LeaseLost as exc:
            return self._step_down(str(exc))
        except JournalUnavailable as exc:
            # the workers keep the results not acknowledged; the next start holds for them
            log.error("journal_unavailable", reason=str(exc), staged=self.journal.staged, stopping=True)
            clean = False
        for w in list(self.core.registry.workers.values()):
            self._send(
                self.worker_sock,
                w.identity,
                MsgKind.ERROR,
                {"code": ErrorCode.SHUTTING_DOWN.value, "message": "master is shutting down"},
            )
        self._close_sockets()
        try:
            self.journal.checkpoint()
        except sqlite3.Error as exc:
            log.warning("journal_checkpoint_failed", reason=str(exc))
        if self.lease is not None:
            self.lease.release()  # a standby takes over at once
        self.journal.close()
        if clean:
            try:
                self.data_dir.stopped_cleanly()
            except OSError as exc:
                log.warning("clean_stop_not_recorded", reason=str(exc))
        self.data_dir.release()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.signals.close()
        log.info("master_stopped")
        return 0

    def _stop_standby(self) -> int:
        """A standby told to stop: it holds nothing, writes nothing; exit status 0."""
        self.notifier.stopping()
        log.info("master_stopping", signal=self.signals.last, standby=True)
        self._close()
        log.info("master_stopped")
        return 0

    def _step_down(self, reason: str) -> int:
        """The lease is lost: write nothing, send nothing more, and exit with EXIT_LEASE_LOST
        (a supervisor restarts it, as a standby)."""
        token = self.lease.token if self.lease is not None else None
        log.error("lease_lost", reason=reason, token=token, master_id=self.master_id, stepping_down=True)
        self.notifier.stopping()
        self._close()
        log.info("master_stopped", exit_status=EXIT_LEASE_LOST)
        return EXIT_LEASE_LOST

    def _stop_dashboard(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None

    def _close_sockets(self) -> None:
        """CurveZMQ's authenticator, the connection caps, both sockets and the context."""
        if self.curve is not None:
            self.curve.stop()
        self._close_caps()
        self.client_sock.close(linger=0)
        self.worker_sock.close(linger=0)
        self.ctx.term()

    def _close(self) -> None:
        self._stop_dashboard()
        self._close_sockets()
        self.journal.close()
        self.data_dir.release()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.signals.close()

    def _read(self, sock: zmq.Socket[bytes], handler: Callable[[bytes, list[bytes]], None]) -> bool:
        """Read and handle what waits on ``sock``, for at most READ_BUDGET_S (and
        MAX_READS_PER_TURN messages); True if it stopped with more waiting."""
        deadline = time.monotonic() + READ_BUDGET_S
        more = True
        keyed = self.curve is not None and sock is self.client_sock
        for _ in range(MAX_READS_PER_TURN):
            try:
                if keyed and self.curve is not None:  # whose key: control requests, shipped code
                    frames = self.curve.recv_keyed(sock)
                    self._peer_key = self.curve.peer_key(frames[0]) if frames else None
                else:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                more = False
                break
            if len(frames) < 2:
                log.warning("frame_dropped", reason="no identity frame")
                continue
            handler(frames[0], frames[1:])
            if time.monotonic() > deadline:
                more = _has_input(sock)
                break
        self._send_all(self.core.take_out())
        return more

    # -- sending -------------------------------------------------------------
    def _send(self, sock: zmq.Socket[bytes], ident: bytes, kind: MsgKind, body: dict[str, Any]) -> bool:
        try:
            send_frames(sock, [ident, *messages.encode(kind, body)], zmq.NOBLOCK)
        except zmq.Again:
            # the worker's reconciliation (its holding list) or the client's own retry finds it
            log.warning("message_dropped", reason="peer queue full", kind=kind.name)
            return False
        except zmq.ZMQError as exc:
            log.warning("message_dropped", reason=str(exc), kind=kind.name)
            return False
        return True

    def _send_all(self, sends: list[Send]) -> None:
        if sends and self.lease is not None:
            self._check_lease()
        for s in sends:
            sock = self.worker_sock if s.to is Role.WORKER else self.client_sock
            if s.kind is MsgKind.DISPATCH:
                for part in chunks(s.body["tasks"], 5000, "payload"):
                    self._send(sock, s.ident, s.kind, {"tasks": part})
            else:
                self._send(sock, s.ident, s.kind, s.body)

    def _flush(self) -> None:
        if self.lease is not None:
            self._check_lease()
        sends, pushes = self.core.committed()
        self._send_all(sends)
        self._push_all(pushes)

    def _push_all(self, pushes: dict[bytes, list[dict[str, Any]]]) -> None:
        if pushes and self.lease is not None:
            self._check_lease()  # a master paused past its lease pushes nothing
        for client, entries in pushes.items():
            if client not in self._paused:
                self._push(client, entries)

    def _push(self, client: bytes, entries: list[dict[str, Any]]) -> None:
        """Push results to a client, until it has PUSH_BUDGET_BYTES unread: then no more until it
        has read them; it fetches what it missed (RESULT_GET) when told so."""
        acct = self._push_acct.setdefault(client, [0, 0, 0.0])
        acct[2] = self.clock()
        for batch in chunks(entries, 5000, "value"):
            unread = acct[0] - acct[1]
            if unread > PUSH_BUDGET_BYTES:
                self._paused.add(client)
                log.warning(
                    "pushes_paused",
                    client=client.hex(),
                    unread_bytes=int(unread),
                    budget_bytes=PUSH_BUDGET_BYTES,
                    action="the client fetches its results once it reads again",
                )
                return
            frames = messages.encode(MsgKind.RESULTS, {"results": batch})
            try:
                send_frames(self.client_sock, [client, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("message_dropped", reason=str(exc), kind="RESULTS")
                return
            acct[0] += len(frames[-1])

    def _client_heartbeat(self, ident: bytes, body: dict[str, Any]) -> None:
        """Answer; note how many pushed bytes the client has read, and resume a paused one that
        caught up, telling it (pushes_paused) to fetch the results it was not pushed."""
        reply: dict[str, Any] = {"master_id": self.master_id}
        got = body.get("received")
        acct = self._push_acct.get(ident)
        if type(got) is int and acct is not None:
            acct[0] = max(acct[0], got)  # a reconnect: the client counts on, this is a new peer
            acct[1] = got
            acct[2] = self.clock()
            if ident in self._paused and acct[0] - got <= PUSH_BUDGET_BYTES // 2:
                self._paused.discard(ident)
                reply["pushes_paused"] = True
                log.info("pushes_resumed", client=ident.hex())
        self._send(self.client_sock, ident, MsgKind.HEARTBEAT, reply)

    def _forget_idle_pushes(self, now: float) -> None:
        for ident in [i for i, a in self._push_acct.items() if now - a[2] > PUSH_STATE_IDLE_S]:
            del self._push_acct[ident]
            self._paused.discard(ident)

    # -- frames ----------------------------------------------------------------
    def _decode(
        self, sock: zmq.Socket[bytes], ident: bytes, frames: list[bytes], peer: str
    ) -> tuple[MsgKind, dict[str, Any]] | None:
        try:
            return messages.decode(frames)
        except ProtocolError as exc:
            log.warning("frame_rejected", peer=peer, code=exc.code, reason=exc.message)
            req = codec.peek_req(frames[2]) if len(frames) == 3 and frames[0] == MAGIC else None
            self.core.error(
                Role.CLIENT if sock is self.client_sock else Role.WORKER, ident, exc.code, exc.message, req
            )
            return None

    def _on_client_frames(self, ident: bytes, frames: list[bytes]) -> None:
        decoded = self._decode(self.client_sock, ident, frames, "client")
        if decoded is None:
            return
        kind, body = decoded
        core = self.core
        try:
            if _steers(kind, body):
                self._control_allowed(ident, kind, body)
            if kind is MsgKind.SUBMIT or kind is MsgKind.RESULT_GET:
                self._submit_or_get(ident, kind, body)
            elif kind is MsgKind.CODE_PUT:
                core.code_put(ident, body, self.gate.trust(self._peer_key), self.wall())
            elif kind is MsgKind.STATUS:
                status = core.status(body["req"], self.clock() - self.started_at)
                self._send(self.client_sock, ident, MsgKind.STATUS_REPLY, status)
            elif kind is MsgKind.WORKERS:
                reply = core.workers_reply(body["req"], self.clock())
                self._send(self.client_sock, ident, MsgKind.WORKERS_REPLY, reply)
            elif kind is MsgKind.CANCEL:
                core.cancel(
                    ident,
                    body["req"],
                    body["ids"],
                    self.clock(),
                    self.wall(),
                    if_not_started=bool(body.get("if_not_started")),
                )
            elif kind in _QUERIES:
                self._send(self.client_sock, ident, _QUERIES[kind][1], _QUERIES[kind][0](core, body))
            elif kind in _CONTROLS:
                _CONTROLS[kind](core, ident, body, self.clock(), self.wall())
            elif kind is MsgKind.HEARTBEAT:
                self._client_heartbeat(ident, body)
            elif kind is MsgKind.HELLO:
                self._client_hello(ident, body)
            else:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind.name} is not a client request")
        except ProtocolError as exc:
            log.warning("request_rejected", peer="client", kind=kind.name, code=exc.code, reason=exc.message)
            core.error(Role.CLIENT, ident, exc.code, exc.message, body.get("req"))
        except sqlite3.Error as exc:  # a read of a damaged journal: answered, never a crash
            reason = f"the journal at {self.settings.data_dir} cannot be read: {exc}"
            log.error("journal_read_failed", kind=kind.name, reason=reason)
            core.error(Role.CLIENT, ident, ErrorCode.JOURNAL_UNAVAILABLE, reason, body.get("req"))

    def _submit_or_get(self, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        """SUBMIT or RESULT_GET; with ``wait`` and ``progress``, PROGRESS pushes too."""
        core, wait = self.core, bool(body.get("wait"))
        if kind is MsgKind.SUBMIT:
            trust = self.gate.trust(self._peer_key)
            core.submit(ident, body["req"], body["tasks"], wait, self.clock(), self.wall(), trust)
            ids = [t.get("id") for t in body["tasks"] if isinstance(t, dict)] if body.get("progress") else []
        else:
            core.result_get(ident, body["req"], body["ids"], wait)
            ids = body["ids"] if body.get("progress") else []
        if wait and ids:
            core.want_progress(ident, ids)

    def _control_allowed(self, ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        """Log a control request with the client's key name; refuse it from a non-admin key."""
        key = self.curve.key_name(ident) if self.curve is not None else None
        target: dict[str, Any] = {
            k: body[k] for k in ("queue", "action", "worker", "states", "dry_run") if k in body
        }
        if kind is MsgKind.TASK_RETRY:
            target["tasks"] = len(body["tasks"])
        if self.curve is not None and not self.curve.is_admin(ident):
            log.warning("control_refused", kind=kind.name, key=key, **target)
            where = (
                "the master's admin keys directory"
                if self.curve.has_admins
                else "an admin keys directory, and this master has none (pmaster --curve-admin-dir)"
            )
            raise ProtocolError(
                ErrorCode.NOT_ADMIN, f"{kind.name} steers the fleet: it needs a client key from {where}"
            )
        log.info("control_action", kind=kind.name, key=key, **target)

    def _client_hello(self, ident: bytes, body: dict[str, Any]) -> None:
        from poolfleet.common.protocol import PROTOCOL_VERSION

        if body["version"] != PROTOCOL_VERSION:
            msg = f"client speaks protocol {body['version']}, master speaks {PROTOCOL_VERSION}"
            log.warning("client_refused", reason=msg)
            self.core.error(Role.CLIENT, ident, ErrorCode.BAD_VERSION, msg)
            return
        self._send(
            self.client_sock,
            ident,
            MsgKind.WELCOME,
            {"version": PROTOCOL_VERSION, "master_id": self.master_id},
        )

    def _on_worker_frames(self, ident: bytes, frames: list[bytes]) -> None:
        decoded = self._decode(self.worker_sock, ident, frames, "worker")
        if decoded is None:
            return
        kind, body = decoded
        try:
            if kind is MsgKind.HELLO:
                self.core.worker_hello(ident, worker_api.decode_hello(ident, body), self.clock(), self.wall())
            else:
                self.core.worker_message(ident, kind, body, self.clock(), self.wall())
        except ProtocolError as exc:
            log.warning("request_rejected", peer="worker", kind=kind.name, code=exc.code, reason=exc.message)
            self.core.error(Role.WORKER, ident, exc.code, exc.message)

    # -- periodic --------------------------------------------------------------
    def _trim(self) -> None:
        """Give freed memory back to the system once a big backlog has drained: the allocator
        keeps freed pages otherwise, and the RSS stays at its peak. Only then: trimming a big
        heap takes a while (up to half a second, seen while draining a million tasks)."""
        n = len(self.core.tasks)
        self._task_peak = max(self._task_peak, n)
        if self._task_peak >= TRIM_AFTER_TASKS and n <= TRIM_AT_TASKS:
            self._task_peak = n
            trim = _malloc_trim()
            if trim is not None:
                trim(0)

    def _sweep(self, wall: float) -> None:
        """Delete expired results, in batches, for at most ~50 ms per call.

        Batches repeat while they come back full, so expiry keeps up with any
        finishing rate and the journal stays bounded by rate x TTL.
        """
        try:
            total = self._expire(wall)
        except JournalUnavailable as exc:
            if not self._sweep_failing:  # once, until a sweep works again
                log.error("results_expiry_failed", reason=str(exc), action="tried again each second")
            self._sweep_failing = True
            return
        if self._sweep_failing:
            log.warning("results_expiry_resumed")
            self._sweep_failing = False
        if total:
            log.info("results_expired", count=total)

    def _expire(self, wall: float) -> int:
        deadline = time.monotonic() + 0.05
        total = 0
        counts = self.core.final_counts
        while True:
            removed = self.journal.expire(wall, EXPIRE_BATCH)
            for state, n in removed.items():
                counts[state] = max(0, counts.get(state, 0) - n)
            count = sum(removed.values())
            total += count
            if count < EXPIRE_BATCH or time.monotonic() > deadline:
                return total
