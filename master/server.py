"""The pmaster event loop: one thread, one poller, two ROUTER sockets.

Each loop turn reads what has arrived on both sockets, applies it to the
in-memory state, runs a dispatch round, commits the journal once (group
commit) and only then sends acknowledgements, results and dispatches.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from poolfleet.common import codec, messages
from poolfleet.common.batching import chunks
from poolfleet.common.errors import ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.lifecycle import Notifier, SignalFlag
from poolfleet.common.net import last_endpoint, send_frames, tune
from poolfleet.common.protocol import (
    MAGIC,
    ErrorCode,
    Kind,
    MsgKind,
    Role,
    TaskState,
)
from poolfleet.master.client_api import ClientApi
from poolfleet.master.journal import Journal
from poolfleet.master.registry import WorkerRegistry
from poolfleet.master.scheduler import Scheduler
from poolfleet.master.settings import MasterSettings
from poolfleet.master.state import (
    Finish,
    Requeue,
    RetryPolicy,
    TaskRecord,
    on_worker_lost,
    requeue,
    start,
)
from poolfleet.master.worker_api import WorkerApi

if TYPE_CHECKING:
    from poolfleet.common.curve import MasterCurve

log = structlog.get_logger("pmaster")

MAX_READS_PER_TURN = 2000
#: Reading one socket stops after this long, so that a turn (and a STATUS answer) never waits
#: behind a flood of batches: what is left is read in the next turn, after a commit.
READ_BUDGET_S = 0.01
SWEEP_INTERVAL_S = 1.0
EXPIRE_BATCH = 5000


class Master:
    """The pmaster daemon. ``run()`` blocks until stopped by a signal."""

    def __init__(
        self,
        settings: MasterSettings,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        watchdog_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s
        self.master_id = uuid.uuid4().hex
        self.rng = random.Random()
        self.policy = RetryPolicy(settings.backoff_base_s, settings.backoff_max_s, settings.max_lost)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(settings.data_dir / "journal.sqlite3", settings.journal_sync)
        self.registry = WorkerRegistry(settings.heartbeat_interval_s, settings.liveness)
        self.scheduler = Scheduler(settings.prefetch)
        self.tasks: dict[bytes, TaskRecord] = {}
        # final results staged but not yet committed: requests in the same turn still see them
        self.unflushed: dict[bytes, dict[str, Any]] = {}
        self.orphans: dict[bytes, TaskRecord] = {}
        self.task_defs: dict[str, tuple[Kind, float | None, int]] = {}
        self.final_counts: dict[str, int] = {}
        self.submitted_total = 0
        self.started_at = clock()
        self.recovery_deadline = 0.0
        self.signals = SignalFlag()
        self.stopping = False
        # messages to send after the next journal commit
        self._outbox: list[tuple[zmq.Socket[bytes], bytes, MsgKind, dict[str, Any]]] = []
        self._pushes: dict[bytes, list[dict[str, Any]]] = {}
        # Two I/O threads: the client socket gets one of its own (see _bind), so a STATUS or a
        # SUBMIT never queues behind the traffic of a hundred busy workers. With one shared
        # thread, STATUS probes waited up to 160 ms in ZeroMQ while 100 workers drained a
        # queue, though no loop turn took more than 70 ms (docs/BENCHMARKS.md, profiling).
        self.ctx = zmq.Context(io_threads=2)
        self.curve: MasterCurve | None = None
        if settings.has_curve:  # the ZAP handler must run before the sockets bind
            from poolfleet.common.curve import MasterCurve

            self.curve = MasterCurve(self.ctx, *settings.curve_paths)
        self.client_sock = self._bind(settings.clients, Role.CLIENT)
        self.worker_sock = self._bind(settings.workers, Role.WORKER)
        self.api = ClientApi(self)
        self.workers_api = WorkerApi(self)
        self.metrics_server: Any = None

    # -- setup ---------------------------------------------------------------
    def _bind(self, url: str, role: Role) -> zmq.Socket[bytes]:
        from poolfleet.common.net import parse_endpoint

        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        tune(sock, self.settings.max_message_bytes, url)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.AFFINITY, 0b01 if role is Role.WORKER else 0b10)  # I/O thread 0 or 1
        if self.curve is not None:
            self.curve.secure(sock, role)
        sock.bind(parse_endpoint(url).bind_url())
        return sock

    @property
    def client_endpoint(self) -> str:
        return last_endpoint(self.client_sock)

    @property
    def worker_endpoint(self) -> str:
        return last_endpoint(self.worker_sock)

    def recover(self) -> None:
        """Load unfinished tasks from the journal after a (re)start."""
        now = self.clock()
        for name, kind, timeout_s, retries in self.journal.load_task_defs():
            self.task_defs[name] = (Kind(kind), timeout_s, retries)
        self.final_counts = self.journal.final_counts()
        pending = running = 0
        for row in self.journal.load_open():
            tid, name, queue, kind, state, attempt, payload, timeout_s, retries, failures, lost, cat = row
            rec = TaskRecord(
                id=tid,
                name=name,
                queue=queue,
                kind=Kind(kind),
                payload=payload,
                timeout_s=timeout_s,
                retries=retries,
                created_at=cat,
                attempt=attempt,
                failures=failures,
                lost=lost,
            )
            self.tasks[tid] = rec
            if state == TaskState.RUNNING:
                # Its worker may still be running it: wait for workers to report.
                rec.state = TaskState.RUNNING
                self.orphans[tid] = rec
                running += 1
            else:
                self.scheduler.push(rec, now)
                pending += 1
        self.recovery_deadline = now + self.settings.grace_s if self.orphans else 0.0
        log.info("journal_recovered", pending=pending, running=running, task_defs=len(self.task_defs))

    # -- main loop -------------------------------------------------------------
    def run(self) -> int:
        self.signals.install()
        self.recover()
        poller = zmq.Poller()
        poller.register(self.client_sock, zmq.POLLIN)
        poller.register(self.worker_sock, zmq.POLLIN)
        poller.register(self.signals.fd, zmq.POLLIN)
        if self.settings.metrics:
            from poolfleet.master.metrics import start_metrics_server

            self.metrics_server = start_metrics_server(self, self.settings.metrics)
        log.info(
            "master_started",
            clients_endpoint=self.client_endpoint,
            workers_endpoint=self.worker_endpoint,
            data_dir=str(self.settings.data_dir),
            master_id=self.master_id,
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        self.notifier.ready(f"serving clients on {self.client_endpoint}")
        last_sweep = last_watchdog = 0.0
        while True:
            timeout_ms = self._poll_timeout_ms()
            events = dict(poller.poll(timeout_ms))
            now = self.clock()
            if self.signals.fd in events:
                self.signals.drain()
                if self.signals.count:
                    break
            # clients first: their requests (STATUS above all) wait at most one turn's work
            if self.client_sock in events:
                self._read(self.client_sock, self._on_client_frames)
            if self.worker_sock in events:
                self._read(self.worker_sock, self._on_worker_frames)
            self._housekeeping(now)
            self._dispatch(now)
            if now - last_sweep >= SWEEP_INTERVAL_S:
                last_sweep = now
                self._sweep(now)
                # Long-lived objects (a million pending tasks) leave the cyclic collector's
                # sight: a full collection over them stalled the loop for 0.2-0.7 s. Young
                # objects are still collected; tasks are freed by reference counting.
                gc.freeze()
            self.journal.commit()
            self.unflushed.clear()
            self._flush()
            if self.metrics_server is not None:
                self.metrics_server.publish(now)
            if self.watchdog_s and now - last_watchdog >= self.watchdog_s:
                last_watchdog = now
                self.notifier.watchdog()
        return self.shutdown()

    def _poll_timeout_ms(self) -> int:
        wait = self.settings.heartbeat_interval_s / 2
        due = self.scheduler.next_due_s(self.clock())
        if due is not None:
            wait = min(wait, due)
        if self.watchdog_s:
            wait = min(wait, self.watchdog_s)
        return max(1, int(wait * 1000))

    def shutdown(self) -> int:
        """Stop accepting, commit what is staged, close sockets; exit status 0."""
        self.notifier.stopping()
        log.info("master_stopping", signal=self.signals.last, open_tasks=len(self.tasks))
        self.journal.commit()
        self._flush()
        for w in list(self.registry.workers.values()):
            self._send(
                self.worker_sock,
                w.identity,
                MsgKind.ERROR,
                {"code": ErrorCode.SHUTTING_DOWN.value, "message": "master is shutting down"},
            )
        if self.curve is not None:
            self.curve.stop()
        self.client_sock.close(linger=0)
        self.worker_sock.close(linger=0)
        self.ctx.term()
        self.journal.checkpoint()
        self.journal.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.signals.close()
        log.info("master_stopped")
        return 0

    def _read(self, sock: zmq.Socket[bytes], handler: Callable[[bytes, list[bytes]], None]) -> None:
        deadline = time.monotonic() + READ_BUDGET_S
        for _ in range(MAX_READS_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                log.warning("frame_dropped", reason="no identity frame")
                continue
            handler(frames[0], frames[1:])
            if time.monotonic() > deadline:
                return

    # -- sending -------------------------------------------------------------
    def _send(self, sock: zmq.Socket[bytes], ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        try:
            send_frames(sock, [ident, *messages.encode(kind, body)], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("message_dropped", reason="peer queue full", kind=kind.name)
        except zmq.ZMQError as exc:
            log.warning("message_dropped", reason=str(exc), kind=kind.name)

    def later(self, sock: zmq.Socket[bytes], ident: bytes, kind: MsgKind, body: dict[str, Any]) -> None:
        """Send after the next journal commit."""
        self._outbox.append((sock, ident, kind, body))

    def push_result(self, client: bytes, entry: dict[str, Any]) -> None:
        self._pushes.setdefault(client, []).append(entry)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for sock, ident, kind, body in outbox:
            self._send(sock, ident, kind, body)
        pushes, self._pushes = self._pushes, {}
        for client, entries in pushes.items():
            for batch in chunks(entries, 5000, "value"):
                self._send(self.client_sock, client, MsgKind.RESULTS, {"results": batch})

    def reply_error(
        self, sock: zmq.Socket[bytes], ident: bytes, code: str, message: str, req: int | None = None
    ) -> None:
        body: dict[str, Any] = {"code": code, "message": message}
        if type(req) is int:  # echo only a valid req: a bad one (True, "1") would make the ERROR invalid
            body["req"] = req
        self._send(sock, ident, MsgKind.ERROR, body)

    # -- frames ----------------------------------------------------------------
    def _decode(
        self, sock: zmq.Socket[bytes], ident: bytes, frames: list[bytes], peer: str
    ) -> tuple[MsgKind, dict[str, Any]] | None:
        try:
            return messages.decode(frames)
        except ProtocolError as exc:
            log.warning("frame_rejected", peer=peer, code=exc.code, reason=exc.message)
            req = None
            if len(frames) == 3 and frames[0] == MAGIC:
                try:
                    body = codec.unpack(frames[2], max_items=codec.MAX_BODY_ITEMS)
                    if isinstance(body, dict) and isinstance(body.get("req"), int):
                        req = body["req"]
                except Exception:  # noqa: BLE001 - we are only looking for a req number
                    req = None
            self.reply_error(sock, ident, exc.code, exc.message, req)
            return None

    def _on_client_frames(self, ident: bytes, frames: list[bytes]) -> None:
        decoded = self._decode(self.client_sock, ident, frames, "client")
        if decoded is None:
            return
        kind, body = decoded
        try:
            self.api.handle(ident, kind, body)
        except ProtocolError as exc:
            log.warning("request_rejected", peer="client", kind=kind.name, code=exc.code, reason=exc.message)
            self.reply_error(self.client_sock, ident, exc.code, exc.message, body.get("req"))

    def _on_worker_frames(self, ident: bytes, frames: list[bytes]) -> None:
        decoded = self._decode(self.worker_sock, ident, frames, "worker")
        if decoded is None:
            return
        kind, body = decoded
        try:
            self.workers_api.handle(ident, kind, body, self.clock())
        except ProtocolError as exc:
            log.warning("request_rejected", peer="worker", kind=kind.name, code=exc.code, reason=exc.message)
            self.reply_error(self.worker_sock, ident, exc.code, exc.message)

    def _lost(self, rec: TaskRecord, now: float, reason: str) -> None:
        if rec.cancel:
            err = {
                "type": "Cancelled",
                "message": f"cancelled; its worker was lost ({reason})",
                "traceback": "",
            }
            self.finish(rec, Finish(TaskState.CANCELLED, error=err), None, None, now)
            return
        decision = on_worker_lost(rec, self.policy, now)
        if isinstance(decision, Requeue):
            log.info(
                "task_requeued",
                task_id=format_id(rec.id),
                task_name=rec.name,
                attempt=rec.attempt,
                reason=reason,
            )
            self._requeue(rec, decision, now)
        elif isinstance(decision, Finish):
            self.finish(rec, decision, None, None, now)

    def _requeue(self, rec: TaskRecord, decision: Requeue, now: float) -> None:
        requeue(rec, decision)
        self.journal.stage_requeue(rec.id, rec.failures, rec.lost)
        self.scheduler.push(rec, now)

    # -- finishing -------------------------------------------------------------
    def finish(
        self, rec: TaskRecord, decision: Finish, worker_id: str | None, duration_ms: float | None, now: float
    ) -> None:
        """Record a final state once, and push it to the clients waiting for it."""
        if rec.state is TaskState.PENDING:
            self.scheduler.discard(rec)
        if rec.worker is not None:
            w = self.registry.get(rec.worker)
            if w is not None:
                w.remove(rec.id)
        rec.state = decision.state
        rec.worker = None
        self.tasks.pop(rec.id, None)
        self.orphans.pop(rec.id, None)
        error_bytes = codec.pack(decision.error) if decision.error is not None else None
        self.journal.stage_finish(
            rec.id,
            decision.state,
            rec.attempt,
            decision.value,
            error_bytes,
            now,
            now + self.settings.result_ttl_s,
            worker_id,
            duration_ms,
        )
        self.final_counts[decision.state.value] = self.final_counts.get(decision.state.value, 0) + 1
        if self.metrics_server is not None:
            self.metrics_server.observe(rec.name, decision.state.value, duration_ms)
        if decision.state is not TaskState.SUCCEEDED:
            log.info(
                "task_finished",
                task_id=format_id(rec.id),
                task_name=rec.name,
                state=decision.state.value,
                attempt=rec.attempt,
                worker_id=worker_id,
                error=(decision.error or {}).get("message"),
            )
        self.unflushed[rec.id] = self.api.task_finished(rec, decision, worker_id, duration_ms)

    # -- periodic --------------------------------------------------------------
    def _housekeeping(self, now: float) -> None:
        for info in self.registry.expired(now):
            log.warning(
                "worker_expired",
                worker_id=info.worker_id,
                host=info.host,
                silent_s=round(now - info.last_seen, 3),
                tasks=len(info.inflight),
            )
            self.workers_api.gone(info, now, "missed heartbeats")
        for info in self.registry.due_heartbeat(now):
            self._send(self.worker_sock, info.identity, MsgKind.HEARTBEAT, {"master_id": self.master_id})
            info.last_sent = now
        if self.orphans and now >= self.recovery_deadline:
            for rec in list(self.orphans.values()):
                if rec.worker is None and rec.cancel:
                    err = {
                        "type": "Cancelled",
                        "message": "cancelled while its worker was away",
                        "traceback": "",
                    }
                    self.finish(rec, Finish(TaskState.CANCELLED, error=err), None, None, now)
                elif rec.worker is None:
                    log.info(
                        "task_requeued",
                        task_id=format_id(rec.id),
                        task_name=rec.name,
                        reason="no worker reported it after restart",
                    )
                    self._requeue(rec, Requeue(now), now)
            self.orphans.clear()

    def _dispatch(self, now: float) -> None:
        if not self.registry.workers:
            return
        plan = self.scheduler.assign(self.registry.workers.values(), now)
        for ident, recs in plan.items():
            info = self.registry.workers[ident]
            batch = []
            for rec in recs:
                attempt = start(rec, ident, now)
                info.add(rec.id, rec.kind)
                self.journal.stage_start(rec.id, attempt)
                entry: dict[str, Any] = {
                    "id": rec.id,
                    "attempt": attempt,
                    "name": rec.name,
                    "kind": rec.kind.value,
                    "payload": rec.payload,
                }
                if rec.timeout_s:
                    entry["timeout_s"] = rec.timeout_s
                batch.append(entry)
            # Sent now, before this turn's commit: a worker needs no durable record to start,
            # and the commit (with the start folded into it) follows within this turn. Should
            # the master die in between, the task was never acknowledged (the client resends
            # it) or its start is not recorded (it runs again): at least once, as promised.
            for part in chunks(batch, 5000, "payload"):
                self._send(self.worker_sock, ident, MsgKind.DISPATCH, {"tasks": part})
            info.last_sent = now

    def _sweep(self, now: float) -> None:
        """Delete expired results, in batches, for at most ~50 ms per call.

        Batches repeat while they come back full, so expiry keeps up with any
        finishing rate and the journal stays bounded by rate x TTL.
        """
        deadline = time.monotonic() + 0.05
        total = 0
        while True:
            removed = self.journal.expire(now, EXPIRE_BATCH)
            for state, n in removed.items():
                self.final_counts[state] = max(0, self.final_counts.get(state, 0) - n)
            count = sum(removed.values())
            total += count
            if count < EXPIRE_BATCH or time.monotonic() > deadline:
                break
        if total:
            log.info("results_expired", count=total)

    def send_cancel(self, rec: TaskRecord) -> None:
        rec.cancel = True
        if rec.worker is not None:
            self.later(
                self.worker_sock,
                rec.worker,
                MsgKind.CANCEL_TASKS,
                {"tasks": [{"id": rec.id, "attempt": rec.attempt}]},
            )
