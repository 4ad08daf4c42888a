"""poolfleet as a drop-in for multiprocessing.Pool and concurrent.futures, against real daemons.

What the ported CPython tests (test_cpython_pool.py) skip, and what this project adds:
remote errors keep their type, chunks travel as one task, imap reads its input lazily,
and Client is a concurrent.futures.Executor.
"""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import multiprocessing
import multiprocessing.pool
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Executor
from concurrent.futures.process import BrokenProcessPool
from contextlib import redirect_stderr
from pathlib import Path

import pf_mptasks
import pf_testtasks
import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client, Pool, RemoteError, TaskError, TaskTimeout
from poolfleet.client import remote as remote_errors

TASKS = ("pf_testtasks", "pf_mptasks", "pf_remoteonly")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dropin"))
    try:
        c.start_master()
        c.start_worker(tasks=TASKS, name="wa")
        c.start_worker(tasks=TASKS, name="wb")
        yield c
    finally:
        c.close()


def submitted(c: Client) -> int:
    return int(c.status()["submitted_total"])


class SayWhenError(ValueError):
    pass


def failing_input() -> Iterator[int]:
    raise SayWhenError("Somebody said when")
    yield 0


# -- remote errors ---------------------------------------------------------------------------
def test_remote_traceback_as_multiprocessing_gives_it(fleet: Cluster) -> None:
    with Pool(1, master=fleet.client_endpoint) as p:
        with pytest.raises(RuntimeError) as info:
            p.apply(pf_mptasks.traceback_task)
        exc = info.value
        assert isinstance(exc, TaskError) and exc.state == "FAILED"
        assert exc.args == (123,)
        cause = exc.__cause__
        assert type(cause) is multiprocessing.pool.RemoteTraceback
        assert "raise RuntimeError(123)  # some comment" in cause.tb  # type: ignore[attr-defined]
        err = io.StringIO()
        with redirect_stderr(err):
            try:
                raise exc
            except RuntimeError:
                sys.excepthook(*sys.exc_info())
        assert "raise RuntimeError(123)  # some comment" in err.getvalue()
        # the input's own error is raised as it is, not as a remote one
        with pytest.raises(SayWhenError) as local:
            p.map(pf_mptasks.sqr, failing_input(), 1)
        assert type(local.value) is SayWhenError and local.value.__cause__ is None


