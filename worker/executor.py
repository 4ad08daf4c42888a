"""The worker's executor: a process pool (cpu), threads (io), subprocesses (cmd).

Only the worker's main thread calls the methods of :class:`Executor`. It feeds
the cpu children itself and reads their pipes when the main loop's poller says
so (see poolfleet.worker.procpool). io and cmd jobs run on threads of their
own lane; a thread puts the outcome on a queue and pokes a wake-up pipe the
main loop polls (once until the main thread has looked).
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from poolfleet.common.ids import format_id
from poolfleet.common.protocol import Kind, TaskState
from poolfleet.worker.cmdrun import kill_group, run_command
from poolfleet.worker.pacing import Pacer
from poolfleet.worker.procpool import Call, Child, ChildPool, Death
from poolfleet.worker.registry import TaskRegistry
from poolfleet.worker.runner import Outcome, execute

log = structlog.get_logger("pworker")


@dataclass(eq=False)
class Job:
    """One attempt of a task on this worker."""

    id: bytes
    attempt: int
    name: str
    kind: Kind
    payload: bytes
    timeout_s: float | None
    received_at: float
    started_at: float | None = None
    popen: subprocess.Popen[bytes] | None = None
    done: bool = False
    cancelled: bool = False
    in_pool: bool = False
    holds_slot: bool = False
    child: Child | None = None  # the pool child it was sent to (kind cpu)
    chunked: bool = False  # shares a pool call with other tiny jobs (see pacing)
    solo: bool = False  # never chunked again (its chunk's child died)


@dataclass(frozen=True)
class Report:
    """An outcome ready for the master."""

    id: bytes
    attempt: int
    state: str
    value: bytes | None = None
    error: dict[str, Any] | None = None
    duration_ms: float | None = None
    lost: bool = False

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "attempt": self.attempt, "state": self.state}
        if self.value is not None:
            d["value"] = self.value
        if self.error is not None:
            d["error"] = self.error
        if self.duration_ms is not None:
            d["duration_ms"] = round(self.duration_ms, 3)
        if self.lost:
            d["lost"] = True
        return d


@dataclass
class ExecutorSettings:
    modules: tuple[str, ...]
    cpu: int
    io: int
    cmd: int
    allow_cmd: frozenset[str]
    max_tasks_per_child: int | None
    log_level: str
    cmd_env: dict[str, str] = field(default_factory=dict)


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown cause"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class ThreadLane:
    """``n`` threads taking jobs from one queue in order (kinds io and cmd)."""

    def __init__(
        self, name: str, n: int, run: Callable[[Job], Outcome], done: Callable[[Job, Outcome], None]
    ):
        self.run = run
        self.done = done
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._loop, name=f"pf-{name}-{i}", daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def put(self, job: Job) -> None:
        self.queue.put(job)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                outcome = self.run(job)
            except BaseException as exc:  # noqa: BLE001 - reported as the job's failure
                outcome = _crash(exc)
            self.done(job, outcome)

    def close(self, wait: bool) -> None:
        """``wait``: queued jobs still run and the threads are joined; otherwise they are dropped."""
        if not wait:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
        for _ in self.threads:
            self.queue.put(None)
        if wait:
            for t in self.threads:
                t.join()


class Executor:
    """Runs jobs in the right place and reports their outcomes."""

    def __init__(
        self,
        settings: ExecutorSettings,
        registry: TaskRegistry,
        wake: Callable[[], None],
        watch: Callable[[int], None],
        unwatch: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.wake = wake
        self.clock = clock
        self.slots = {Kind.CPU: settings.cpu, Kind.IO: settings.io, Kind.CMD: settings.cmd}
        # io threads may have jobs queued a little ahead so they never idle between two;
        # cpu children hold up to procpool.DEPTH calls each (see _feed_cpu)
        self.depth = {Kind.CPU: settings.cpu * 2, Kind.IO: settings.io * 2, Kind.CMD: settings.cmd}
        # tiny cpu tasks share pool calls; a chunk counts once against the depth
        self.pacer = Pacer(settings.cpu > 0 and settings.max_tasks_per_child is None, settings.cpu)
        self.waiting: dict[Kind, deque[Job]] = {k: deque() for k in Kind}
        self.active: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.jobs: dict[bytes, Job] = {}
        self.held: dict[Kind, int] = dict.fromkeys(Kind, 0)  # abandoned io threads still running
        self.outcomes: queue.SimpleQueue[tuple[Job, Outcome]] = queue.SimpleQueue()
        self._poked = False  # a wake-up is on its way and the main thread has not looked yet
        self.reports: list[Report] = []
        self._lock = threading.Lock()
        self.cpu_pool = (
            ChildPool(
                settings.cpu,
                settings.modules,
                settings.log_level,
                settings.max_tasks_per_child,
                watch,
                unwatch,
                clock,
            )
            if settings.cpu > 0
            else None
        )
        self.io_lane = ThreadLane("io", settings.io, self._run_io, self._landed) if settings.io > 0 else None
        self.cmd_lane = (
            ThreadLane("cmd", settings.cmd, self._run_cmd, self._landed) if settings.cmd > 0 else None
        )

    # -- intake ----------------------------------------------------------------
    def submit(self, job: Job) -> None:
        old = self.jobs.get(job.id)
        if old is not None and not old.done:
            if old.attempt >= job.attempt:
                return  # duplicate dispatch of an attempt we already hold
            self._abandon(old)
        self.jobs[job.id] = job
        if self.depth[job.kind] <= 0:
            self._fail_no_slots(job)  # no slots of this kind (cmd not allowed, io 0)
            return
        self.waiting[job.kind].append(job)
        self._feed(job.kind)

    def _feed(self, kind: Kind) -> None:
        if kind is Kind.CPU:
            self._feed_cpu()
            return
        waiting = self.waiting[kind]
        lane = self.io_lane if kind is Kind.IO else self.cmd_lane
        while waiting and self.active[kind] + self.held[kind] < self.depth[kind]:
            job = waiting.popleft()
            if job.done:
                continue
            if lane is None:
                self._fail_no_slots(job)
                continue
            self.active[kind] += 1
            job.in_pool = True
            if kind is Kind.CMD:
                job.started_at = self.clock()
            lane.put(job)

    def _feed_cpu(self) -> None:
        pool = self.cpu_pool
        waiting = self.waiting[Kind.CPU]
        if pool is None:
            while waiting:
                self._fail_no_slots(waiting.popleft())
            return
        while waiting:
            job = waiting[0]
            if job.done:
                waiting.popleft()
                continue
            child = pool.pick(len(job.payload))
            if child is None:
                return
            waiting.popleft()
            jobs = self.pacer.take(job, waiting)
            call = Call(jobs, [(j.id, j.attempt, j.name, j.payload) for j in jobs])
            if not pool.send(child, call):
                waiting.extendleft(reversed(jobs))
                continue
            self.active[Kind.CPU] += 1
            for j in jobs:
                j.in_pool = True
                j.child = child
                j.chunked = len(jobs) > 1

    def _fail_no_slots(self, job: Job) -> None:
        self._report(
            job,
            TaskState.FAILED.value,
            error={
                "type": "NoSlots",
                "message": f"this worker has no {job.kind.value} slots",
                "traceback": "",
            },
        )

    def _run_io(self, job: Job) -> Outcome:
        """In an io thread. io jobs queue for the threads (depth 2 x slots), so a thread
        that finishes one starts the next at once: the start, and the timeout, count from here."""
        with self._lock:
            if job.done:  # cancelled while queued: its report is made, do not run it
                return (TaskState.CANCELLED.value, None, None, 0.0)
            job.started_at = self.clock()
        return execute(self.registry, job.id, job.attempt, job.name, job.payload)

    def _run_cmd(self, job: Job) -> Outcome:
        def on_start(proc: subprocess.Popen[bytes]) -> bool:
            with self._lock:
                job.popen = proc
                return not job.cancelled

        return run_command(
            job.payload, self.settings.allow_cmd, self.settings.cmd_env, job.timeout_s, on_start
        )

    # -- outcomes ----------------------------------------------------------------
    def _landed(self, job: Job, outcome: Outcome) -> None:
        """In an io or cmd thread: hand the outcome to the main thread."""
        self.outcomes.put((job, outcome))
        if not self._poked:
            self._poked = True
            self.wake()

    def readable(self, fd: int) -> None:
        """The main loop saw a pool child's pipe readable: take its answers (or its death)."""
        if self.cpu_pool is None:
            return
        for ev in self.cpu_pool.read(fd):
            if isinstance(ev, Death):
                self._on_death(ev)
                continue
            self.active[Kind.CPU] -= 1
            for job, (state, value, error, duration_ms) in zip(ev.call.refs, ev.outcomes, strict=True):
                self.pacer.observe(job.name, duration_ms)
                job.in_pool = False
                if not job.done:
                    self._report(job, state, value, error, duration_ms)
            # a job cancelled while it waited in this child's pipe is its running one now
            nxt = ev.child.calls[0] if ev.child.calls else None
            if nxt is not None and not ev.child.doomed and all(j.done for j in nxt.refs):
                self.cpu_pool.kill(ev.child)
        self._feed_cpu()

    def _on_death(self, ev: Death) -> None:
        calls = ([ev.running] if ev.running is not None else []) + ev.queued
        self.active[Kind.CPU] -= len(calls)
        for call in calls:
            for job in call.refs:
                job.in_pool = False
                job.child = None
        # calls that never started go back to the front of the queue, in order
        requeue = [j for call in ev.queued for j in call.refs if not j.done]
        if ev.running is not None:
            live = [j for j in ev.running.refs if not j.done]
            if len(ev.running.refs) > 1:
                # a chunk: run its jobs again, each alone, so the death is pinned on its cause
                for j in live:
                    j.solo = True
                requeue = live + requeue
            elif live:
                job = live[0]
                reason = (
                    f"pool child pid {ev.child.pid} died ({signal_name(ev.exitcode)}) while running the task"
                )
                log.warning(
                    "pool_child_died",
                    task_id=format_id(job.id),
                    task_name=job.name,
                    attempt=job.attempt,
                    pid=ev.child.pid,
                    exitcode=ev.exitcode,
                )
                self._report(
                    job,
                    TaskState.FAILED.value,
                    error={"type": "ChildDied", "message": reason, "traceback": ""},
                    lost=True,
                )
        for j in requeue:
            j.chunked = False
        self.waiting[Kind.CPU].extendleft(reversed(requeue))

    def collect(self) -> list[Report]:
        """Outcomes that landed, plus reports made by timeouts, deaths and cancels."""
        self._poked = False  # before the queue is read: a thread putting from now on pokes again
        fed: set[Kind] = set()
        while True:
            try:
                job, (state, value, error, duration_ms) = self.outcomes.get_nowait()
            except queue.Empty:
                break
            job.in_pool = False
            self.active[job.kind] -= 1
            if job.holds_slot:
                job.holds_slot = False
                self.held[job.kind] -= 1
            fed.add(job.kind)
            if job.done:
                continue  # already reported (timed out, cancelled or lost): late result dropped
            self._report(job, state, value, error, duration_ms)
        for kind in fed:
            self._feed(kind)
        reports, self.reports = self.reports, []
        return reports

    def _report(
        self,
        job: Job,
        state: str,
        value: bytes | None = None,
        error: dict[str, Any] | None = None,
        duration_ms: float | None = None,
        lost: bool = False,
    ) -> None:
        job.done = True
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self.reports.append(Report(job.id, job.attempt, state, value, error, duration_ms, lost))

    def check(self) -> None:
        """Enforce timeouts (call every ~50 ms); deaths of pool children show on their pipes."""
        now = self.clock()
        if self.cpu_pool is not None:
            for child, call in list(self.cpu_pool.running()):
                job = call.refs[0]
                if (
                    len(call.refs) == 1
                    and job.timeout_s
                    and not job.done
                    and child.started_at is not None
                    and now - child.started_at > job.timeout_s
                ):
                    self._report(
                        job,
                        TaskState.TIMED_OUT.value,
                        error={
                            "type": "TimeoutError",
                            "traceback": "",
                            "message": f"task ran longer than {job.timeout_s} s; its pool child was "
                            "killed and replaced",
                        },
                    )
                    self.cpu_pool.kill(child)
        for job in list(self.jobs.values()):
            if (
                job.kind is Kind.IO
                and not job.done
                and job.in_pool
                and job.started_at is not None
                and job.timeout_s
                and now - job.started_at > job.timeout_s
            ):
                self._abandon(
                    job,
                    TaskState.TIMED_OUT,
                    f"io task ran longer than {job.timeout_s} s; "
                    "its thread cannot be stopped and keeps its slot until it returns",
                )

    def _abandon(self, job: Job, state: TaskState = TaskState.CANCELLED, message: str = "") -> None:
        """Report an io job now; its thread keeps running and its slot stays held."""
        self._report(
            job,
            state.value,
            error={
                "type": "TimeoutError" if state is TaskState.TIMED_OUT else "Cancelled",
                "message": message,
                "traceback": "",
            },
        )
        if job.in_pool and job.kind is Kind.IO:
            job.holds_slot = True  # released when the thread finally returns
            self.held[Kind.IO] += 1

    def cancel(self, task_id: bytes, attempt: int) -> bool:
        """Cancel a job by kind: drop if waiting, kill if cpu or cmd, abandon if io."""
        job = self.jobs.get(task_id)
        if job is None or job.attempt != attempt or job.done:
            return False
        msg = "cancelled by request"
        if not job.in_pool:
            self._report(
                job, TaskState.CANCELLED.value, error={"type": "Cancelled", "message": msg, "traceback": ""}
            )
        elif job.kind is Kind.CPU:
            self._report(
                job,
                TaskState.CANCELLED.value,
                error={"type": "Cancelled", "message": msg + "; its pool child was killed", "traceback": ""},
            )
            child = job.child
            # a running single call: kill its child now. A call still waiting in the child's
            # pipe is killed when it starts (see readable); a chunk of tiny tasks runs out.
            if (
                child is not None
                and self.cpu_pool is not None
                and not job.chunked
                and child.calls
                and child.calls[0].refs[0] is job
            ):
                self.cpu_pool.kill(child)
        elif job.kind is Kind.CMD:
            with self._lock:
                job.cancelled = True
                proc = job.popen
            if proc is not None:
                kill_group(proc)
            self._report(
                job,
                TaskState.CANCELLED.value,
                error={
                    "type": "Cancelled",
                    "message": msg + "; its process group was killed",
                    "traceback": "",
                },
            )
        else:
            self._abandon(job, TaskState.CANCELLED, msg + "; the io thread runs on, its result is discarded")
        return True

    # -- state for the master ----------------------------------------------------
    def holding(self) -> list[dict[str, Any]]:
        return [{"id": j.id, "attempt": j.attempt} for j in self.jobs.values() if not j.done]

    def busy(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.done)

    def take_waiting(self) -> list[Job]:
        """Remove and return jobs not yet handed to a pool (for a drain)."""
        out: list[Job] = []
        for kind in Kind:
            while self.waiting[kind]:
                job = self.waiting[kind].popleft()
                if not job.done:
                    job.done = True
                    self.jobs.pop(job.id, None)
                    out.append(job)
        return out

    def held_wire(self) -> dict[str, int]:
        return {k.value: n for k, n in self.held.items() if n}

    def close(self, wait: bool) -> None:
        """Stop the pools: ``wait`` lets running work end, otherwise everything is killed."""
        for job in list(self.jobs.values()):
            if job.kind is Kind.CMD and job.popen is not None and not wait:
                kill_group(job.popen)
        if self.cpu_pool is not None:
            self.cpu_pool.close(wait)
        for lane in (self.io_lane, self.cmd_lane):
            if lane is not None:
                lane.close(wait)


def _crash(exc: BaseException) -> Outcome:
    """A failure of the pool machinery itself (not of the task)."""
    from poolfleet.worker.runner import error_map

    return (TaskState.FAILED.value, None, error_map(exc), 0.0)
