"""Task records and the outcome decisions (pure logic, injected clock and randomness).

PENDING -> DISPATCHED(worker, attempt) -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | TIMED_OUT,
with DISPATCHED -> PENDING when a worker hands an unstarted task back, and DISPATCHED/RUNNING
-> PENDING on retry, lost worker or dead child. The master core (core.py) applies them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from poolfleet.common.protocol import Kind, TaskState


@dataclass(slots=True)
class TaskRecord:
    """A task the master still has to finish (finished tasks live only in the journal)."""

    id: bytes
    name: str
    queue: str
    kind: Kind
    payload: bytes
    timeout_s: float | None  # the client's; None: each worker's own declared default
    retries: int | None  # the client's; None: the declared default of the worker that ran it
    created_at: float  # wall clock, for people and the journal
    state: TaskState = TaskState.PENDING
    attempt: int = 0
    worker: bytes | None = None
    failures: int = 0
    lost: int = 0
    not_before: float = 0.0  # monotonic
    dispatched_at: float = 0.0  # monotonic
    cancel: bool = False
    #: the cancel asked only if no slot has started it: a STARTED withdraws it
    cancel_unless_started: bool = False
    recalled: bool = False
    planned: int = 0  # the scheduler's round that last planned it
    seq: int = 0  # the scheduler's order among ready tasks
    route: str = ""  # the name a worker must offer to get it (its own, or a chunk's function)
    priority: int = 0  # higher goes first within its queue and kind

    def __post_init__(self) -> None:
        if not self.route:
            self.route = self.name


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, and the poison-task guard."""

    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    max_lost: int = 3

    def delay_s(self, failures: int, rng: random.Random) -> float:
        """Backoff before the next attempt after ``failures`` failures (full jitter, halved)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, failures - 1)))
        return float(ceiling * (0.5 + rng.random() / 2))


@dataclass(frozen=True, slots=True)
class Finish:
    """The task reached a final state."""

    state: TaskState
    value: bytes | None = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Requeue:
    """The task goes back to PENDING, eligible again at ``not_before``."""

    not_before: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Stale:
    """The result belongs to an attempt that is no longer current (fencing): drop it."""

    reason: str = field(default="stale attempt")


Decision = Finish | Requeue | Stale


def start(rec: TaskRecord, worker: bytes, now: float) -> int:
    """PENDING -> DISPATCHED on ``worker``; return the new attempt number."""
    if rec.state is not TaskState.PENDING:
        raise ValueError(f"cannot start (dispatch) a task in state {rec.state}")
    rec.state = TaskState.DISPATCHED
    rec.attempt += 1
    rec.worker = worker
    rec.dispatched_at = now
    rec.recalled = False
    return rec.attempt


def on_result(
    rec: TaskRecord,
    attempt: int,
    state: TaskState,
    value: bytes | None,
    error: dict[str, Any] | None,
    child_lost: bool,
    policy: RetryPolicy,
    now: float,
    rng: random.Random,
    retries: int | None = None,
) -> Decision:
    """Decide what a result reported by a worker does to the task.

    ``retries`` is the default of the worker that ran it, for a task whose client set none.
    """
    if not rec.state.at_worker or attempt != rec.attempt:
        return Stale(f"task is {rec.state} at attempt {rec.attempt}, result is for attempt {attempt}")
    if state is TaskState.SUCCEEDED:
        return Finish(TaskState.SUCCEEDED, value=value)
    if state in (TaskState.CANCELLED, TaskState.TIMED_OUT):
        return Finish(state, error=error)
    # FAILED, possibly because the pool child died under the task
    if child_lost:
        rec.lost += 1
        if rec.lost > policy.max_lost:
            return Finish(TaskState.FAILED, error=_poison(rec, error, policy.max_lost))
    rec.failures += 1
    allowed = rec.retries if rec.retries is not None else (retries or 0)
    if rec.failures <= allowed:
        return Requeue(now + policy.delay_s(rec.failures, rng), reason="retry")
    return Finish(TaskState.FAILED, error=error)


def on_worker_lost(rec: TaskRecord, policy: RetryPolicy, now: float) -> Decision:
    """The worker running the task vanished: requeue, unless the task is poison."""
    if not rec.state.at_worker:
        return Stale("task is not at a worker")
    rec.lost += 1
    if rec.lost > policy.max_lost:
        return Finish(TaskState.FAILED, error=_poison(rec, None, policy.max_lost))
    return Requeue(now, reason="worker lost")


def requeue(rec: TaskRecord, decision: Requeue) -> None:
    """Apply a Requeue decision."""
    rec.state = TaskState.PENDING
    rec.worker = None
    rec.not_before = decision.not_before


def _poison(rec: TaskRecord, error: dict[str, Any] | None, max_lost: int) -> dict[str, Any]:
    last = f" (last: {error.get('message', '')})" if error else ""
    return {
        "type": "PoisonTask",
        "message": f"task lost its worker or pool child {rec.lost} times, "
        f"more than max_lost={max_lost}; giving up{last}",
        "traceback": "",
    }
