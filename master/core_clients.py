"""The master core's client events: submit, result fetch, cancel, status, workers."""

from __future__ import annotations

import sys
from typing import Any

import structlog

from poolfleet.common import codec
from poolfleet.common.errors import DecodeError, ProtocolError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import ErrorCode, Kind, MsgKind, Role, TaskState
from poolfleet.common.shipping import SHIPPED_ROUTE, is_shipped, shipped_digest, skew
from poolfleet.common.suggest import unknown_task_message
from poolfleet.master import client_api
from poolfleet.master.codestore import UNTRUSTED, Trust, shipping_workers
from poolfleet.master.core_base import _err, task_route
from poolfleet.master.core_waits import Hold, WaitEvents
from poolfleet.master.registry import Offer
from poolfleet.master.state import Finish, TaskRecord
from poolfleet.master.tasktable import ColdBatch
from poolfleet.worker.cmdpolicy import env_refusal

log = structlog.get_logger("pmaster")


#: cmd payloads up to this size are checked at submit (decoded with an item budget); larger
#: ones go to a worker, which decodes them where the task runs and refuses them there.
CMD_CHECK_MAX_BYTES = 64 * 1024


def cmd_program(payload: bytes) -> tuple[str, list[str]]:
    """The program (argv[0]) and the env names of a cmd task's payload."""
    doc = codec.unpack(payload, max_items=codec.MAX_BODY_ITEMS)
    if not (
        isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], list) and isinstance(doc[1], dict)
    ):
        raise DecodeError("payload must be [args, kwargs]")
    args, kwargs = doc
    spec: dict[str, Any] = dict(zip(("argv", "stdin", "env", "cwd"), args, strict=False))
    spec.update(kwargs)
    argv, env = spec.get("argv"), spec.get("env")
    if not isinstance(argv, list) or not argv or not isinstance(argv[0], str):
        raise DecodeError("argv must be a non-empty list of strings")
    return argv[0], [k for k in env if isinstance(k, str)] if isinstance(env, dict) else []


