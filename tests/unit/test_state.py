"""The task state machine: start, results, retries with backoff, fencing, the poison guard."""

from __future__ import annotations

import random

import pytest

from poolfleet.common.protocol import Kind, TaskState
from poolfleet.master.state import (
    Finish,
    Requeue,
    RetryPolicy,
    Stale,
    TaskRecord,
    on_result,
    on_worker_lost,
    requeue,
    start,
)

W1, W2 = b"w1", b"w2"
POLICY = RetryPolicy(backoff_base_s=0.5, backoff_max_s=60.0, max_lost=3)
ERR = {"type": "ValueError", "message": "bad", "traceback": "tb"}


def rec(retries: int = 0) -> TaskRecord:
    return TaskRecord(
        id=b"t" * 16, name="m:f", queue="default", kind=Kind.CPU, payload=b"", timeout_s=None,
        retries=retries, created_at=0.0,
    )  # fmt: skip


def running(retries: int = 0, now: float = 10.0) -> TaskRecord:
    r = rec(retries)
    start(r, W1, now)
    return r


def result(
    r: TaskRecord,
    state: TaskState,
    attempt: int | None = None,
    *,
    child_lost: bool = False,
    now: float = 20.0,
    rng: random.Random | None = None,
    policy: RetryPolicy = POLICY,
    value: bytes | None = None,
    error: dict[str, str] | None = None,
) -> Finish | Requeue | Stale:
    return on_result(
        r,
        r.attempt if attempt is None else attempt,
        state,
        value,
        error,
        child_lost,
        policy,
        now,
        rng or random.Random(1),
    )


def test_start_moves_pending_to_dispatched_and_numbers_attempts() -> None:
    r = rec()
    assert start(r, W1, 5.0) == 1
    assert (r.state, r.worker, r.attempt, r.dispatched_at) == (TaskState.DISPATCHED, W1, 1, 5.0)
    requeue(r, Requeue(not_before=9.0))
    assert (r.state, r.worker, r.not_before) == (TaskState.PENDING, None, 9.0)
    assert start(r, W2, 10.0) == 2
    assert r.worker == W2


@pytest.mark.parametrize(
    "state", [TaskState.DISPATCHED, TaskState.RUNNING, TaskState.SUCCEEDED, TaskState.CANCELLED]
)
def test_start_refuses_a_task_that_is_not_pending(state: TaskState) -> None:
    r = rec()
    r.state = state
    with pytest.raises(ValueError, match="cannot start"):
        start(r, W1, 0.0)
    assert r.attempt == 0


def test_success_finishes_with_the_value() -> None:
    d = result(running(), TaskState.SUCCEEDED, value=b"\x2a")
    assert d == Finish(TaskState.SUCCEEDED, value=b"\x2a")


def test_failure_without_retries_finishes_failed_with_the_error() -> None:
    r = running(retries=0)
    d = result(r, TaskState.FAILED, error=ERR)
    assert d == Finish(TaskState.FAILED, error=ERR)
    assert r.failures == 1


@pytest.mark.parametrize("state", [TaskState.CANCELLED, TaskState.TIMED_OUT])
def test_cancel_and_timeout_are_final_even_with_retries_left(state: TaskState) -> None:
    r = running(retries=5)
    d = result(r, state, error=ERR)
    assert d == Finish(state, error=ERR)
    assert r.failures == 0


def test_failure_with_retries_requeues_until_retries_are_spent() -> None:
    r = running(retries=2)
    d1 = result(r, TaskState.FAILED, error=ERR, now=100.0)
    assert isinstance(d1, Requeue) and d1.reason == "retry"
    requeue(r, d1)
    start(r, W1, 101.0)
    d2 = result(r, TaskState.FAILED, error=ERR, now=200.0)
    assert isinstance(d2, Requeue)
    requeue(r, d2)
    start(r, W1, 201.0)
    d3 = result(r, TaskState.FAILED, error=ERR, now=300.0)
    assert d3 == Finish(TaskState.FAILED, error=ERR)
    assert (r.attempt, r.failures) == (3, 3)


