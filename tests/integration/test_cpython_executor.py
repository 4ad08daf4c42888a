"""CPython 3.13's own executor tests, run against a real cluster with ``Client`` as the executor.

Ported from ``Lib/test/test_concurrent_futures/``: ``executor.py`` (``ExecutorTest``),
``test_shutdown.py`` (``ExecutorShutdownTest``), ``test_wait.py`` (``WaitTests``),
``test_as_completed.py`` (``AsCompletedTests``) and of ``test_process_pool.py``'s
``ProcessPoolExecutorTest`` what does not read that executor's internals, with a master and
two workers on loopback.
CPython's assertions are unchanged. What changed:

- the executor is ``Client(master)`` (CPython's ``ExecutorMixin`` made one with
  ``max_workers``; the cluster's slots decide concurrency);
- the task functions live in ``pf_cftasks``, a module the workers load, and the built-ins the
  tests submit (``pow``, ``divmod``, ``str``, ``time.sleep``) are tasks of the same name there
  (``time.sleep`` is written ``sleep``);
- ``create_event()`` (CPython's mixins give a ``threading.Event`` or a manager's) gives an
  event a worker can see: a file path; ``event.wait`` is ``functools.partial(wait_event,
  path)`` and ``event.set()`` makes the file.

Not ported: ``test_future.py`` tests the ``Future`` class alone, with no executor (a
``TaskFuture`` is one); the ``ThreadPool*``/``ProcessPool*`` subclasses' own tests read those
executors' internals (``_threads``, ``_processes``, ``_call_queue``, ``_max_workers``). A test that cannot
apply on a cluster is skipped with its reason in its decorator.
"""

# CPython's test code is kept as it is, style included:
# ruff: noqa: UP031

from __future__ import annotations

import functools
import itertools
import shutil
import tempfile
import threading
import time
import unittest
import weakref
from concurrent import futures
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
    Future,
)
from pathlib import Path
from typing import Any

from pf_cftasks import capture, divmod, mul, pow, sleep, wait_and_raise, wait_event
from pf_cftasks import str as str_task
from pfharness import Cluster
from test import support
from test.support import threading_helper

from poolfleet.client import Client

_cluster: Cluster | None = None
_tmp: str | None = None


def setUpModule() -> None:
    global _cluster, _tmp
    _tmp = tempfile.mkdtemp(prefix="pf-cpython-executor-")
    _cluster = Cluster(Path(_tmp))
    try:
        _cluster.start_master()
        for name in ("wa", "wb"):
            _cluster.start_worker(tasks=("pf_cftasks",), name=name)
    except BaseException:
        _cluster.close()
        raise


def tearDownModule() -> None:
    if _cluster is not None:
        _cluster.close()
    if _tmp is not None:
        shutil.rmtree(_tmp, ignore_errors=True)


_events = itertools.count()


class ClusterEvent(str):
    """An event a task on a worker can wait for: the path of a file that ``set()`` makes.

    A str, so it travels as a task argument (``wait_and_raise(event)``)."""

    @property
    def wait(self) -> functools.partial[bool]:
        return functools.partial(wait_event, str(self))

    def set(self) -> None:
        Path(self).touch()


# -- CPython's util.py ------------------------------------------------------------------------
def create_future(state=PENDING, exception=None, result=None):
    f = Future()
    f._state = state
    f._exception = exception
    f._result = result
    return f


PENDING_FUTURE = create_future(state=PENDING)
RUNNING_FUTURE = create_future(state=RUNNING)
CANCELLED_FUTURE = create_future(state=CANCELLED)
CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=CANCELLED_AND_NOTIFIED)
EXCEPTION_FUTURE = create_future(state=FINISHED, exception=OSError())
SUCCESSFUL_FUTURE = create_future(state=FINISHED, result=42)


class BaseTestCase(unittest.TestCase):
    def setUp(self):
        self._thread_key = threading_helper.threading_setup()

    def tearDown(self):
        support.reap_children()
        threading_helper.threading_cleanup(*self._thread_key)