def test_future_result_and_exception_keep_the_type(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        f = c.submit(pf_testtasks.boom, "bad input")
        exc = f.exception(30)
        assert isinstance(exc, ValueError) and isinstance(exc, TaskError)
        assert str(exc) == "bad input" and exc.type == "ValueError"
        with pytest.raises(ValueError, match="bad input"):
            f.result()
        again = c.submit(pf_testtasks.boom, "twice").exception(30)
        assert type(again) is type(exc)  # one class per remote type, cached
        custom = c.submit(pf_mptasks.raise_custom, 7).exception(30)
        assert isinstance(custom, pf_mptasks.CustomError) and custom.code == 7
        assert custom.args == (7, "custom failure")
        # arguments msgpack cannot carry: the type stays, the message stands for them
        obj = c.submit(pf_mptasks.raise_with_object).exception(30)
        assert isinstance(obj, ValueError) and obj.args == (obj.message,) and "object" in obj.message


def test_a_type_the_client_has_not_imported_is_a_plain_task_error(fleet: Cluster) -> None:
    assert "pf_remoteonly" not in sys.modules  # never imported by name from a worker's say-so
    with Client(fleet.client_endpoint) as c:
        exc = c.submit("pf_remoteonly:fail").exception(30)
        assert type(exc) is TaskError
        assert exc.type == "pf_remoteonly.RemoteOnlyError"
        assert "only the worker knows this type" in exc.traceback
        assert "pf_remoteonly" not in sys.modules


def test_timeouts_cancels_and_dead_children_get_the_standard_types(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c, Client(fleet.client_endpoint) as other:
        slow = c.with_options(timeout_s=0.5).submit(pf_testtasks.spin_for, 30)
        exc = slow.exception(60)
        assert isinstance(exc, TimeoutError) and isinstance(exc, multiprocessing.TimeoutError)
        assert isinstance(exc, concurrent.futures.TimeoutError) and isinstance(exc, TaskTimeout)
        long = c.submit(pf_mptasks.sqr, 2, 60)
        wait_for(lambda: long.ack is not None and long.ack.done(), what="submit acknowledged")
        other.cancel([long.task_id])
        with pytest.raises(CancelledError):
            long.result(60)
        died = c.submit(pf_testtasks.kill_self, "sigkill")
        with pytest.raises(BrokenProcessPool) as info:
            died.result(60)
        assert isinstance(info.value, TaskError) and info.value.type == "ChildDied"


def test_remote_classes_are_made_once_and_never_for_stop_iteration() -> None:
    a = remote_errors.remote_class(KeyError)
    assert a is remote_errors.remote_class(KeyError)
    assert a is not None and issubclass(a, KeyError) and issubclass(a, TaskError)
    assert remote_errors.find_class("builtins", "StopIteration") is None
    assert remote_errors.find_class("builtins", "KeyboardInterrupt") is None
    assert remote_errors.find_class("no_such_module_here", "Error") is None


# -- chunks ----------------------------------------------------------------------------------
def test_chunks_travel_as_one_task_each(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        p = Pool(3, client=c)
        before = submitted(c)
        # multiprocessing's default: ceil(100 / (3 * 4)) = 9 per chunk, 12 chunks
        assert p.map(pf_mptasks.sqr, range(100)) == [x * x for x in range(100)]
        assert submitted(c) - before == 12
        before = submitted(c)
        assert p.starmap(pf_mptasks.mul, [(i, i) for i in range(100)], chunksize=20) == [
            i * i for i in range(100)
        ]
        assert submitted(c) - before == 5
        before = submitted(c)
        assert list(c.map(pf_mptasks.mul, range(20), range(20), chunksize=7)) == [i * i for i in range(20)]
        assert submitted(c) - before == 3
        before = submitted(c)
        assert list(p.imap(pf_mptasks.sqr, range(50), chunksize=10)) == [x * x for x in range(50)]
        assert sorted(p.imap_unordered(pf_mptasks.sqr, range(50), chunksize=25)) == sorted(
            x * x for x in range(50)
        )
        assert submitted(c) - before == 7
        p.close()
        p.join()


def test_one_failing_item_fails_the_call(fleet: Cluster) -> None:
    with Pool(master=fleet.client_endpoint) as p:
        with pytest.raises(ValueError, match="item 13 fails"):
            p.map(pf_mptasks.flaky_item, range(30), chunksize=4)
        it = p.imap(pf_mptasks.flaky_item, range(30), chunksize=4)
        assert [next(it) for _ in range(12)] == list(range(12))
        with pytest.raises(ValueError, match="item 13 fails"):
            next(it)


def test_a_chunk_takes_the_kind_of_its_function(fleet: Cluster) -> None:
    worker_pids = {w.pid for w in fleet.workers}
    with Pool(master=fleet.client_endpoint) as p:
        io_pids = set(p.map(pf_mptasks.io_pid, range(40), chunksize=5))
        cpu_pids = set(p.map(pf_mptasks.pid, range(40), chunksize=5))
    assert io_pids <= worker_pids  # io slots are threads of the worker itself
    assert not cpu_pids & worker_pids  # cpu chunks ran in pool children


def test_a_chunk_runs_only_tasks_the_worker_offers(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        # the master routes a chunk by the task it calls: one no worker offers is refused at submit
        bad = c.submit("poolfleet.worker.builtins:starmap_chunk", "os:system", [["true"]])
        with pytest.raises(RemoteError, match="unknown task 'os:system'") as info:
            bad.result(30)
        assert info.value.code == "unknown_task"
        nested = c.submit("poolfleet.worker.builtins:map_chunk", "poolfleet.worker.builtins:map_chunk", [])
        with pytest.raises(TaskError, match="cannot run inside a chunk"):
            nested.result(30)


# -- laziness ----------------------------------------------------------------------------------
def test_imap_reads_its_input_as_it_goes(fleet: Cluster) -> None:
    go = threading.Event()
    waited_in_vain: list[bool] = []

    def slow_input() -> Iterator[int]:
        # if imap read its input inside the call, this would wait for nothing
        waited_in_vain.append(not go.wait(30))
        yield from range(5)

    with Pool(master=fleet.client_endpoint, imap_window=4) as p:
        it = p.imap(pf_mptasks.sqr, slow_input())
        go.set()
        assert list(it) == [0, 1, 4, 9, 16]
        assert waited_in_vain == [False]
        # an endless input works
        squares = p.imap_unordered(pf_mptasks.sqr, itertools.count())
        assert len([next(squares) for _ in range(50)]) == 50
        # and is read a bounded window ahead of the caller
        read: list[int] = []

        def counted() -> Iterator[int]:
            for i in itertools.count():
                read.append(i)
                yield i

        del squares  # stops its feeder

        with Client(fleet.client_endpoint) as watcher:

            def idle() -> bool:
                counts = watcher.status()["counts"]
                return sum(counts.get(s, 0) for s in ("PENDING", "DISPATCHED", "RUNNING")) == 0

            wait_for(idle, what="the cluster idle")
            base = watcher.status()["counts"].get("SUCCEEDED", 0)
            ordered = p.imap(pf_mptasks.sqr, counted())
            wait_for(
                lambda: watcher.status()["counts"].get("SUCCEEDED", 0) - base >= 4, what="the first window"
            )
            assert len(read) == 4 and watcher.status()["counts"].get("SUCCEEDED", 0) - base == 4
            assert next(ordered) == 0
            wait_for(lambda: len(read) == 5, what="one more item read")
            del ordered


# -- Client as an Executor ---------------------------------------------------------------------
def test_client_is_an_executor(fleet: Cluster) -> None:
    assert issubclass(Client, Executor)
    with Client(fleet.client_endpoint) as c:
        pending = c.submit(pf_mptasks.sqr, 3, 0.5)
    assert pending.done() and pending.result() == 9  # leaving `with` waited for it
    with pytest.raises(RuntimeError, match="after shutdown"):
        c.submit(pf_mptasks.sqr, 1)
    with pytest.raises(RuntimeError):
        c.map(pf_mptasks.sqr, [1])

    c = Client(fleet.client_endpoint)
    late = c.submit(pf_mptasks.sqr, 4, 0.5)
    c.shutdown(wait=False)  # returns at once; the future still gets its result
    assert late.result(30) == 16

    c = Client(fleet.client_endpoint)
    # pending (no worker serves its queue): cancel_futures cancels it, on the cluster too; a
    # running one would go on, as in concurrent.futures (test_future_states.py)
    stuck = c.with_options(queue="nobody-serves-this").submit(pf_mptasks.sqr, 5, 60)
    wait_for(lambda: stuck.ack is not None and stuck.ack.done(), what="submit acknowledged")
    c.shutdown(wait=True, cancel_futures=True)
    assert stuck.cancelled()
    with Client(fleet.client_endpoint) as check:
        wait_for(
            lambda: (check.results([stuck.task_id])[stuck.task_id] or {}).get("state") == "CANCELLED",
            what="the task cancelled on the cluster",
        )


def test_executor_map_timeout_counts_from_the_call(fleet: Cluster) -> None:
    with Client(fleet.client_endpoint) as c:
        assert list(c.map(pf_mptasks.mul, [1, 2, 3], [4, 5, 6])) == [4, 10, 18]
        with pytest.raises(ValueError, match="chunksize"):
            c.map(pf_mptasks.mul, [1], [2], chunksize=0)
        # per result, 3 s would do for both (2 s, then 2 s more); from the call, the second is late
        results = c.map(pf_mptasks.sqr, [1, 2], [2.0, 4.0], timeout=3)
        assert next(results) == 1
        with pytest.raises(TimeoutError):
            next(results)


def test_pool_checks_its_arguments_as_multiprocessing_does() -> None:
    for processes in (-1, 0):
        with pytest.raises(ValueError, match="Number of processes must be at least 1"):
            Pool(processes)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(initializer=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="initializer cannot run on the cluster"):
        Pool(initializer=print)
    for value in (0, -1, 0.5, "12"):
        with pytest.raises(ValueError, match="maxtasksperchild"):
            Pool(3, maxtasksperchild=value)  # type: ignore[arg-type]


def test_a_running_pool_collected_warns(fleet: Cluster, tmp_path: Path) -> None:
    import gc

    p = Pool(master=fleet.client_endpoint)
    assert p.apply(pf_mptasks.sqr, (2,)) == 4
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del p
        gc.collect()