def test_retry_backoff_is_exponential_with_jitter_within_bounds() -> None:
    rng = random.Random(1234)
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=5.0, max_lost=3)
    r = running(retries=10)
    seen = []
    for failures in range(1, 9):
        now = 1000.0 * failures
        d = result(r, TaskState.FAILED, now=now, rng=rng, policy=policy)
        assert isinstance(d, Requeue)
        ceiling = min(5.0, 0.5 * 2 ** (failures - 1))
        delay = d.not_before - now
        assert ceiling / 2 <= delay <= ceiling, (failures, delay)
        seen.append(delay)
        requeue(r, d)
        start(r, W1, now)
    assert len(set(seen)) == len(seen)  # jitter: no two delays alike
    assert max(seen) <= 5.0


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    delays = [POLICY.delay_s(3, random.Random(7)) for _ in range(2)]
    assert delays[0] == delays[1]
    assert 1.0 <= delays[0] <= 2.0


def test_result_for_a_stale_attempt_is_dropped() -> None:
    r = running(retries=1)
    d = result(r, TaskState.FAILED, error=ERR)
    assert isinstance(d, Requeue)
    requeue(r, d)
    start(r, W2, 30.0)  # attempt 2 now runs elsewhere
    stale = result(r, TaskState.SUCCEEDED, attempt=1, value=b"old")
    assert isinstance(stale, Stale)
    assert "attempt 1" in stale.reason
    assert (r.state, r.attempt, r.worker) == (TaskState.DISPATCHED, 2, W2)
    assert result(r, TaskState.SUCCEEDED, attempt=2, value=b"new") == Finish(
        TaskState.SUCCEEDED, value=b"new"
    )


def test_result_for_a_pending_task_is_stale() -> None:
    r = running()
    requeue(r, Requeue(0.0))
    assert isinstance(result(r, TaskState.SUCCEEDED, attempt=1), Stale)
    assert r.state is TaskState.PENDING


def test_dead_child_counts_as_lost_and_as_a_failure() -> None:
    r = running(retries=5)
    d = result(r, TaskState.FAILED, child_lost=True, error=ERR)
    assert isinstance(d, Requeue)
    assert (r.lost, r.failures) == (1, 1)


def test_dead_child_poison_guard_gives_up_after_max_lost() -> None:
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.01, max_lost=2)
    r = running(retries=10)
    for _ in range(2):
        d = result(r, TaskState.FAILED, child_lost=True, error=ERR, policy=policy)
        assert isinstance(d, Requeue)
        requeue(r, d)
        start(r, W1, 0.0)
    d = result(r, TaskState.FAILED, child_lost=True, error=ERR, policy=policy)
    assert isinstance(d, Finish) and d.state is TaskState.FAILED
    assert d.error is not None
    assert d.error["type"] == "PoisonTask"
    assert "3 times" in d.error["message"] and "max_lost=2" in d.error["message"]
    assert "(last: bad)" in d.error["message"]
    assert r.attempt == 3


def test_plain_failures_do_not_count_towards_the_poison_guard() -> None:
    policy = RetryPolicy(max_lost=0)
    r = running(retries=3)
    d = result(r, TaskState.FAILED, error=ERR, policy=policy)
    assert isinstance(d, Requeue)
    assert r.lost == 0


def test_worker_lost_requeues_at_once_and_counts() -> None:
    r = running(retries=0)
    d = on_worker_lost(r, POLICY, 50.0)
    assert d == Requeue(50.0, reason="worker lost")
    assert (r.lost, r.failures) == (1, 0)  # a lost worker does not spend a retry


def test_worker_lost_too_often_is_poison() -> None:
    r = running()
    for i in range(POLICY.max_lost):
        d = on_worker_lost(r, POLICY, float(i))
        assert isinstance(d, Requeue)
        requeue(r, d)
        start(r, W1, float(i))
    d = on_worker_lost(r, POLICY, 99.0)
    assert isinstance(d, Finish) and d.state is TaskState.FAILED
    assert d.error is not None and d.error["type"] == "PoisonTask"
    assert f"{POLICY.max_lost + 1} times" in d.error["message"]


def test_worker_lost_for_a_task_not_running_is_stale() -> None:
    r = rec()
    assert isinstance(on_worker_lost(r, POLICY, 0.0), Stale)
    assert r.lost == 0
