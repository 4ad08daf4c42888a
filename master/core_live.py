"""The master core's view of running tasks and its operator controls: output and progress
(TASK_UPDATE from workers, the final tail with results, TASK_LOGS, PROGRESS pushes, the
``progress`` field of TASKS and TASK_SHOW), purging a queue (QUEUE_PURGE) and draining or
stopping a worker (WORKER_CONTROL).

A running task's output and latest progress report live here in memory (the last
``LIVE_OUTPUT`` characters); its final ones are written to the journal with its result.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import structlog

from poolfleet.common import codec, messages
from poolfleet.common.errors import ProtocolError
from poolfleet.common.protocol import OPEN_STATES, ErrorCode, MsgKind, Role, TaskState
from poolfleet.master import client_api
from poolfleet.master.codestore import UNTRUSTED, Trust
from poolfleet.master.core_base import Send, _err
from poolfleet.master.core_queries import QueryEvents, QueryJournal
from poolfleet.master.registry import WorkerInfo
from poolfleet.master.state import Finish, Requeue, TaskRecord

log = structlog.get_logger("pmaster")

#: Characters of a running task's output the master keeps in memory.
LIVE_OUTPUT = 65536
WORKER_ACTIONS = ("drain", "stop")


class Live:
    """One attempt's output (the last LIVE_OUTPUT characters, ending at offset ``end``) and
    its latest progress report."""

    __slots__ = ("attempt", "end", "progress", "text")

    def __init__(self, attempt: int, text: str = "", end: int = 0) -> None:
        self.attempt = attempt
        self.text = text
        self.end = end
        self.progress: dict[str, Any] | None = None

    def add(self, at: int, text: str) -> None:
        """A piece of output starting at offset ``at``: only what is past ``end`` is new; a gap
        is text the worker did not send (lost to its bound)."""
        if at + len(text) <= self.end:
            return
        if at > self.end:  # a gap: the kept text restarts here
            self.text = text[-LIVE_OUTPUT:]
        else:
            self.text = (self.text + text[self.end - at :])[-LIVE_OUTPUT:]
        self.end = at + len(text)


def progress_report(value: Any) -> dict[str, Any] | None:
    """A checked progress map (fraction clamped, message cut), or None if malformed."""
    try:
        p = messages.check("progress", value, messages.PROGRESS_REPORT)
    except ProtocolError:
        return None
    return {
        "fraction": min(1.0, max(0.0, float(p["fraction"]))),
        "message": p["message"][:200],
        "at": float(p["at"]),
    }


class OutputJournal(QueryJournal, Protocol):
    def stage_output(self, task_id: bytes, output: str, output_end: int, progress: bytes | None) -> None: ...
    def output_of(self, task_id: bytes) -> tuple[str, int, bytes | None] | None: ...
    def progress_of(self, ids: list[bytes]) -> dict[bytes, bytes]: ...


class LiveEvents(QueryEvents):
    """Output, progress and the operator's controls of queues and workers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: output and progress of tasks that reported some, until their final ones are committed
        self.live: dict[bytes, Live] = {}
        #: clients that asked for PROGRESS pushes of a task they wait for
        self.progress_waiters: dict[bytes, set[bytes]] = {}
        self._live_final: list[bytes] = []
        #: counters for the metrics: automatic retries after a failure, tasks run again by
        #: request (TASK_RETRY), progress reports received
        self.counters = {"task_retries": 0, "retried_by_request": 0, "progress_reports": 0}

    @property
    def ojournal(self) -> OutputJournal:
        return cast(OutputJournal, self.qjournal)

    # -- from workers ------------------------------------------------------------------------
    def worker_message(
        self, ident: bytes, kind: MsgKind, body: dict[str, Any], now: float, wall: float
    ) -> None:
        if kind is MsgKind.TASK_UPDATE:
            info = self.registry.seen(ident, now)
            if info is None:
                self.error(Role.WORKER, ident, ErrorCode.NOT_REGISTERED, "unknown worker: send HELLO first")
                return
            self._task_update(info, body["tasks"])
            return
        super().worker_message(ident, kind, body, now, wall)

    def _task_update(self, info: WorkerInfo, entries: list[Any]) -> None:
        pushes: dict[bytes, list[dict[str, Any]]] = {}
        for e in messages.check_entries("TASK_UPDATE.tasks", entries, messages.TASK_UPDATE_ENTRY):
            rec = self.tasks.get(e["id"])
            if rec is None or rec.worker != info.identity or rec.attempt != e["attempt"]:
                continue  # finished, requeued, or not this worker's: nothing to show
            live = self.live.get(rec.id)
            if live is None or live.attempt != rec.attempt:
                live = self.live[rec.id] = Live(rec.attempt)
            text = e.get("output")
            if text is not None:
                live.add(e.get("at", live.end), text)
            report = progress_report(e.get("progress")) if e.get("progress") is not None else None
            if report is not None:
                live.progress = report
                self.counters["progress_reports"] += 1
                for client in self.progress_waiters.get(rec.id, ()):
                    pushes.setdefault(client, []).append({"id": rec.id, **report})
        for client, tasks in pushes.items():
            self._send(Role.CLIENT, client, MsgKind.PROGRESS, {"tasks": tasks})

    def _results(
        self, ident: bytes, info: WorkerInfo | None, entries: list[dict[str, Any]], now: float, wall: float
    ) -> None:
        for e in entries:  # the final output and progress, kept by _finish if the result stands
            if e.get("output") is None and e.get("progress") is None:
                continue
            rec = self.tasks.get(e["id"])
            if rec is None or not rec.state.at_worker or rec.attempt != e["attempt"]:
                continue
            text = e.get("output") or ""
            end = e.get("output_end")
            live = Live(rec.attempt, text[-LIVE_OUTPUT:], end if isinstance(end, int) else len(text))
            old = self.live.get(rec.id)
            report = progress_report(e.get("progress")) if e.get("progress") is not None else None
            live.progress = report or (
                old.progress if old is not None and old.attempt == rec.attempt else None
            )
            self.live[rec.id] = live
        super()._results(ident, info, entries, now, wall)

    def _requeue(self, rec: TaskRecord, decision: Requeue, now: float) -> None:
        if decision.reason == "retry":
            self.counters["task_retries"] += 1
        super()._requeue(rec, decision, now)

    def task_retry(self, client: bytes, req: int, tasks: list[Any], now: float, wall: float) -> None:
        super().task_retry(client, req, tasks, now, wall)
        reply = self.after_commit[-1]
        if reply.kind is MsgKind.TASK_RETRY_REPLY:
            self.counters["retried_by_request"] += sum(
                1 for r in reply.body["results"] if r["outcome"] == "retried"
            )

    def reporting_progress(self) -> int:
        """Open tasks whose latest attempt reported progress."""
        return sum(
            1
            for tid, live in self.live.items()
            if live.progress is not None
            and (rec := self.tasks.get(tid)) is not None
            and rec.attempt == live.attempt
        )

    def _finish(
        self, rec: TaskRecord, decision: Finish, worker_id: str | None, duration_ms: float | None, wall: float
    ) -> None:
        super()._finish(rec, decision, worker_id, duration_ms, wall)
        if self.progress_waiters:
            self.progress_waiters.pop(rec.id, None)
        live = self.live.get(rec.id)
        if live is not None:
            progress = codec.pack(live.progress) if live.progress is not None else None
            stage = getattr(self.journal, "stage_output", None)
            if stage is not None:
                stage(rec.id, live.text, live.end, progress)
            self._live_final.append(rec.id)

    def committed(self) -> tuple[list[Send], dict[bytes, list[dict[str, Any]]]]:
        for tid in self._live_final:
            if tid not in self.tasks:
                self.live.pop(tid, None)
        self._live_final = []
        return super().committed()

    # -- from clients ------------------------------------------------------------------------
    def submit(
        self,
        client: bytes,
        req: int,
        tasks: list[Any],
        wait: bool,
        now: float,
        wall: float,
        trust: Trust = UNTRUSTED,
    ) -> None:
        """A submit; its SUBMITTED names the queues of accepted tasks no connected worker serves
        (a warning: the tasks wait for such a worker), with the queues that are served, when
        some worker is connected."""
        super().submit(client, req, tasks, wait, now, wall, trust)
        reply = self.after_commit[-1] if self.after_commit else None
        if reply is None or reply.kind is not MsgKind.SUBMITTED:
            return
        workers = self.registry.workers.values()
        if not workers:  # none connected yet (a cluster starting up): STATUS tells that
            return
        peek = self.tasks.peek  # no look-up that would thaw the cold tasks just queued
        queues = {rec.queue for t in reply.body["accepted"] if (rec := peek(t)) is not None}
        unserved = sorted(q for q in queues if not any(q in w.queues for w in workers))
        if unserved:
            reply.body["unserved"] = unserved
            reply.body["served"] = sorted({q for w in workers for q in w.queues})

    def functions(self) -> dict[str, dict[str, Any]]:
        """Every task name the connected workers offer: how many offer it, and its defaults
        (those of the longest-connected one)."""
        out: dict[str, dict[str, Any]] = {}
        for name, idents in sorted(self.offered.items()):
            offer = self.known_offer(name)
            doc: dict[str, Any] = {"workers": len(idents)}
            if offer is not None:
                doc.update(offer.describe())
            out[name] = doc
        return out

    def workers_reply(self, req: int, now: float) -> dict[str, Any]:
        reply: dict[str, Any] = super().workers_reply(req, now)
        reply["functions"] = self.functions()
        return reply

    def want_progress(self, client: bytes, ids: list[Any]) -> None:
        """A client waiting for these tasks asked for their PROGRESS pushes too."""
        for tid in ids:
            if isinstance(tid, bytes) and tid in self.tasks:
                self.progress_waiters.setdefault(tid, set()).add(client)

    def task_logs(self, req: int, tid: Any, after: Any) -> dict[str, Any]:
        client_api.ids("TASK_LOGS", [tid])
        after = after if isinstance(after, int) and after > 0 else 0
        rec = self.tasks.get(tid)
        live = self.live.get(tid)
        text, end, progress = "", 0, None
        if rec is not None or (live is not None and tid in self.unflushed):
            state = rec.state.value if rec is not None else self.unflushed[tid]["state"]
        else:
            row = self.qjournal.task_row(tid)
            if row is None:
                return {"req": req, "found": False}
            state, live = row[4], None
            stored = self.ojournal.output_of(tid)
            if stored is not None:
                text, end = stored[0], stored[1]
                progress = codec.unpack(stored[2]) if stored[2] is not None else None
        if live is not None:
            text, end, progress = live.text, live.end, live.progress
        start = end - len(text)
        frm = start if after > end else max(after, start)  # after > end: a new attempt began
        reply: dict[str, Any] = {
            "req": req,
            "found": True,
            "state": state,
            "output": text[frm - start :],
            "start": frm,
            "end": end,
            "final": state not in OPEN_STATES,
        }
        if progress is not None:
            reply["progress"] = progress
        return reply

    def task_show(self, req: int, tid: Any) -> dict[str, Any]:
        reply = super().task_show(req, tid)
        task = reply.get("task")
        if task is not None:
            live = self.live.get(tid)
            if live is not None:
                end, progress = live.end, live.progress
            else:
                stored = self.ojournal.output_of(tid)
                end = stored[1] if stored is not None else 0
                progress = codec.unpack(stored[2]) if stored is not None and stored[2] is not None else None
            if end:
                task["output_end"] = end
            if progress is not None:
                task["progress"] = progress
        return reply

    def tasks_list(self, req: int, body: dict[str, Any]) -> dict[str, Any]:
        reply = super().tasks_list(req, body)
        finished = []
        for e in reply["tasks"]:
            live = self.live.get(e["id"])
            if live is not None and live.progress is not None:
                e["progress"] = live.progress
            elif e["state"] not in OPEN_STATES:
                finished.append(e)
        if finished:
            stored = self.ojournal.progress_of([e["id"] for e in finished])
            for e in finished:
                p = stored.get(e["id"])
                if p is not None:
                    e["progress"] = codec.unpack(p)
        return reply

    # -- control -----------------------------------------------------------------------------
    def queue_purge(self, client: bytes, req: int, body: dict[str, Any], now: float, wall: float) -> None:
        """Cancel every task of a queue in the given open states (default PENDING)."""
        queue = body["queue"]
        if not client_api.QUEUE_NAME.match(queue):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad queue name {queue!r}")
        states = body.get("states") or [TaskState.PENDING.value]
        if not all(isinstance(s, str) and s in OPEN_STATES for s in states):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "QUEUE_PURGE: states must be among PENDING, DISPATCHED, RUNNING"
            )
        wanted = frozenset(states)
        recs = [
            r for r in self.tasks.snapshot() if r.queue == queue and r.state.value in wanted and not r.cancel
        ]
        reply = {"req": req, "queue": queue, "count": len(recs), "dry_run": bool(body.get("dry_run"))}
        if body.get("dry_run"):
            self._send(Role.CLIENT, client, MsgKind.QUEUE_PURGE_REPLY, reply)
            return
        recs = [self.tasks[r.id] for r in recs]  # the records themselves (cold ones thawed)
        at_workers = []
        for rec in recs:
            if rec.state is TaskState.PENDING:
                self._finish(
                    rec,
                    Finish(TaskState.CANCELLED, error=_err(f"purged from queue {queue}")),
                    None,
                    None,
                    wall,
                )
            else:
                at_workers.append(rec.id)
        if at_workers:
            self.cancel(client, req, at_workers, now, wall)
            cancelled = self.after_commit.pop()  # its CANCEL_REPLY: answered by the purge's reply
            assert cancelled.kind is MsgKind.CANCEL_REPLY
        log.info("queue_purged", queue=queue, states=sorted(wanted), count=len(recs))
        self._later(Role.CLIENT, client, MsgKind.QUEUE_PURGE_REPLY, reply)

    def worker_control(self, req: int, worker_id: str, action: str) -> dict[str, Any]:
        """Ask a worker to drain (as a first SIGTERM) or stop (as a second)."""
        if action not in WORKER_ACTIONS:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "WORKER_CONTROL: action must be drain or stop")
        info = self.registry.named(worker_id)
        if info is not None:
            self._send(Role.WORKER, info.identity, MsgKind.CONTROL, {"action": action})
            log.info("worker_control_sent", worker_id=worker_id, action=action)
        return {"req": req, "worker": worker_id, "action": action, "found": info is not None}


__all__ = ["LIVE_OUTPUT", "Live", "LiveEvents"]