class ClientEvents(WaitEvents):
    """What a client asks of the master."""

    def _options(self, entry: dict[str, Any]) -> client_api.Options:
        name = entry["name"]
        key = (
            name,
            entry.get("kind"),
            entry.get("queue"),
            entry.get("timeout_s"),
            entry.get("retries"),
            self._defs_version,
        )
        hit = self._checked.get(key)
        if hit is not None and len(entry["id"]) == 16:
            return hit
        any_known = bool(self.task_defs) or bool(self.offered)
        offered = sorted(set(self.task_defs) | set(self.offered)) if any_known else []
        known = self.known_offer(name)
        if known is None and is_shipped(name):  # the defaults of workers that run shipped code
            known = self.known_offer(SHIPPED_ROUTE) or Offer(Kind.CPU)
        out = client_api.check_options(entry, known, any_known, offered)
        if len(self._checked) >= 4096:  # bounded: a client may send any number of names
            self._checked.clear()
        self._checked[key] = out
        return out

    def _refusal(
        self, entry: dict[str, Any], kind: Kind, queue: str, room: int, route: str, trust: Trust
    ) -> ProtocolError | None:
        """Why a well-formed entry cannot be queued (None: it can): a full queue, a cmd
        program not allowed, shipped code not allowed, a chunk of a name no worker offers."""
        refusal = self._over_limit(queue, kind, room)
        if refusal is None and kind is Kind.CMD:
            refusal = self._cmd_refusal(entry["payload"], queue)
        if refusal is None and route == SHIPPED_ROUTE:
            refusal = self._shipped_refusal(entry, trust)
        elif refusal is None and route != entry["name"]:
            refusal = self._route_refusal(route)
        return refusal

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
        """Queue the well-formed tasks; ``trust`` says whether this request may ship code."""
        entries, rejected = client_api.submit_entries(tasks)
        self.last_now, self.last_wall = now, wall
        accepted: list[bytes] = []
        fresh_ids = [e["id"] for e in entries if e["id"] not in self.tasks]
        in_journal = self.journal.existing(fresh_ids) if fresh_ids else set()
        cap = self.settings.max_unacked_per_client
        owned = self.owned.get(client)
        room = cap - (len(owned) if owned else 0)  # at most the true room: owned >= pending
        if room < len(entries):
            room = cap - self._pending_of(client)
        table = self.tasks
        batches: dict[tuple[Any, ...], ColdBatch] = {}  # this SUBMIT's, by lane and options
        # a SUBMIT of one task (a round trip, a client submitting one at a time) makes its
        # record at once: a batch of one costs more memory than the record
        cold = len(entries) > 1
        for entry in entries:
            tid = entry["id"]
            if tid in table or tid in in_journal or tid in self.unflushed:
                accepted.append(tid)  # idempotent resubmit: the first one stands
                continue
            try:
                kind, queue, timeout_s, retries = self._options(entry)
                priority = client_api.check_priority(entry)
            except ProtocolError as exc:
                rejected.append({"id": tid, "code": exc.code, "message": exc.message})
                continue
            route = task_route(entry["name"], entry["payload"])
            refusal = self._refusal(entry, kind, queue, room, route, trust)
            plan: Hold | None = None
            if refusal is None and (
                "refs" in entry or "after" in entry or "delay_s" in entry or "eta" in entry
            ):
                try:
                    plan = self.hold_plan(entry, wall)
                except ProtocolError as exc:
                    refusal = exc
            if refusal is not None:
                rejected.append({"id": tid, "code": refusal.code, "message": refusal.message})
                continue
            room -= 1
            self.owned.setdefault(client, []).append(tid)
            self._owned_total += 1
            name = entry["name"]
            payload = entry["payload"]
            self.fresh.append(tid)
            self.journal.stage_insert(
                tid, name, queue, kind.value, payload, timeout_s, retries, wall, priority
            )
            if route == SHIPPED_ROUTE and trust.who is not None:
                self.journal.stage_shipped_by(tid, trust.who)
            if plan is None and cold:  # queued cold: a record only once something looks at it
                bkey = (name, queue, kind, route, priority, timeout_s, retries)
                batch = batches.get(bkey)
                if batch is None:
                    batch = batches[bkey] = table.batch(
                        sys.intern(name),  # one copy per name, not per pending task
                        sys.intern(queue),
                        kind,
                        route,
                        priority,
                        timeout_s,
                        retries,
                        wall,
                        self.scheduler.new_seq(),
                    )
                table.put_cold(tid, payload, batch)
                self.scheduler.push_cold(tid, batch)
            else:
                rec = TaskRecord(
                    id=tid,
                    name=sys.intern(name),
                    queue=sys.intern(queue),
                    kind=kind,
                    payload=payload,
                    timeout_s=timeout_s,
                    retries=retries,
                    created_at=wall,
                    route=route,
                    priority=priority,
                )
                table[tid] = rec
                self._queue_or_hold(rec, plan, now, wall)
            self.submitted_total += 1
            accepted.append(tid)
        if wait:
            self._subscribe(client, accepted)
        for r in rejected:
            log.info(
                "task_rejected",
                task_id=format_id(r["id"]) if len(r["id"]) == 16 else r["id"].hex(),
                code=r["code"],
                reason=r["message"],
            )
        if self._owned_total > 2 * len(self.tasks) + 10_000:
            for c in list(self.owned):
                self._pending_of(c)
        # acknowledged only after the commit that holds these tasks
        self._later(
            Role.CLIENT, client, MsgKind.SUBMITTED, {"req": req, "accepted": accepted, "rejected": rejected}
        )

    def _queue_or_hold(self, rec: TaskRecord, plan: Hold | None, now: float, wall: float) -> None:
        """Queue a task just submitted with its record, or hold it back as ``plan`` says."""
        if plan is None:
            self.scheduler.push(rec, now)
        else:
            self.hold(rec, plan, wall)

    def _subscribe(self, client: bytes, accepted: list[bytes]) -> None:
        """Push results to this client as they land; those already final, right away."""
        done = [t for t in accepted if t not in self.tasks]
        for tid in accepted:
            if tid in self.tasks:
                self.waiters.setdefault(tid, set()).add(client)
        for tid in done:
            if tid in self.unflushed:
                self._push(client, self.unflushed[tid])
        for row in self.journal.results([t for t in done if t not in self.unflushed]).values():
            self._push(client, client_api.row_entry(row))

    def _over_limit(self, queue: str, kind: Kind, room: int) -> ProtocolError | None:
        """Backpressure: a full queue, or a client with too many pending tasks."""
        settings = self.settings
        if self.scheduler.depth.get((queue, kind), 0) >= settings.max_queue_length:
            return ProtocolError(
                ErrorCode.QUEUE_FULL,
                f"queue {queue!r} ({kind.value}) is full: {settings.max_queue_length} tasks pending; retry later",
            )
        if room <= 0:
            return ProtocolError(
                ErrorCode.TOO_MANY_UNACKED,
                f"this client already has {settings.max_unacked_per_client} tasks pending "
                "(max_unacked_per_client); wait until some start or finish, then submit again",
            )
        return None

    def _cmd_refusal(self, payload: bytes, queue: str) -> ProtocolError | None:
        """A cmd task no worker serving its queue would run: its program is not allowed there,
        or its env sets a variable they refuse. None while no worker serves the queue (the
        master cannot know yet) or when one would run it."""
        workers = [w for w in self.registry.workers.values() if queue in w.queues]
        if not workers or len(payload) > CMD_CHECK_MAX_BYTES:
            return None  # a huge payload is the worker's to decode, within its limits
        try:
            program, env_names = cmd_program(payload)
        except DecodeError as exc:
            return ProtocolError(ErrorCode.BAD_REQUEST, f"cmd task: {exc}")
        allowing = [
            w
            for w in workers
            if w.slots.get(Kind.CMD, 0) > 0 and (w.allow_cmd is None or program in w.allow_cmd)
        ]
        if not allowing:
            allowed = sorted({p for w in workers for p in (w.allow_cmd or ())})
            said = f"they allow: {', '.join(allowed)}" if allowed else "none of them runs cmd tasks"
            return ProtocolError(
                ErrorCode.CMD_NOT_ALLOWED,
                f"program {program!r} is not allowed on any worker serving queue {queue!r} ({said}); "
                f"start a worker with --allow-cmd {program}",
            )
        refusals = [env_refusal(env_names, w.allow_cmd_env) for w in allowing]
        if all(r is not None for r in refusals):
            return ProtocolError(ErrorCode.CMD_NOT_ALLOWED, str(refusals[0]))
        return None

    def _shipped_refusal(self, entry: dict[str, Any], trust: Trust) -> ProtocolError | None:
        """A task of a shipped function (or a chunk of one): from a client trusted with shipped
        code, naming a function the master holds."""
        if trust.refusal is not None or trust.who is None:
            return ProtocolError(ErrorCode.CODE_REFUSED, trust.refusal or UNTRUSTED.refusal or "")
        name = entry["name"]
        target = name if is_shipped(name) else codec.first_arg(entry["payload"])
        digest = shipped_digest(target) if isinstance(target, str) else None
        if digest is None:
            return ProtocolError(ErrorCode.BAD_REQUEST, f"malformed shipped task name {target!r}")
        if self.code.get(digest) is None:
            return ProtocolError(
                ErrorCode.CODE_UNKNOWN,
                f"the master holds no shipped function {digest.hex()[:16]}...: send it (CODE_PUT) first",
            )
        return None

    def code_put(self, client: bytes, body: dict[str, Any], trust: Trust, wall: float) -> None:
        """Store a shipped function (CODE_PUT); answered after the commit that journals it.
        Raises ProtocolError when it is refused (the shell answers with an ERROR)."""
        new = self.code.put(body, trust, self.registry.workers.values())
        if new is not None:
            self.journal.stage_code(new.digest, new.blob, new.python, new.cloudpickle, new.shipped_by, wall)
        able = [
            w
            for w in shipping_workers(self.registry.workers.values())
            if skew(body["python"], body["cloudpickle"], w.python or "?", w.cloudpickle) is None
        ]
        self._later(
            Role.CLIENT,
            client,
            MsgKind.CODE_PUT_REPLY,
            {"req": body["req"], "hash": body["hash"], "stored": new is not None, "workers": len(able)},
        )

    def _route_refusal(self, route: str) -> ProtocolError | None:
        """A chunk of calls of a task no worker ever offered (or not a task name at all)."""
        if not client_api.TASK_NAME.match(route):
            return ProtocolError(ErrorCode.BAD_REQUEST, f"a chunk must name the task it calls, not {route!r}")
        if (self.task_defs or self.offered) and route not in self.task_defs and route not in self.offered:
            offered = sorted(set(self.task_defs) | set(self.offered))
            return ProtocolError(ErrorCode.UNKNOWN_TASK, unknown_task_message(route, offered))
        return None

    def _pending_of(self, client: bytes) -> int:
        """How many tasks of this client are PENDING; forgets its tasks that have finished."""
        owned = self.owned.get(client)
        if not owned:
            return 0
        tasks = self.tasks
        live = [t for t in owned if t in tasks]
        self._owned_total -= len(owned) - len(live)
        if live:
            self.owned[client] = live
        else:
            del self.owned[client]
        cold = tasks.cold  # a cold task is PENDING (and stays cold: no look-up)
        return sum(1 for t in live if t in cold or tasks[t].state is TaskState.PENDING)

    def result_get(self, client: bytes, req: int, ids: list[Any], wait: bool) -> None:
        client_api.ids("RESULT_GET", ids)
        results: list[dict[str, Any]] = []
        unknown: list[bytes] = []
        finished = self.journal.results([i for i in ids if i not in self.tasks])
        for tid in ids:
            rec = self.tasks.get(tid)
            if rec is not None:
                results.append(
                    {"id": tid, "state": rec.state.value, "attempt": rec.attempt, "name": rec.name}
                )
                if wait:
                    self.waiters.setdefault(tid, set()).add(client)
            elif tid in self.unflushed:
                results.append(self.unflushed[tid])
            elif tid in finished:
                results.append(client_api.row_entry(finished[tid]))
            else:
                unknown.append(tid)
        self._send(Role.CLIENT, client, MsgKind.RESULTS, {"req": req, "results": results, "unknown": unknown})

    def cancel(
        self,
        client: bytes,
        req: int,
        ids: list[Any],
        now: float,
        wall: float,
        *,
        if_not_started: bool = False,
    ) -> None:
        """Cancel tasks; with ``if_not_started`` a RUNNING one is left alone (outcome "running"),
        as ``concurrent.futures.Future.cancel`` leaves a running call."""
        client_api.ids("CANCEL", ids)
        out: list[dict[str, Any]] = []
        for tid in ids:
            rec = self.tasks.get(tid)
            if rec is None and tid in self.unflushed:
                out.append({"id": tid, "outcome": "finished", "state": self.unflushed[tid]["state"]})
            elif rec is None:
                row = self.journal.results([tid]).get(tid)
                if row is None:
                    out.append({"id": tid, "outcome": "unknown"})
                else:
                    out.append({"id": tid, "outcome": "finished", "state": row[2]})
            elif not rec.state.at_worker:  # PENDING, WAITING or DELAYED: it ends here
                was = rec.state.value
                self._finish(
                    rec,
                    Finish(TaskState.CANCELLED, error=_err(f"cancelled while {was.lower()}")),
                    None,
                    None,
                    wall,
                )
                out.append({"id": tid, "outcome": "cancelled", "state": TaskState.CANCELLED.value})
                log.info("task_cancelled", task_id=format_id(tid), task_name=rec.name, state=was)
            elif if_not_started and rec.state is TaskState.RUNNING:
                out.append({"id": tid, "outcome": "running", "state": rec.state.value})
            else:
                soft = if_not_started and (rec.cancel_unless_started or not rec.cancel)
                rec.cancel, rec.cancel_unless_started = True, soft
                if rec.worker is not None:
                    ref: dict[str, Any] = {"id": rec.id, "attempt": rec.attempt}
                    if soft:
                        ref["if_not_started"] = True
                    self._later(Role.WORKER, rec.worker, MsgKind.CANCEL_TASKS, {"tasks": [ref]})
                out.append({"id": tid, "outcome": "cancelling", "state": rec.state.value})
                log.info(
                    "task_cancel_requested", task_id=format_id(tid), task_name=rec.name, attempt=rec.attempt
                )
        self._later(Role.CLIENT, client, MsgKind.CANCEL_REPLY, {"req": req, "results": out})

    def status(self, req: int, uptime_s: float) -> dict[str, Any]:
        counts = dict(self.final_counts)
        workers = self.registry.workers.values()
        running = self.registry.counts.running
        at_workers = self.registry.counts.at_workers + len(self.orphans)
        counts[TaskState.RUNNING.value] = running
        counts[TaskState.DISPATCHED.value] = at_workers - running
        counts[TaskState.WAITING.value] = len(self.waits)
        counts[TaskState.DELAYED.value] = self.delayed_n
        counts[TaskState.PENDING.value] = len(self.tasks) - at_workers - len(self.waits) - self.delayed_n
        queues = [
            {"queue": q, "kind": k.value, "depth": n} for (q, k), n in sorted(self.scheduler.depths().items())
        ]
        return {
            "req": req,
            "master_id": self.master_id,
            "counts": counts,
            "queues": queues,
            "unserved": self.scheduler.unserved(workers),
            "workers": len(self.registry),
            "submitted_total": self.submitted_total,
            "code": self.code.counters(),
            "uptime_s": round(uptime_s, 3),
        }

    def workers_reply(self, req: int, now: float) -> dict[str, Any]:
        workers = []
        for w in self.registry.workers.values():
            d = w.describe(now)
            d["conflicts"] = sorted(n for n in (w.offers or ()) if self._conflict(n))
            workers.append(d)
        conflicts = {n: self._conflict(n) for n in self.offered if self._conflict(n)}
        return {"req": req, "workers": workers, "conflicts": conflicts}