class ClusterMixin:
    """CPython's ``ExecutorMixin`` with the cluster's ``Client`` as the executor."""

    worker_count = 5
    executor_kwargs: dict[str, Any] = {}

    def setUp(self):
        super().setUp()
        self.t1 = time.monotonic()
        assert _cluster is not None
        self.executor_type = functools.partial(Client, _cluster.client_endpoint)
        self.executor = self.executor_type(**self.executor_kwargs)

    def tearDown(self):
        self.executor.shutdown(wait=True)
        self.executor = None

        dt = time.monotonic() - self.t1
        if support.verbose:
            print("%.2fs" % dt, end=" ")
        self.assertLess(dt, 300, "synchronization issue: test lasted too long")

        super().tearDown()

    def create_event(self):
        assert _tmp is not None
        return ClusterEvent(str(Path(_tmp) / f"event-{next(_events)}"))


MSGPACK_TUPLE = (
    "a tuple result comes back as a list: results are msgpack data, and msgpack has one array "
    "type, so (0, 1) == [0, 1] is False; the same calls, compared as lists: "
    "test_future_states.py::test_tuples_come_back_as_lists"
)


# -- executor.py ------------------------------------------------------------------------------
class MyObject:
    def my_method(self):
        pass


class ExecutorTest:
    def assertTaskRaises(self, exctype):
        return self.assertRaises(exctype)

    # Executor.shutdown() and context manager usage is tested by
    # ExecutorShutdownTest.
    def test_submit(self):
        future = self.executor.submit(pow, 2, 8)
        self.assertEqual(256, future.result())

    @unittest.skip(MSGPACK_TUPLE)
    def test_submit_keyword(self):
        future = self.executor.submit(mul, 2, y=8)
        self.assertEqual(16, future.result())
        future = self.executor.submit(capture, 1, self=2, fn=3)
        self.assertEqual(future.result(), ((1,), {"self": 2, "fn": 3}))
        with self.assertRaises(TypeError):
            self.executor.submit(fn=capture, arg=1)
        with self.assertRaises(TypeError):
            self.executor.submit(arg=1)

    def test_map(self):
        self.assertEqual(
            list(self.executor.map(pow, range(10), range(10))), list(map(pow, range(10), range(10)))
        )

        self.assertEqual(
            list(self.executor.map(pow, range(10), range(10), chunksize=3)),
            list(map(pow, range(10), range(10))),
        )

    @unittest.skip(MSGPACK_TUPLE)
    def test_map_exception(self):
        i = self.executor.map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
        self.assertEqual(i.__next__(), (0, 1))
        self.assertEqual(i.__next__(), (0, 1))
        with self.assertTaskRaises(ZeroDivisionError):
            i.__next__()

    @support.requires_resource("walltime")
    def test_map_timeout(self):
        results = []
        try:
            for i in self.executor.map(sleep, [0, 0, 6], timeout=5):
                results.append(i)
        except futures.TimeoutError:
            pass
        else:
            self.fail("expected TimeoutError")

        self.assertEqual([None, None], results)

    def test_shutdown_race_issue12456(self):
        # Issue #12456: race condition at shutdown where trying to post a
        # sentinel in the call queue blocks (the queue is full while processes
        # have exited).
        self.executor.map(str_task, [2] * (self.worker_count + 1))
        self.executor.shutdown()

    @unittest.skip(
        "the task is a bound method of a local object (workers run module-level functions of "
        "their task modules only): submit refuses it; a Client keeps a future only until its "
        "result lands (test_future_states.py::test_a_finished_future_is_not_kept_by_the_client)"
    )
    def test_no_stale_references(self):
        pass

    @unittest.skip(
        "Client takes no max_workers: the cluster's slots decide concurrency, they are the "
        "workers' (pworker --cpu/--io), not the client's"
    )
    def test_max_workers_negative(self):
        for number in (0, -1):
            with self.assertRaisesRegex(ValueError, "max_workers must be greater than 0"):
                self.executor_type(max_workers=number)

    @unittest.skip(
        "results are msgpack data (None, bool, int, float, str, bytes, list, dict): a task "
        "cannot return a MyObject, and none of these types takes a weak reference"
    )
    def test_free_reference(self):
        pass


