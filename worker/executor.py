"""The worker's executor: a process pool (cpu), a thread pool (io), subprocesses (cmd).

Only the worker's main thread calls the methods of :class:`Executor`. The cpu
pool's results are read by the main thread itself (:class:`DirectPool`, when its
result pipe is readable), and their callbacks run there; the io and cmd thread
pools' callbacks run on those pools' result threads, and only put the outcome on
a queue and poke a wake-up pipe the main loop polls.
"""

from __future__ import annotations

import fcntl
import functools
import multiprocessing
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from typing import Any

import structlog

from poolfleet.common.ids import format_id
from poolfleet.common.protocol import Kind, TaskState
from poolfleet.worker.capture import DEFAULT_MAX_OUTPUT, TaskCapture, install
from poolfleet.worker.cmdrun import kill_group, run_command
from poolfleet.worker.pacing import Chunk, Pacer
from poolfleet.worker.quietpool import DirectPool
from poolfleet.worker.registry import TaskRegistry
from poolfleet.worker.runner import Outcome, execute, init_child, run_chunk_in_child, run_in_child
from poolfleet.worker.teardown import (
    descendants,
    kill_refs,
    sigterm_blocked,
    stop_forkserver,
    stop_process_pool,
    stop_resource_tracker,
)

log = structlog.get_logger("pworker")

