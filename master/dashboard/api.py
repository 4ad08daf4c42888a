"""The dashboard's JSON endpoints: a poolfleet client of the master's own client socket.

Everything the dashboard shows or changes goes through the inspection and control requests
that ptask and foreign clients use (STATUS, WORKERS, TASKS, RESOLVE, TASK_SHOW, CANCEL,
TASK_RETRY, QUEUE_CONTROL), sent by one :class:`~poolfleet.client.client.Client` over
loopback: the HTTP threads never touch the master's state. With CurveZMQ keys the client
uses the dashboard's own key, so the master applies to it the rule it applies to every
client (a control action the master refuses is refused here too, with its message).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from poolfleet.client.client import AmbiguousId, Client, UnknownId, id_prefix
from poolfleet.client.output import jsonable
from poolfleet.common import codec
from poolfleet.common.errors import MasterUnreachable, PoolfleetError, RemoteError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import FINAL_STATES, TaskState
from poolfleet.master.dashboard.samples import SAMPLE_INTERVAL_S, SAMPLE_TASKS, WINDOW_S, Ring

log = structlog.get_logger("pmaster")

#: Seconds a dashboard request waits for the master's answer.
REQUEST_TIMEOUT_S = 5.0
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Client methods that newer versions add, by the capability they give the page.
_OPTIONAL = {
    "task_output": "logs",
    "queue_purge": "purge_queue",
    "worker_control": "control_worker",
    "schedules": "schedules",
    "limits": "limits",
}


class ApiError(Exception):
    """An answer other than 200: the HTTP status and a message for people."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_since(text: str) -> float:
    """Seconds in ``30s``, ``10m``, ``2h`` or ``1d`` (the form of ``ptask tasks --since``)."""
    t = text.strip()
    try:
        value = float(t[:-1])
    except ValueError:
        value = -1.0
    if len(t) < 2 or t[-1] not in _UNITS_S or value < 0:
        raise ApiError(400, f"since takes a duration like 30s, 10m, 2h or 1d, not {text!r}")
    return value * _UNITS_S[t[-1]]


def _one(query: Mapping[str, list[str]], key: str) -> str | None:
    values = [v for v in query.get(key, []) if v.strip()]
    return values[-1].strip() if values else None


def _decoded(blob: Any) -> Any:
    if not isinstance(blob, bytes):
        return blob
    try:
        return codec.unpack(blob)
    except PoolfleetError as exc:
        return f"<cannot decode: {exc}>"


def _task_doc(entry: dict[str, Any]) -> dict[str, Any]:
    doc = dict(entry)
    for key in ("id", "last_task"):
        if isinstance(doc.get(key), bytes) and len(doc[key]) == 16:
            doc[key] = format_id(doc[key])
    for key in ("payload", "value"):
        if key in doc:
            doc[key] = _decoded(doc[key])
    out: dict[str, Any] = jsonable(doc)
    return out


def remote_failure(exc: PoolfleetError) -> ApiError:
    """The HTTP answer for what the client raised."""
    if isinstance(exc, MasterUnreachable):
        return ApiError(503, str(exc))
    if isinstance(exc, UnknownId):
        return ApiError(404, str(exc))
    if isinstance(exc, RemoteError):
        # a refusal of the master's own rule (a read-only key, for one) is the master's word
        return ApiError(403 if exc.code == "not_admin" else 400, exc.message)
    return ApiError(400, str(exc))