class ClusterExecutorTest(ClusterMixin, ExecutorTest, BaseTestCase):
    pass


# -- test_process_pool.py: what of ProcessPoolExecutorTest does not read the pool's internals --
class ProcessPoolExecutorTest(ExecutorTest):
    @unittest.skip(
        "it kills one of the executor's local processes (self.executor._processes): a Client has "
        "none; a pool child that dies gives TaskLostError, a BrokenProcessPool, and the cluster "
        "goes on: test_dropin.py::test_timeouts_cancels_and_dead_children_get_the_standard_types"
    )
    def test_killed_child(self):
        pass

    @unittest.skip(
        "pow(39, 39) has 207 bits: msgpack integers have 64, so the result cannot travel "
        "(EncodeError on the worker, as the task's error); the same maps with results that fit: "
        "test_future_states.py::test_map_chunksize_with_results_msgpack_carries"
    )
    def test_map_chunksize(self):
        def bad_map():
            list(self.executor.map(pow, range(40), range(40), chunksize=-1))

        ref = list(map(pow, range(40), range(40)))
        self.assertEqual(list(self.executor.map(pow, range(40), range(40), chunksize=6)), ref)
        self.assertEqual(list(self.executor.map(pow, range(40), range(40), chunksize=50)), ref)
        self.assertEqual(list(self.executor.map(pow, range(40), range(40), chunksize=40)), ref)
        self.assertRaises(ValueError, bad_map)

    @unittest.skip(
        "the task is a method of the test case (workers run module-level functions only), and "
        "the error is a subclass of both RuntimeError and poolfleet's TaskError, so "
        "assertIs(type(exc), RuntimeError) cannot hold by design; the rest (args, the remote "
        "traceback as __cause__, excepthook): "
        "test_dropin.py::test_remote_traceback_as_multiprocessing_gives_it"
    )
    def test_traceback(self):
        pass


class ClusterProcessPoolExecutorTest(ClusterMixin, ProcessPoolExecutorTest, BaseTestCase):
    """ExecutorTest's tests again, with ProcessPoolExecutorTest's own."""


# -- test_shutdown.py -------------------------------------------------------------------------
AT_EXIT = (
    "it prints from the task and reads the output of the submitting interpreter: a task's "
    "output is on its worker; and a Client registers no hook at interpreter exit (a future "
    "still pending there is not waited for; the task runs on, on the cluster)"
)


class ExecutorShutdownTest:
    def test_run_after_shutdown(self):
        self.executor.shutdown()
        self.assertRaises(RuntimeError, self.executor.submit, pow, 2, 5)

    @unittest.skip(AT_EXIT)
    def test_interpreter_shutdown(self):
        pass

    @unittest.skip(AT_EXIT)
    def test_submit_after_interpreter_shutdown(self):
        pass

    def test_hang_issue12364(self):
        fs = [self.executor.submit(sleep, 0.1) for _ in range(50)]
        self.executor.shutdown()
        for f in fs:
            f.result()

    def test_cancel_futures(self):
        assert self.worker_count <= 5, "test needs few workers"
        fs = [self.executor.submit(sleep, 0.1) for _ in range(50)]
        self.executor.shutdown(cancel_futures=True)
        # We can't guarantee the exact number of cancellations, but we can
        # guarantee that *some* were cancelled. With few workers, many of
        # the submitted futures should have been cancelled.
        cancelled = [fut for fut in fs if fut.cancelled()]
        self.assertGreater(len(cancelled), 20)

        # Ensure the other futures were able to finish.
        # Use "not fut.cancelled()" instead of "fut.done()" to include futures
        # that may have been left in a pending state.
        others = [fut for fut in fs if not fut.cancelled()]
        for fut in others:
            self.assertTrue(fut.done(), msg=f"{fut._state=}")
            self.assertIsNone(fut.exception())

        # Similar to the number of cancelled futures, we can't guarantee the
        # exact number that completed. But, we can guarantee that at least
        # one finished.
        self.assertGreater(len(others), 0)

    @unittest.skip(AT_EXIT)
    def test_hang_gh83386(self):
        pass

    @unittest.skip(
        "it makes its executor with max_workers=1 (the cluster's slots decide concurrency) and "
        "submits the built-in int; the same steps with a task: "
        "test_future_states.py::test_submit_cancel_shutdown_does_not_hang"
    )
    def test_hang_gh94440(self):
        pass


