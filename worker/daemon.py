"""The pworker main loop: one DEALER socket to the master, owned by the main thread.

It registers with HELLO, runs what DISPATCH brings through the executor,
sends results in batches, heartbeats when idle, reconnects with backoff when
the master falls silent, and drains on SIGTERM.
"""

from __future__ import annotations

import gc
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from poolfleet.common import messages
from poolfleet.common.batching import chunks
from poolfleet.common.errors import ConfigError, ProtocolError
from poolfleet.common.lifecycle import Notifier, SignalFlag
from poolfleet.common.net import parse_endpoint, send_frames, tune
from poolfleet.common.protocol import PROTOCOL_VERSION, ErrorCode, Kind, MsgKind, Role
from poolfleet.worker.capture import DEFAULT_MAX_OUTPUT
from poolfleet.worker.executor import Executor, ExecutorSettings, Job, Report
from poolfleet.worker.registry import TaskRegistry

if TYPE_CHECKING:
    from poolfleet.worker.fetcher import CodeFetcher

log = structlog.get_logger("pworker")

RESULT_BATCH = 2000
#: Tasks that have run this long are reported started (RUNNING on the master); shorter ones
#: go from DISPATCHED to their result without a notice of their own.
STARTED_AFTER_S = 0.05
#: A result not acknowledged this many heartbeat intervals after it was sent is sent again.
RESEND_AFTER_INTERVALS = 3.0


@dataclass(frozen=True)
class WorkerSettings:
    """Every pworker setting; environment names are POOLFLEET_WORKER_<FIELD>."""

    master: str = "tcp://127.0.0.1:5556"
    tasks: tuple[str, ...] = ()
    cpu: int = 0
    io: int = 8
    cmd: int = 2
    queue: tuple[str, ...] = ("default",)
    allow_cmd: tuple[str, ...] = ()
    allow_cmd_env: tuple[str, ...] = ()
    worker_id: str | None = None
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    drain_timeout_s: float = 30.0
    max_tasks_per_child: int | None = None
    max_buffered_results: int = 100_000
    max_task_output: int = DEFAULT_MAX_OUTPUT
    reconnect_max_s: float = 5.0
    curve_server_key: str | None = None
    curve_secret_key: str | None = None
    #: run functions shipped (pickled) by trusted clients (docs/SECURITY.md); off by default
    run_shipped_code: bool = False
    #: shipped functions kept on this worker, in bytes
    code_cache_bytes: int = 64 << 20
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.cpu < 0 or self.io < 0 or self.cmd < 0:
            raise ConfigError("slot counts must not be negative")
        if self.heartbeat_interval_s <= 0 or self.liveness < 1:
            raise ConfigError("heartbeat_interval_s must be positive and liveness at least 1")
        if self.max_tasks_per_child is not None and self.max_tasks_per_child < 1:
            raise ConfigError("max_tasks_per_child must be at least 1")
        if not self.queue:
            raise ConfigError("a worker needs at least one queue")
        if self.max_task_output < 0:
            raise ConfigError("max_task_output must not be negative")
        for name in self.allow_cmd_env:
            if not name or "=" in name or "\0" in name:
                raise ConfigError(f"allow_cmd_env: {name!r} is not an environment variable name")
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)
        if self.run_shipped_code:
            self._check_shipping()

    def _check_shipping(self) -> None:
        """Shipped code needs cloudpickle, and without keys a master on this host."""
        from poolfleet.common.shipping import cloudpickle_version

        if cloudpickle_version() is None:
            raise ConfigError("--run-shipped-code needs cloudpickle: pip install poolfleet[shipping]")
        keyed = bool(self.curve_server_key and self.curve_secret_key)
        remote = [e for e in self.endpoints if not parse_endpoint(e).is_loopback]
        if remote and not keyed:
            raise ConfigError(
                f"--run-shipped-code without CurveZMQ keys runs only for a master on loopback, not "
                f"{', '.join(remote)}: configure --curve-server-key and --curve-secret-key (and the "
                "master's --trusted-client-keys DIR), or run the master on this host"
            )

    @property
    def endpoints(self) -> list[str]:
        """``master`` may list several masters (an active one and its standbys), comma-separated."""
        return [e.strip() for e in self.master.split(",") if e.strip()] or [self.master]

    @property
    def cpu_slots(self) -> int:
        return self.cpu or (os.cpu_count() or 1)