#: A pool child found dead gets this long for its last result to arrive before the task counts as lost.
DEATH_GRACE_S = 0.5


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
    pid: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    done: bool = False
    cancelled: bool = False
    dead_since: float | None = None
    in_pool: bool = False
    holds_slot: bool = False
    chunk: Chunk | None = None  # shares a pool call with other tiny jobs (see pacing)
    solo: bool = False  # never chunked again (its chunk's child died)
    start_told: bool = False  # the master was told it started
    #: a shipped function's (hash, pickle), passed with the call (see poolfleet.worker.shipped)
    code: tuple[bytes, bytes] | None = None
    parked: bool = False  # waiting for its shipped function to arrive from the master
    capture: TaskCapture | None = None  # an io task's output and progress (see capture.py)


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
    extra: dict[str, Any] | None = None  # output, output_end, progress

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
        if self.extra:
            d.update(self.extra)
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
    allow_cmd_env: frozenset[str] = frozenset()
    max_task_output: int = DEFAULT_MAX_OUTPUT


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown cause"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class Executor:
    """Runs jobs on the right pool and reports outcomes through ``wake``."""

    def __init__(
        self,
        settings: ExecutorSettings,
        registry: TaskRegistry,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.wake = wake
        self.clock = clock
        self.slots = {Kind.CPU: settings.cpu, Kind.IO: settings.io, Kind.CMD: settings.cmd}
        # pool children may be queued a little ahead so they never idle between tasks
        self.depth = {Kind.CPU: settings.cpu * 2, Kind.IO: settings.io * 2, Kind.CMD: settings.cmd}
        # tiny cpu tasks share pool calls; a chunk counts once against the depth
        self.pacer = Pacer(settings.cpu > 0 and settings.max_tasks_per_child is None, settings.cpu)
        self._exits: dict[int, int | None] = {}  # exit codes looked up during one check()
        self.waiting: dict[Kind, deque[Job]] = {k: deque() for k in Kind}
        self.active: dict[Kind, int] = dict.fromkeys(Kind, 0)
        self.jobs: dict[bytes, Job] = {}
        self.held: dict[Kind, int] = dict.fromkeys(Kind, 0)  # abandoned io threads still running
        self.outcomes: queue.SimpleQueue[tuple[Job, Outcome]] = queue.SimpleQueue()
        self._poked = False  # a wake-up is on its way and the main loop has not looked yet
        self.reports: list[Report] = []
        #: output and progress of running tasks, for the master (TASK_UPDATE entries)
        self.updates: list[dict[str, Any]] = []
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()  # job fields io and cmd threads read or set
        # cpu jobs cancelled while still queued in the pool: their child is killed once it starts
        # them (main thread only, like the start notices that tell when)
        self._doomed: dict[bytes, Job] = {}
        self.cpu_pool: DirectPool | None = None
        self._closed = False
        self._started_r: Any = None
        self._started_w: Any = None
        self._notices_ready: select.poll | None = None
        if settings.cpu > 0:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["poolfleet.worker.runner", *settings.modules])
            # Start notices go through a plain pipe with no lock: each notice is one write
            # below PIPE_BUF, so it is atomic. A lock (as in multiprocessing's queues) would
            # stay taken for ever if we killed a child while it held it, hanging every child.
            # The main loop reads them every turn (see _read_notices); the pipe is made big,
            # so that children never wait on it at a task's start.
            self._started_r, self._started_w = ctx.Pipe(duplex=False)
            self._notices_ready = select.poll()  # one poll object: Connection.poll builds a selector per call
            self._notices_ready.register(self._started_r.fileno(), select.POLLIN)
            try:
                fcntl.fcntl(self._started_w.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
            except (AttributeError, OSError):
                pass  # not Linux, or above the system's limit: the default size still works
            with sigterm_blocked():  # the forkserver and the pool's threads keep it blocked
                self.cpu_pool = DirectPool(
                    settings.cpu,
                    initializer=init_child,
                    initargs=(
                        settings.modules,
                        self._started_w,
                        settings.log_level,
                        settings.max_task_output,
                    ),
                    maxtasksperchild=settings.max_tasks_per_child,
                    context=ctx,
                )
        if settings.io > 0:
            install()  # io tasks' prints and log records go to their captures
        self.io_pool = ThreadPool(settings.io) if settings.io > 0 else None
        self.cmd_pool = ThreadPool(settings.cmd) if settings.cmd > 0 else None

    # -- intake ----------------------------------------------------------------
    def _take(self, job: Job) -> bool:
        """Hold ``job``; False for a duplicate dispatch of an attempt already held."""
        old = self.jobs.get(job.id)
        if old is not None and not old.done:
            if old.attempt >= job.attempt:
                return False
            self._abandon(old)
        self.jobs[job.id] = job
        return True

    def park(self, job: Job) -> bool:
        """Hold ``job`` until its shipped function arrives (:meth:`unpark`): it is held (the
        master hears of it, a cancel ends it) but not queued; False for a duplicate."""
        if not self._take(job):
            return False
        job.parked = True
        return True

    def unpark(self, job: Job, code: tuple[bytes, bytes] | None, error: dict[str, Any] | None = None) -> None:
        """The shipped function of a parked job arrived (``code``), or cannot (``error``)."""
        if job.done or not job.parked or self.jobs.get(job.id) is not job:
            return  # cancelled meanwhile, or replaced by a later attempt
        job.parked = False
        if error is not None:
            self._report(job, TaskState.FAILED.value, error=error)
            return
        job.code = code
        self._queue(job)

    def submit(self, job: Job) -> None:
        if self._take(job):
            self._queue(job)

    def _queue(self, job: Job) -> None:
        if self.depth[job.kind] <= 0:
            self._start(job)  # no slots of this kind (cmd not allowed, io 0): fails it with NoSlots
            return
        self.waiting[job.kind].append(job)
        self._feed(job.kind)

    def _feed(self, kind: Kind) -> None:
        waiting = self.waiting[kind]
        while waiting and self.active[kind] + self.held[kind] < self.depth[kind]:
            job = waiting.popleft()
            if job.done:
                continue
            if kind is Kind.CPU and self.cpu_pool is not None:
                batch = self.pacer.take(job, waiting)
                if len(batch) > 1:
                    self._start_chunk(batch)
                    continue
            self._start(job)

    def _start(self, job: Job) -> None:
        self.active[job.kind] += 1
        job.in_pool = True
        if job.kind is Kind.CPU and self.cpu_pool is not None:
            self.cpu_pool.send(
                run_in_child,
                (job.id, job.attempt, job.name, job.payload, job.code),
                functools.partial(self._landed, job),
                functools.partial(self._crashed, job),
            )
        elif job.kind is Kind.IO and self.io_pool is not None:
            self.io_pool.apply_async(
                self._run_io,
                (job,),
                callback=functools.partial(self._landed, job),
                error_callback=functools.partial(self._crashed, job),
            )
        elif job.kind is Kind.CMD and self.cmd_pool is not None:
            job.started_at = self.clock()
            self.cmd_pool.apply_async(
                self._run_cmd,
                (job,),
                callback=functools.partial(self._landed, job),
                error_callback=functools.partial(self._crashed, job),
            )
        else:
            self.active[job.kind] -= 1
            job.in_pool = False
            self._report(
                job,
                TaskState.FAILED.value,
                error={
                    "type": "NoSlots",
                    "message": f"this worker has no {job.kind.value} slots",
                    "traceback": "",
                },
            )

    def _start_chunk(self, jobs: list[Job]) -> None:
        """Tiny cpu jobs in one pool call: one start notice, outcomes back together."""
        if self.cpu_pool is None:
            raise RuntimeError("no process pool")
        chunk = Chunk(len(jobs))
        self.active[Kind.CPU] += 1
        for job in jobs:
            job.in_pool = True
            job.chunk = chunk
        self.cpu_pool.send(
            run_chunk_in_child,
            ([(j.id, j.attempt, j.name, j.payload, j.code) for j in jobs],),
            functools.partial(self._landed_chunk, jobs),
            functools.partial(self._crashed_chunk, jobs),
        )

    def _run_io(self, job: Job) -> Outcome:
        """In a pool thread. io jobs queue in the thread pool (depth 2 x slots), so a thread
        that finishes one starts the next at once: the start, and the timeout, count from here."""
        with self._lock:
            if job.done:  # cancelled while queued: its report is made, do not run it
                return (TaskState.CANCELLED.value, None, None, 0.0, None)
            job.started_at = self.clock()
            job.capture = TaskCapture(job.id, job.attempt, self.settings.max_task_output)
        return execute(self.registry, job.id, job.attempt, job.name, job.payload, job.code, job.capture)

    def _run_cmd(self, job: Job) -> Outcome:
        def on_start(proc: subprocess.Popen[bytes]) -> bool:
            with self._lock:
                job.popen = proc
                return not job.cancelled

        return run_command(
            job.payload,
            self.settings.allow_cmd,
            self.settings.cmd_env,
            job.timeout_s,
            on_start,
            self.settings.allow_cmd_env,
        )

    # -- outcomes (pool threads) ------------------------------------------------
    def _crashed(self, job: Job, exc: BaseException) -> None:
        self._landed(job, _crash(exc))

    def _landed(self, job: Job, outcome: Outcome) -> None:
        self.outcomes.put((job, outcome))
        self._poke()

    def _landed_chunk(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        for job, outcome in zip(jobs, outcomes, strict=True):
            self.outcomes.put((job, outcome))
        self._poke()

    def _poke(self) -> None:
        """Wake the main loop, once until it has looked: a burst of io results (50 threads
        ending a wave together) costs one wake-up and one system call, not fifty."""
        if not self._poked:
            self._poked = True
            self.wake()

    def _crashed_chunk(self, jobs: list[Job], exc: BaseException) -> None:
        self._landed_chunk(jobs, [_crash(exc)] * len(jobs))

    def _read_notices(self) -> None:
        """Apply the start notices the children wrote (main thread; called every loop turn).

        Read here rather than by a thread of their own: a thread waking for every task start
        took the GIL from the pool's result thread on the path of every result. Each notice
        carries the child's own clock reading (CLOCK_MONOTONIC is one clock for the host).
        """
        conn, ready = self._started_r, self._notices_ready
        if conn is None or ready is None:
            return
        while ready.poll(0):
            try:
                item = conn.recv()
            except (EOFError, OSError):
                return
            if item[0] == "u":  # ("u", task_id, attempt, update): output or progress of a task
                self._child_update(item[1], item[2], item[3])
                continue
            # (task_id, attempt, pid, t) from a single call, ([(task_id, attempt), ...], pid, t) from a chunk
            refs, pid, t = ([(item[0], item[1])], item[2], item[3]) if len(item) == 4 else item
            for task_id, attempt in refs:
                job = self.jobs.get(task_id) or self._doomed.get(task_id)
                if job is not None and job.attempt == attempt and (not job.done or job.id in self._doomed):
                    job.pid = pid
                    job.started_at = t

    def _child_update(self, task_id: bytes, attempt: int, update: dict[str, Any]) -> None:
        job = self.jobs.get(task_id)
        if job is not None and job.attempt == attempt and not job.done:
            self.updates.append({"id": task_id, "attempt": attempt, **update})

    def take_updates(self) -> list[dict[str, Any]]:
        """Output and progress of running tasks since the last call (TASK_UPDATE entries)."""
        now = self.clock()
        for job in self.jobs.values():
            cap = job.capture
            if cap is not None and not job.done and not cap.closed:
                update = cap.take_update(now)
                if update is not None:
                    self.updates.append({"id": job.id, "attempt": job.attempt, **update})
        updates, self.updates = self.updates, []
        return updates

    # -- main thread -------------------------------------------------------------
    @property
    def result_fd(self) -> int | None:
        """The cpu pool's result pipe: the main loop wakes when it is readable and calls
        :meth:`collect`, which reads it."""
        return self.cpu_pool.result_fd if self.cpu_pool is not None else None

    def collect(self) -> list[Report]:
        """Outcomes that landed, plus reports made by timeouts, deaths and cancels."""
        self._read_notices()
        if self.cpu_pool is not None:
            self._poked = True  # the callbacks run here, on this thread, need not wake it
            self.cpu_pool.read_results()
        self._poked = False  # before the queue is read: what lands from now on pokes again
        while True:
            try:
                job, (state, value, error, duration_ms, extra) = self.outcomes.get_nowait()
            except queue.Empty:
                break
            if job.kind is Kind.CPU:
                self.pacer.observe(job.name, duration_ms)
            self._release(job)
            if job.done:
                continue  # already reported (timed out, cancelled or lost): late result dropped
            self._report(job, state, value, error, duration_ms, extra=extra)
        reports, self.reports = self.reports, []
        return reports

    def _release(self, job: Job) -> None:
        if job.in_pool:
            job.in_pool = False
            if job.chunk is None or job.chunk.release():
                self.active[job.kind] -= 1
            if job.holds_slot:
                job.holds_slot = False
                self.held[job.kind] -= 1
            self._feed(job.kind)

    def _report(
        self,
        job: Job,
        state: str,
        value: bytes | None = None,
        error: dict[str, Any] | None = None,
        duration_ms: float | None = None,
        lost: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        job.done = True
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        if extra is None and job.capture is not None:  # timed out, cancelled: what it wrote so far
            extra = job.capture.final()
        self.reports.append(Report(job.id, job.attempt, state, value, error, duration_ms, lost, extra))

    def check(self) -> None:
        """Enforce timeouts and notice dead pool children (call every ~100 ms)."""
        self._read_notices()
        now = self.clock()
        self._exits = {}
        if self.cpu_pool is not None:
            for proc in list(getattr(self.cpu_pool, "_pool", [])):
                self._procs[proc.pid] = proc
        for job in list(self.jobs.values()):
            if job.done or not job.in_pool or job.started_at is None:
                continue
            if job.kind is Kind.CPU:
                self._check_cpu(job, now)
            elif job.kind is Kind.IO and job.timeout_s and now - job.started_at > job.timeout_s:
                self._abandon(
                    job,
                    TaskState.TIMED_OUT,
                    f"io task ran longer than {job.timeout_s} s; "
                    "its thread cannot be stopped and keeps its slot until it returns",
                )
        if self._doomed:
            self._kill_doomed()
        if self.cpu_pool is not None and self.cpu_pool.repair(now):
            log.warning(
                "pool_lock_released",
                reason="a killed pool child left a pipe's lock taken (tasks or results); released it",
            )
        if len(self._procs) > 4 * max(1, self.settings.cpu) + 16:
            live = {p.pid for p in getattr(self.cpu_pool, "_pool", [])}
            self._procs = {pid: p for pid, p in self._procs.items() if pid in live}

    def _kill_doomed(self) -> None:
        """Kill the child that started a job cancelled while it was queued in the pool."""
        if self.cpu_pool is not None and self.cpu_pool.result_in_flight():
            return  # a child is writing a result: no kill until it is done (next check)
        for job in list(self._doomed.values()):
            if job.in_pool and job.pid is None:
                continue  # not started yet
            del self._doomed[job.id]
            if not job.in_pool:
                continue  # its (discarded) result came back first
            # a later job started in that child means it finished this one: leave it be
            if not any(j.pid == job.pid and not j.done for j in self.jobs.values()):
                if job.pid is not None:
                    self._kill_child(job.pid)
                self._release(job)

    def _check_cpu(self, job: Job, now: float) -> None:
        if job.pid is None or job.started_at is None:
            return
        if job.timeout_s and now - job.started_at > job.timeout_s:
            if self.cpu_pool is not None and self.cpu_pool.result_in_flight():
                return  # a child is writing a result: the kill waits for the next check
            self._kill_child(job.pid)
            self._report(
                job,
                TaskState.TIMED_OUT.value,
                error={
                    "type": "TimeoutError",
                    "traceback": "",
                    "message": f"task ran longer than {job.timeout_s} s; its pool child was killed "
                    "and replaced",
                },
            )
            self._release(job)
            return
        proc = self._procs.get(job.pid)
        if job.pid not in self._exits:  # one look per child and check (chunks share children)
            self._exits[job.pid] = proc.exitcode if proc is not None else None
        exitcode = self._exits[job.pid]
        alive = proc is not None and exitcode is None
        if alive:
            return
        if job.dead_since is None:
            job.dead_since = now
            return
        if now - job.dead_since < DEATH_GRACE_S:
            return
        if job.chunk is not None:
            self._rerun_alone(job)
            return
        reason = f"pool child pid {job.pid} died ({signal_name(exitcode)}) while running the task"
        log.warning(
            "pool_child_died",
            task_id=format_id(job.id),
            task_name=job.name,
            attempt=job.attempt,
            pid=job.pid,
            exitcode=exitcode,
        )
        self._report(
            job,
            TaskState.FAILED.value,
            error={"type": "ChildDied", "message": reason, "traceback": ""},
            lost=True,
        )
        self._release(job)

    def _rerun_alone(self, job: Job) -> None:
        """A child died under a chunk: run the job again alone, so the death is pinned on its cause."""
        if job.in_pool and job.chunk is not None:
            job.in_pool = False
            if job.chunk.release():
                self.active[job.kind] -= 1
        job.chunk = None
        job.solo = True
        job.pid = job.started_at = job.dead_since = None
        self.waiting[job.kind].appendleft(job)
        self._feed(job.kind)

    def _kill_child(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

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

    def cancel(self, task_id: bytes, attempt: int, if_not_started: bool = False) -> bool:
        """Cancel a job by kind: drop if waiting, kill if cpu or cmd, abandon if io.

        With ``if_not_started`` a job a slot has started is left alone (False), decided on the
        same reading of the start notices as the cancel itself."""
        self._read_notices()  # which child runs it, if it started
        job = self.jobs.get(task_id)
        if job is None or job.attempt != attempt or job.done:
            return False
        if if_not_started and job.started_at is not None:
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
            if job.pid is not None or job.chunk is None:
                # killed by _kill_doomed, now or at the next check: not while a child writes a
                # result (a child killed then, this one having just returned, would leave the
                # result pipe's lock taken); one not started yet is killed once it starts (the
                # pool cannot take it back)
                self._doomed[job.id] = job
                if job.pid is not None:
                    self._kill_doomed()
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

    def started(self, task_id: bytes, attempt: int) -> bool:
        """Whether a slot has started this job and it is still running (as last read)."""
        job = self.jobs.get(task_id)
        return job is not None and job.attempt == attempt and not job.done and job.started_at is not None

    # -- state for the master ----------------------------------------------------
    def holding(self) -> list[dict[str, Any]]:
        return [{"id": j.id, "attempt": j.attempt} for j in self.jobs.values() if not j.done]

    def newly_started(self, min_run_s: float = 0.0) -> list[dict[str, Any]]:
        """Jobs a slot started (at least ``min_run_s`` ago) that the master was not told of."""
        self._read_notices()
        now = self.clock()
        out: list[dict[str, Any]] = []
        for j in self.jobs.values():
            if (
                not j.done
                and not j.start_told
                and j.started_at is not None
                and now - j.started_at >= min_run_s
            ):
                j.start_told = True
                out.append({"id": j.id, "attempt": j.attempt})
        return out

    def take_back(self, refs: list[tuple[bytes, int]]) -> list[Job]:
        """Remove and return the jobs of ``refs`` not yet handed to a pool (a recall)."""
        wanted = set(refs)
        out: list[Job] = []
        for kind in Kind:
            waiting = self.waiting[kind]
            if not waiting:
                continue
            keep: deque[Job] = deque()
            for job in waiting:
                if (job.id, job.attempt) in wanted and not job.done:
                    job.done = True
                    self.jobs.pop(job.id, None)
                    out.append(job)
                else:
                    keep.append(job)
            self.waiting[kind] = keep
        return out

    def busy(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.done)

    def running(self) -> int:
        return sum(self.active.values())

    def take_waiting(self) -> list[Job]:
        """Remove and return jobs not yet handed to a pool (for a drain)."""
        out: list[Job] = [j for j in self.jobs.values() if j.parked and not j.done]
        for job in out:
            job.done = True
            del self.jobs[job.id]
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

    def close(self, budget_s: float = 0.6) -> None:
        """Stop everything this executor started, within about ``budget_s`` seconds.

        Called once the drain is over, so whatever still runs is abandoned: cmd process
        groups and pool children are killed, the forkserver and the resource tracker are
        ended and reaped, and no process of the worker outlives it. io threads cannot be
        killed; they are daemon threads and end with the process.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + budget_s
        tree = descendants()  # before the forkserver goes: its children are then reparented
        for job in list(self.jobs.values()):
            if job.kind is Kind.CMD:
                with self._lock:
                    job.cancelled = True  # a program about to start is killed by on_start
                    proc = job.popen
                if proc is not None:
                    kill_group(proc)
        for pool in (self.io_pool, self.cmd_pool):
            if pool is not None:
                pool.terminate()  # threads only: no lock a dead process could hold
        if self.cpu_pool is not None:
            stop_process_pool(self.cpu_pool, deadline)
            tree += descendants()  # anything the pool started meanwhile, while it is still ours
            stop_forkserver(deadline)
        stop_resource_tracker(deadline)
        left = kill_refs(tree)
        if left:
            log.warning("worker_processes_killed", count=left, reason="still running at shutdown")


def _crash(exc: BaseException) -> Outcome:
    """A failure of the pool machinery itself (not of the task)."""
    from poolfleet.worker.runner import error_map

    return (TaskState.FAILED.value, None, error_map(exc), 0.0, None)