class ClusterShutdownTest(ClusterMixin, ExecutorShutdownTest, BaseTestCase):
    pass


# -- test_wait.py -----------------------------------------------------------------------------
class WaitTests:
    def test_20369(self):
        # See https://bugs.python.org/issue20369
        future = self.executor.submit(mul, 1, 2)
        done, not_done = futures.wait([future, future], return_when=futures.ALL_COMPLETED)
        self.assertEqual({future}, done)
        self.assertEqual(set(), not_done)

    def test_first_completed(self):
        event = self.create_event()
        future1 = self.executor.submit(mul, 21, 2)
        future2 = self.executor.submit(event.wait)

        try:
            done, not_done = futures.wait(
                [CANCELLED_FUTURE, future1, future2], return_when=futures.FIRST_COMPLETED
            )

            self.assertEqual(set([future1]), done)
            self.assertEqual(set([CANCELLED_FUTURE, future2]), not_done)
        finally:
            event.set()
        future2.result()  # wait for job to finish

    def test_first_completed_some_already_completed(self):
        event = self.create_event()
        future1 = self.executor.submit(event.wait)

        try:
            finished, pending = futures.wait(
                [CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE, future1],
                return_when=futures.FIRST_COMPLETED,
            )

            self.assertEqual(set([CANCELLED_AND_NOTIFIED_FUTURE, SUCCESSFUL_FUTURE]), finished)
            self.assertEqual(set([future1]), pending)
        finally:
            event.set()
        future1.result()  # wait for job to finish

    def test_first_exception(self):
        event1 = self.create_event()
        event2 = self.create_event()
        try:
            future1 = self.executor.submit(mul, 2, 21)
            future2 = self.executor.submit(wait_and_raise, event1)
            future3 = self.executor.submit(event2.wait)

            # Ensure that future1 is completed before future2 finishes
            def wait_for_future1():
                future1.result()
                event1.set()

            t = threading.Thread(target=wait_for_future1)
            t.start()

            finished, pending = futures.wait([future1, future2, future3], return_when=futures.FIRST_EXCEPTION)

            self.assertEqual(set([future1, future2]), finished)
            self.assertEqual(set([future3]), pending)

            threading_helper.join_thread(t)
        finally:
            event1.set()
            event2.set()
        future3.result()  # wait for job to finish

    def test_first_exception_some_already_complete(self):
        event = self.create_event()
        future1 = self.executor.submit(divmod, 21, 0)
        future2 = self.executor.submit(event.wait)

        try:
            finished, pending = futures.wait(
                [SUCCESSFUL_FUTURE, CANCELLED_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, future1, future2],
                return_when=futures.FIRST_EXCEPTION,
            )

            self.assertEqual(set([SUCCESSFUL_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, future1]), finished)
            self.assertEqual(set([CANCELLED_FUTURE, future2]), pending)
        finally:
            event.set()
        future2.result()  # wait for job to finish

    def test_first_exception_one_already_failed(self):
        event = self.create_event()
        future1 = self.executor.submit(event.wait)

        try:
            finished, pending = futures.wait([EXCEPTION_FUTURE, future1], return_when=futures.FIRST_EXCEPTION)

            self.assertEqual(set([EXCEPTION_FUTURE]), finished)
            self.assertEqual(set([future1]), pending)
        finally:
            event.set()
        future1.result()  # wait for job to finish

    def test_all_completed(self):
        future1 = self.executor.submit(divmod, 2, 0)
        future2 = self.executor.submit(mul, 2, 21)

        finished, pending = futures.wait(
            [SUCCESSFUL_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, future1, future2],
            return_when=futures.ALL_COMPLETED,
        )

        self.assertEqual(
            set([SUCCESSFUL_FUTURE, CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, future1, future2]),
            finished,
        )
        self.assertEqual(set(), pending)

    def test_timeout(self):
        short_timeout = 0.050

        event = self.create_event()
        future = self.executor.submit(event.wait)

        try:
            finished, pending = futures.wait(
                [CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE, future],
                timeout=short_timeout,
                return_when=futures.ALL_COMPLETED,
            )

            self.assertEqual(
                set([CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE]), finished
            )
            self.assertEqual(set([future]), pending)
        finally:
            event.set()
        future.result()  # wait for job to finish