class DashboardApi:
    """The endpoints' logic over one client; the sampler thread keeps the 15-minute ring."""

    def __init__(self, client: Client, wall: Callable[[], float] = time.time) -> None:
        self.client = client
        self.wall = wall
        self.ring = Ring(WINDOW_S, SAMPLE_INTERVAL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._sample_loop, name="poolfleet-dashboard-sampler", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)  # a sample waiting for a master that has stopped is abandoned
        self.client.close()

    # -- sampling ------------------------------------------------------------------------
    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except PoolfleetError as exc:
                log.debug("dashboard_sample_failed", error=str(exc))
            self._stop.wait(SAMPLE_INTERVAL_S)

    def sample(self) -> None:
        """Ask for STATUS and the newest finished tasks; add one sample to the ring."""
        wall = self.wall()
        status = self.client.status(REQUEST_TIMEOUT_S)
        finished, _next = self.client.tasks(
            states=sorted(FINAL_STATES),
            since=wall - WINDOW_S,
            limit=SAMPLE_TASKS,
            timeout_s=REQUEST_TIMEOUT_S,
        )
        self.ring.add(wall, status, finished)

    # -- reading -------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        try:
            status = self.client.status(REQUEST_TIMEOUT_S)
            workers = self.client.workers(REQUEST_TIMEOUT_S)
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        rates = self.ring.queue_rates(self.wall())
        extra: dict[str, Any] = {}
        for name in ("schedules", "limits"):
            fn = getattr(self.client, _OPTIONAL[name], None)
            if callable(fn):
                try:
                    extra[name] = [_task_doc(e) for e in fn(REQUEST_TIMEOUT_S)]
                except PoolfleetError as exc:
                    raise remote_failure(exc) from None
        return extra | {
            "master_id": status.get("master_id"),
            "uptime_s": status.get("uptime_s"),
            "counts": status.get("counts") or {},
            "submitted_total": status.get("submitted_total"),
            "unserved": status.get("unserved") or [],
            "workers": jsonable(workers),
            "paused": status.get("paused") or [],
            "queues": queue_rows(status, workers, rates),
            "series": self.ring.series(),
            "sample_interval_s": SAMPLE_INTERVAL_S,
        }

    def tasks(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        states = [s.strip().upper() for s in query.get("state", []) if s.strip()]
        bad = [s for s in states if s not in TaskState.__members__]
        if bad:
            raise ApiError(400, f"unknown state {bad[0]!r}: use {', '.join(TaskState.__members__)}")
        limit_text = _one(query, "limit") or "50"
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            raise ApiError(400, f"limit takes a number from 1 to 1000, not {limit_text!r}")
        since = _one(query, "since")
        before = _one(query, "before")
        try:
            if before is not None and len(id_prefix(before)) != 32:
                raise ApiError(400, f"before takes a whole task id, not {before!r}")
            found, more = self.client.tasks(
                states=states,
                name=_one(query, "name"),
                queue=_one(query, "queue"),
                worker=_one(query, "worker"),
                since=None if since is None else self.wall() - parse_since(since),
                before=before,
                limit=int(limit_text),
                timeout_s=REQUEST_TIMEOUT_S,
            )
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        return {"tasks": [_task_doc(e) for e in found], "next": more}

    def task(self, task_id: str) -> dict[str, Any]:
        try:
            doc = self.client.show(task_id, REQUEST_TIMEOUT_S)
        except AmbiguousId as exc:
            raise ApiError(400, str(exc)) from None
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        if doc is None:
            raise ApiError(404, f"unknown task id {task_id} (never submitted, or its result expired)")
        return _task_doc(doc)

    def capabilities(self) -> dict[str, bool]:
        """What this master's client offers beyond the requests every version has (task output,
        queue purge, worker drain and stop): the page shows only what works."""
        return {name: callable(getattr(self.client, attr, None)) for name, attr in _OPTIONAL.items()}

    def _optional(self, name: str) -> Callable[..., Any]:
        fn = getattr(self.client, _OPTIONAL[name], None)
        if not callable(fn):
            raise ApiError(501, f"this version of poolfleet has no {name.replace('_', ' ')}")
        return fn  # type: ignore[no-any-return]

    def logs(self, task_id: str, query: Mapping[str, list[str]]) -> dict[str, Any]:
        """A task's output after offset ``after`` (TASK_LOGS, where the master has it)."""
        after_text = _one(query, "after") or "0"
        if not after_text.isdigit():
            raise ApiError(400, f"after takes an offset (a whole number), not {after_text!r}")
        fetch = self._optional("task_output")
        try:
            reply = fetch(task_id, int(after_text), REQUEST_TIMEOUT_S)
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        keys = ("state", "output", "start", "end", "final", "progress")
        out: dict[str, Any] = jsonable({k: reply[k] for k in keys if k in reply})
        return out

    # -- steering ------------------------------------------------------------------------
    def cancel(self, task_id: str, peer: str) -> dict[str, Any]:
        try:
            full = self.client.resolve([task_id], REQUEST_TIMEOUT_S)[0]
            [result] = self.client.cancel([full], REQUEST_TIMEOUT_S)
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        log.info("dashboard_control", action="cancel", task_id=full, outcome=result.get("outcome"), peer=peer)
        out: dict[str, Any] = jsonable(result | {"id": full})
        return out

    def retry(self, task_id: str, peer: str) -> dict[str, Any]:
        try:
            [result] = self.client.retry([task_id], REQUEST_TIMEOUT_S)
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        doc = dict(result)
        for key in ("id", "new_id"):
            if isinstance(doc.get(key), bytes):
                doc[key] = format_id(doc[key])
        log.info(
            "dashboard_control", action="retry", task_id=doc.get("id"), outcome=doc.get("outcome"), peer=peer
        )
        if doc.get("outcome") != "retried":
            raise ApiError(409, f"not retried: {doc.get('message') or doc.get('outcome')}")
        out: dict[str, Any] = jsonable(doc)
        return out

    def purge(self, queue: str, body: Mapping[str, Any], peer: str) -> dict[str, Any]:
        """Cancel the queue's tasks in ``states`` (default PENDING); ``dry_run`` only counts."""
        states = body.get("states") or ["PENDING"]
        if not isinstance(states, list) or any(s not in ("PENDING", "DISPATCHED", "RUNNING") for s in states):
            raise ApiError(400, "states takes a list of PENDING, DISPATCHED and RUNNING")
        dry_run = body.get("dry_run") is True
        purge = self._optional("queue_purge")
        try:
            count = int(purge(queue, states, dry_run, REQUEST_TIMEOUT_S))
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        if not dry_run:
            log.info("dashboard_control", action="purge", queue=queue, states=states, count=count, peer=peer)
        return {"queue": queue, "count": count, "dry_run": dry_run}

    def worker(self, worker_id: str, action: str, peer: str) -> dict[str, Any]:
        """Ask a worker to drain or stop (as SIGTERM on its host, once or twice)."""
        if action not in ("drain", "stop"):
            raise ApiError(404, f"no worker action {action!r}: drain or stop")
        control = self._optional("worker_control")
        try:
            found = bool(control(worker_id, action, REQUEST_TIMEOUT_S))
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        log.info("dashboard_control", action=action, worker=worker_id, found=found, peer=peer)
        if not found:
            raise ApiError(404, f"no worker {worker_id} is connected")
        return {"worker": worker_id, "action": action, "found": found}

    def schedule(self, name: str, action: str, peer: str) -> dict[str, Any]:
        """Pause or resume a schedule the master keeps."""
        if action not in ("pause", "resume"):
            raise ApiError(404, f"no schedule action {action!r}: pause or resume")
        self._optional("schedules")
        call = getattr(self.client, f"schedule_{action}")
        try:
            changed = bool(call(name, REQUEST_TIMEOUT_S))
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        log.info("dashboard_control", action=f"schedule_{action}", schedule=name, changed=changed, peer=peer)
        return {"schedule": name, "paused": action == "pause", "changed": changed}

    def queue(self, queue: str, action: str, peer: str) -> dict[str, Any]:
        if action not in ("pause", "resume"):
            raise ApiError(404, f"no queue action {action!r}: pause or resume")
        try:
            call = self.client.pause_queue if action == "pause" else self.client.resume_queue
            reply = call(queue, REQUEST_TIMEOUT_S)
        except PoolfleetError as exc:
            raise remote_failure(exc) from None
        log.info("dashboard_control", action=action, queue=queue, changed=reply.get("changed"), peer=peer)
        return {k: reply.get(k) for k in ("queue", "paused", "changed", "pending")}


def queue_rows(
    status: dict[str, Any], workers: list[dict[str, Any]], rates: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per queue that has pending tasks, is paused, is served or finished tasks lately:
    its pending depth by kind, whether it is paused, the workers serving it and its rate."""
    rows: dict[str, dict[str, Any]] = {}

    def row(q: str) -> dict[str, Any]:
        return rows.setdefault(q, {"queue": q, "depth": {}, "pending": 0, "paused": False, "workers": 0})

    for e in status.get("queues") or []:
        r = row(str(e.get("queue")))
        r["depth"][str(e.get("kind"))] = int(e.get("depth") or 0)
        r["pending"] += int(e.get("depth") or 0)
    for q in status.get("paused") or []:
        row(str(q))["paused"] = True
    for w in workers:
        for q in w.get("queues") or []:
            row(str(q))["workers"] += 1
    for q in rates:
        row(q)
    for q, r in rows.items():
        r["rate_per_s"] = rates.get(q, 0.0)
    return [rows[q] for q in sorted(rows)]