class Worker:
    """The pworker daemon."""

    def __init__(
        self,
        settings: WorkerSettings,
        registry: TaskRegistry,
        notifier: Notifier | None = None,
        watchdog_s: float | None = None,
        cmd_env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s
        self.clock = clock
        self.host = socket.gethostname()
        self.worker_id = settings.worker_id or f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # One session per process: the master tells a reconnect of this process (same session)
        # from a restart or a second process under the same worker id (another session).
        self.session = uuid.uuid4().hex[:12]
        self.identity = self.worker_id.encode()[:230] + b"/" + self.session.encode()
        self.ctx = zmq.Context()
        self.sock: zmq.Socket[bytes] | None = None
        self.signals = SignalFlag()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.executor = Executor(
            ExecutorSettings(
                modules=registry.modules,
                cpu=settings.cpu_slots,
                io=settings.io,
                cmd=settings.cmd if settings.allow_cmd else 0,
                allow_cmd=frozenset(settings.allow_cmd),
                allow_cmd_env=frozenset(settings.allow_cmd_env),
                max_tasks_per_child=settings.max_tasks_per_child,
                log_level=settings.log_level,
                cmd_env=cmd_env or {},
                max_task_output=settings.max_task_output,
            ),
            registry,
            self._wake,
            clock,
        )
        self.fetcher: CodeFetcher | None = None
        if settings.run_shipped_code:
            from poolfleet.worker.fetcher import CodeFetcher

            self.fetcher = CodeFetcher(self.executor, settings.code_cache_bytes, self._send)
        self.welcomed = False
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        self.liveness = settings.liveness
        self.master_id: str | None = None
        self.last_heard = clock()
        self.last_sent = 0.0
        self.hello_sent_at = 0.0
        self.backoff_s = 0.0
        self.next_connect_at = 0.0
        self.last_heartbeat = 0.0
        # Results the master has not acknowledged, by task id: kept until its ACK (sent after the
        # commit that records them), sent again after a reconnect; ``buffer`` holds those not
        # sent on this connection yet.
        self.unacked: dict[bytes, dict[str, Any]] = {}
        self.sent_at: dict[bytes, float] = {}
        self.buffer: list[dict[str, Any]] = []
        self.draining_since: float | None = None
        self.stop_now = False  # the master said CONTROL stop
        self.poller = zmq.Poller()
        self.endpoints = settings.endpoints
        self._endpoint_at = 0

    # -- plumbing --------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full: a wake-up is pending anyway

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _send(self, kind: MsgKind, body: dict[str, Any]) -> bool:
        if self.sock is None:
            return False
        try:
            send_frames(self.sock, messages.encode(kind, body), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self.last_sent = self.clock()
        return True

    @property
    def endpoint(self) -> str:
        """The master this worker connects to now (one of ``--master``'s list)."""
        return self.endpoints[self._endpoint_at]

    @property
    def slots(self) -> dict[str, int]:
        return {k.value: n for k, n in self.executor.slots.items() if n > 0}

    # -- connection ------------------------------------------------------------
    def connect(self) -> None:
        """(Re)connect: close the old socket with linger 0, open a new one, say HELLO."""
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.DEALER)
        tune(sock, endpoint=self.endpoint)
        sock.setsockopt(zmq.ROUTING_ID, self.identity)
        if self.settings.curve_server_key and self.settings.curve_secret_key:
            from poolfleet.common.curve import apply_client_keys

            apply_client_keys(sock, self.settings.curve_server_key, self.settings.curve_secret_key)
        sock.connect(self.endpoint)
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)
        self.welcomed = False
        now = self.clock()
        self.last_heard = now
        self.hello_sent_at = now
        self._send_hello()

    def holding(self) -> list[dict[str, Any]]:
        """What this worker holds: jobs it has not finished, and results not acknowledged."""
        return self.executor.holding() + [
            {"id": r["id"], "attempt": r["attempt"]} for r in self.unacked.values()
        ]

    def _send_hello(self) -> None:
        holding = self.holding()
        self.hello_sent_at = self.clock()
        body: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "role": Role.WORKER.value,
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": os.getpid(),
            "queues": list(self.settings.queue),
            "slots": self.slots,
            "tasks": self.registry.to_wire(),
            "holding": holding,
            "session": self.session,
            "allow_cmd": list(self.settings.allow_cmd),
            "allow_cmd_env": list(self.settings.allow_cmd_env),
        }
        if self.fetcher is not None:  # offers shipped code: the master routes it only here
            from poolfleet.common.shipping import SHIPPED_ROUTE
            from poolfleet.worker.decorator import TaskOptions

            body["tasks"][SHIPPED_ROUTE] = TaskOptions(Kind.CPU).to_wire()
            body.update(self.fetcher.hello_fields())
        # Queued in the socket until the connection is up; never blocks.
        self._send(MsgKind.HELLO, body)

    def _lost_master(self, now: float, why: str) -> None:
        self.backoff_s = min(self.settings.reconnect_max_s, max(0.1, self.backoff_s * 2))
        self.next_connect_at = now + self.backoff_s
        self._log_lost(why)
        # several masters: try the next one (a standby that took over, or the active one)
        self._endpoint_at = (self._endpoint_at + 1) % len(self.endpoints)
        self.notifier.status(f"master lost ({why}); reconnecting to {self.endpoint}")
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
            self.sock = None
        self.welcomed = False

    def _log_lost(self, why: str) -> None:
        """``master_lost`` once registered; before that the master was never reached: say where."""
        retry_in_s = round(self.backoff_s, 3)
        if self.master_id is None:
            endpoint = self.endpoint
            log.warning(
                "master_unreachable",
                reason=f"cannot reach the master at {endpoint} ({why}); is pmaster running there?",
                endpoint=endpoint,
                retry_in_s=retry_in_s,
            )
        else:
            log.warning("master_lost", reason=why, retry_in_s=retry_in_s)

    # -- main loop -------------------------------------------------------------
    def run(self) -> int:
        try:
            self._loop()
        except BaseException:
            self.executor.close()  # never leave the pools' processes behind, whatever stopped us
            raise
        return self.shutdown()

    def _loop(self) -> None:
        self.signals.install()
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.poller.register(self.signals.fd, zmq.POLLIN)
        results_fd = self.executor.result_fd
        if results_fd is not None:
            self.poller.register(results_fd, zmq.POLLIN)
        self.connect()
        log.info(
            "worker_started",
            worker_id=self.worker_id,
            master=self.settings.master,
            slots=self.slots,
            queues=list(self.settings.queue),
            modules=list(self.registry.modules),
            pid=os.getpid(),
            runs_shipped_code=self.fetcher is not None,
        )
        # Ready once the pools are up: the worker reconnects by itself, so a master
        # that is down must not fail the service start. STATUS tells the connection.
        self.notifier.ready(f"connecting to {self.settings.master}")
        # What start-up made (the modules, the task modules, the pools: 30,000 objects and
        # more) lives as long as the worker: out of the cyclic collector's sight, a full
        # collection no longer stops the loop and the io threads for 8-16 ms in the middle
        # of a wave of tasks. What tasks and messages make later is collected as before.
        gc.freeze()
        last_check = last_watchdog = 0.0
        while True:
            interval = self.heartbeat_interval_s  # the master's, once it has welcomed us
            silence_limit = interval * self.liveness
            timeout = 0.05 if self.executor.jobs else interval / 2
            if self.watchdog_s:
                timeout = min(timeout, self.watchdog_s)
            events = dict(self.poller.poll(int(timeout * 1000)))
            now = self.clock()
            if self.signals.fd in events:
                self.signals.drain()
                if self._on_signal(now):
                    break
            if self.sock is not None and self.sock in events:
                self._read(now)
            if self._wake_r in events:
                self._drain_wake()
            if now - last_check >= 0.05:
                last_check = now
                self.executor.check()
                if self.welcomed and self.executor.jobs:
                    # tasks running for a while (not those that finish at once) are reported started
                    started = self.executor.newly_started(STARTED_AFTER_S)
                    if started:
                        self._send(MsgKind.STARTED, {"tasks": started})
                    updates = self.executor.take_updates()
                    if updates:
                        self._send(MsgKind.TASK_UPDATE, {"tasks": updates})
            self._ship(self.executor.collect())
            self._keepalive(now, interval, silence_limit)
            if self.watchdog_s and now - last_watchdog >= self.watchdog_s:
                last_watchdog = now
                self.notifier.watchdog()
            if self.stop_now or (self.draining_since is not None and self._drain_done(now)):
                break

    def _keepalive(self, now: float, interval: float, silence_limit: float) -> None:
        if self.sock is None:
            if now >= self.next_connect_at:
                self.connect()
        elif now - self.last_heard > silence_limit:
            self._lost_master(now, f"no message for {round(now - self.last_heard, 3)} s")
        elif self.welcomed and now - self.last_heartbeat >= interval:
            # what it holds, every interval: the master requeues what never arrived here
            self.last_heartbeat = now
            self._send(MsgKind.HEARTBEAT, {"held": self.executor.held_wire(), "holding": self.holding()})
            self._resend_unacked(now, interval)

    def _resend_unacked(self, now: float, interval: float) -> None:
        """Results sent on this connection long ago and still not acknowledged (their ACK, or
        they, lost on the way): sent again; the master acknowledges a result it has."""
        limit = now - RESEND_AFTER_INTERVALS * interval
        queued = {id(r) for r in self.buffer}
        again = [
            r for tid, r in self.unacked.items() if self.sent_at.get(tid, now) < limit and id(r) not in queued
        ]
        if again:
            log.info("results_resent", count=len(again))
            self.buffer.extend(again)
            self._flush_buffer()

    def _read(self, now: float) -> None:
        for _ in range(1000):
            if self.sock is None:
                return
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = now
            try:
                kind, body = messages.decode(frames)
            except ProtocolError as exc:
                log.warning("frame_rejected", peer="master", code=exc.code, reason=exc.message)
                continue
            self._handle(kind, body, now)

    def _handle(self, kind: MsgKind, body: dict[str, Any], now: float) -> None:
        if kind is MsgKind.WELCOME:
            self._welcome(body)
        elif kind is MsgKind.DISPATCH:
            self._dispatched(body, now)
        elif kind is MsgKind.CANCEL_TASKS:
            self._cancel_tasks(body)
        elif kind is MsgKind.ACK:
            self._acked(body)
        elif kind is MsgKind.RECALL:
            self._recalled(body)
        elif kind is MsgKind.CODE_BLOBS and self.fetcher is not None:
            self.fetcher.on_blobs(body)
        elif kind is MsgKind.ERROR:
            self._on_error(body, now)
        elif kind is MsgKind.HEARTBEAT:
            self._beat_at(body)  # a master with a bigger fleet asks for fewer heartbeats
        elif kind is MsgKind.CONTROL:
            self._control(body, now)
        else:
            log.warning("message_ignored", kind=kind.name)

    def _beat_at(self, body: dict[str, Any]) -> None:
        """Beat at the interval the master says (WELCOME, HEARTBEAT), if it says one."""
        hb = body.get("heartbeat_interval_s")
        # bounded: an infinite or absurd interval would overflow the poll timeout
        if isinstance(hb, int | float) and not isinstance(hb, bool) and 0.01 <= hb <= 3600:
            self.heartbeat_interval_s = float(hb)

    def _dispatched(self, body: dict[str, Any], now: float) -> None:
        if self.draining_since is not None:
            self._send(
                MsgKind.RETURN,
                {
                    "tasks": [
                        {"id": t.get("id"), "attempt": t.get("attempt")}
                        for t in body["tasks"]
                        if isinstance(t, dict)
                    ]
                },
            )
            return
        for entry in body["tasks"]:
            self._accept(entry, now)
        if self.fetcher is not None:
            self.fetcher.flush()

    def _cancel_tasks(self, body: dict[str, Any]) -> None:
        started: list[dict[str, Any]] = []
        for ref in body["tasks"]:
            try:  # a malformed entry (attempt NaN, "1", a list) is skipped, never fatal
                r = messages.check("CANCEL_TASKS.tasks[]", ref, messages.TASK_REF)
            except ProtocolError:
                continue
            soft = r.get("if_not_started") is True
            cancelled = self.executor.cancel(r["id"], r["attempt"], if_not_started=soft)
            if soft and not cancelled and self.executor.started(r["id"], r["attempt"]):
                started.append({"id": r["id"], "attempt": r["attempt"]})  # it goes on: say so now
        if started:
            self._send(MsgKind.STARTED, {"tasks": started})

    def _control(self, body: dict[str, Any], now: float) -> None:
        """The master asks, for an operator: drain (as a first SIGTERM) or stop (as a second)."""
        action = body.get("action")
        log.info("worker_control_received", action=action)
        if action == "drain":
            if self.draining_since is None:
                self._start_drain(now)
        elif action == "stop":
            log.info("worker_stopping_now", reason="stop asked by the master", running=self.executor.busy())
            self.stop_now = True
        else:
            log.warning("message_ignored", kind="CONTROL", reason=f"unknown action {action!r}")

    def _welcome(self, body: dict[str, Any]) -> None:
        self.welcomed = True
        self.last_heartbeat = self.clock()  # the first one an interval after registering
        self.backoff_s = 0.0
        self.master_id = body["master_id"]
        if body.get("version") != PROTOCOL_VERSION:
            log.error("master_refused", reason=f"master speaks protocol {body.get('version')}")
            raise SystemExit(
                f"pworker: error: master speaks protocol {body.get('version')}, worker speaks {PROTOCOL_VERSION}"
            )
        # heartbeat timing is the master's to set, so both sides agree on liveness
        self._beat_at(body)
        lv = body.get("liveness")
        if isinstance(lv, int) and not isinstance(lv, bool) and lv >= 1:
            self.liveness = lv
        log.info(
            "worker_registered",
            worker_id=self.worker_id,
            master_id=self.master_id,
            buffered_results=len(self.unacked),
        )
        self.notifier.status(f"registered with the master at {self.endpoint}")
        self.buffer = list(self.unacked.values())  # everything not acknowledged, again
        for job in self.executor.jobs.values():
            job.start_told = False  # a new master (or a new connection) hears it again
        self._flush_buffer()
        if self.fetcher is not None:
            self.fetcher.reconnected()
        if self.draining_since is not None:
            self._send(MsgKind.DRAINING, {})

    def _acked(self, body: dict[str, Any]) -> None:
        """The master recorded these results: forget them."""
        for ref in body["tasks"]:
            if not isinstance(ref, dict):
                continue
            kept = self.unacked.get(ref.get("id", b""))
            if kept is not None and kept["attempt"] == ref.get("attempt"):
                del self.unacked[kept["id"]]
                self.sent_at.pop(kept["id"], None)

    def _recalled(self, body: dict[str, Any]) -> None:
        """The master wants these for an idle worker: hand back those not started yet."""
        try:
            refs = messages.check_entries("RECALL.tasks", body["tasks"], messages.TASK_REF)
        except ProtocolError as exc:
            log.warning("recall_rejected", reason=exc.message)
            return
        back = self.executor.take_back([(r["id"], r["attempt"]) for r in refs])
        if back:
            self._send(MsgKind.RETURN, {"tasks": [{"id": j.id, "attempt": j.attempt} for j in back]})
            log.info("tasks_handed_back", count=len(back), asked=len(refs))

    def _accept(self, entry: Any, now: float) -> None:
        try:
            t = messages.check("DISPATCH.tasks[]", entry, messages.DISPATCH_TASK)
            kind = Kind(t["kind"])
        except (ProtocolError, ValueError) as exc:
            log.warning("dispatch_rejected", reason=str(exc))
            return
        job = Job(t["id"], t["attempt"], t["name"], kind, t["payload"], t.get("timeout_s"), now)
        if self.fetcher is None or not self.fetcher.take(job):
            self.executor.submit(job)

    def _on_error(self, body: dict[str, Any], now: float) -> None:
        code = body["code"]
        if code == ErrorCode.NOT_REGISTERED:
            # one HELLO per reconnect, however many replies say so (one per message in flight)
            if not self.welcomed and now - self.hello_sent_at < self.heartbeat_interval_s:
                return
            log.info("worker_reregistering", reason=body["message"])
            self.welcomed = False
            self._send_hello()
        elif code == ErrorCode.DUPLICATE_WORKER:
            log.error("worker_refused", reason=body["message"], worker_id=self.worker_id, pid=os.getpid())
            self._lost_master(now, "refused: another process has this worker id")
        elif code == ErrorCode.BAD_VERSION:
            log.error("master_refused", reason=body["message"])
            raise SystemExit(f"pworker: error: {body['message']}")
        elif code == ErrorCode.SHUTTING_DOWN:
            self._lost_master(now, "master is shutting down")
        elif code == ErrorCode.STANDBY:
            self._lost_master(now, f"master is a standby ({body['message']})")
        else:
            log.warning("master_error", code=code, reason=body["message"])

    def _ship(self, reports: list[Report]) -> None:
        if reports:
            for r in reports:
                wire = r.to_wire()
                self.unacked[r.id] = wire
                self.buffer.append(wire)
            over = len(self.unacked) - self.settings.max_buffered_results
            if over > 0:
                for tid in list(self.unacked)[:over]:
                    del self.unacked[tid]
                    self.sent_at.pop(tid, None)
                log.warning(
                    "results_discarded",
                    count=over,
                    reason="buffer full while the master is away; the master will rerun them",
                )
        if self.welcomed:
            self._flush_buffer()

    def _flush_buffer(self) -> None:
        if self.buffer and len(self.buffer) > len(self.unacked):
            self.buffer = [r for r in self.buffer if self.unacked.get(r["id"]) is r]  # drop discarded
        while self.buffer:
            batch = next(chunks(self.buffer[:RESULT_BATCH], RESULT_BATCH, "value"))
            if not self._send(MsgKind.TASK_RESULTS, {"results": batch, "held": self.executor.held_wire()}):
                return
            now = self.clock()
            for r in batch:
                self.sent_at[r["id"]] = now
            del self.buffer[: len(batch)]

    # -- stopping --------------------------------------------------------------
    def _on_signal(self, now: float) -> bool:
        """First SIGTERM drains; a second signal, or SIGINT, stops at once. True = stop now."""
        import signal as _signal

        if self.draining_since is None and self.signals.last == _signal.SIGTERM and self.signals.count == 1:
            self._start_drain(now)
            return False
        log.info("worker_stopping_now", signal=self.signals.last, running=self.executor.busy())
        return True

    def _start_drain(self, now: float) -> None:
        """Stop taking tasks, hand back what has not started, finish the rest (then BYE)."""
        self.draining_since = now
        self.notifier.stopping()
        returned = self.executor.take_waiting()
        self._send(MsgKind.DRAINING, {})
        if returned:
            self._send(MsgKind.RETURN, {"tasks": [{"id": j.id, "attempt": j.attempt} for j in returned]})
        log.info(
            "worker_draining",
            returned=len(returned),
            running=self.executor.busy(),
            drain_timeout_s=self.settings.drain_timeout_s,
        )

    def _drain_done(self, now: float) -> bool:
        if self.draining_since is None:
            return False
        if self.executor.busy() == 0 and not self.unacked:
            return True
        if now - self.draining_since > self.settings.drain_timeout_s:
            log.warning("drain_timed_out", still_running=self.executor.busy())
            return True
        return False

    def shutdown(self) -> int:
        self.notifier.stopping()
        self._ship(self.executor.collect())
        holding = self.executor.holding()
        self._send(MsgKind.BYE, {"holding": holding})
        # the drain is over (or cut short): what still runs is abandoned, and the master,
        # told by BYE, runs it again elsewhere
        self.executor.close()
        if self.sock is not None:
            # give the BYE a moment to leave; never block exit on an absent master
            self.sock.close(linger=200)
        self.ctx.term()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.signals.close()
        log.info("worker_stopped", worker_id=self.worker_id, abandoned=len(holding))
        return 0