class ClusterWaitTest(ClusterMixin, WaitTests, BaseTestCase):
    pass


# -- test_as_completed.py ---------------------------------------------------------------------
class AsCompletedTests:
    def test_no_timeout(self):
        future1 = self.executor.submit(mul, 2, 21)
        future2 = self.executor.submit(mul, 7, 6)

        completed = set(
            futures.as_completed(
                [CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE, future1, future2]
            )
        )
        self.assertEqual(
            set([CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE, future1, future2]),
            completed,
        )

    def test_future_times_out(self):
        """Test ``futures.as_completed`` timing out before
        completing it's final future."""
        already_completed = {CANCELLED_AND_NOTIFIED_FUTURE, EXCEPTION_FUTURE, SUCCESSFUL_FUTURE}

        # Windows clock resolution is around 15.6 ms
        short_timeout = 0.100
        for timeout in (0, short_timeout):
            with self.subTest(timeout):
                completed_futures = set()
                future = self.executor.submit(sleep, short_timeout * 10)

                try:
                    for f in futures.as_completed(already_completed | {future}, timeout):
                        completed_futures.add(f)
                except futures.TimeoutError:
                    pass

                # Check that ``future`` wasn't completed.
                self.assertEqual(completed_futures, already_completed)

    def test_duplicate_futures(self):
        # Issue 20367. Duplicate futures should not raise exceptions or give
        # duplicate responses.
        # Issue #31641: accept arbitrary iterables.
        future1 = self.executor.submit(sleep, 2)
        completed = [f for f in futures.as_completed(itertools.repeat(future1, 3))]
        self.assertEqual(len(completed), 1)

    def test_free_reference_yielded_future(self):
        # Issue #14406: Generator should not keep references
        # to finished futures.
        futures_list = [Future() for _ in range(8)]
        futures_list.append(create_future(state=CANCELLED_AND_NOTIFIED))
        futures_list.append(create_future(state=FINISHED, result=42))

        with self.assertRaises(futures.TimeoutError):
            for future in futures.as_completed(futures_list, timeout=0):
                futures_list.remove(future)
                wr = weakref.ref(future)
                del future
                support.gc_collect()  # For PyPy or other GCs.
                self.assertIsNone(wr())

        futures_list[0].set_result("test")
        for future in futures.as_completed(futures_list):
            futures_list.remove(future)
            wr = weakref.ref(future)
            del future
            support.gc_collect()  # For PyPy or other GCs.
            self.assertIsNone(wr())
            if futures_list:
                futures_list[0].set_result("test")

    def test_correct_timeout_exception_msg(self):
        futures_list = [CANCELLED_AND_NOTIFIED_FUTURE, PENDING_FUTURE, RUNNING_FUTURE, SUCCESSFUL_FUTURE]

        with self.assertRaises(futures.TimeoutError) as cm:
            list(futures.as_completed(futures_list, timeout=0))

        self.assertEqual(str(cm.exception), "2 (of 4) futures unfinished")


class ClusterAsCompletedTest(ClusterMixin, AsCompletedTests, BaseTestCase):
    pass
