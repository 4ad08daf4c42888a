"""The fast paths of the performance work keep the guarantees of the slow ones.

Tiny cpu tasks share pool calls (chunks), io tasks queue inside the thread
pool, the journal folds a start into the insert of the same commit, and the
master bounds the work of one loop turn. None of this may cost a result, add
one, or blame a task for another's death.
"""

from __future__ import annotations

import pf_testtasks
import pytest
from pfharness import Cluster

from poolfleet.client import Client, TaskError


def test_many_tiny_cpu_tasks_each_return_once(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wk", cpu=2)
    with Client(c.client_endpoint) as cl:
        for rounds in range(3):
            futs = cl.submit_many(pf_testtasks.square, [((i,), {}) for i in range(3000)])
            assert [f.result(60) for f in futs] == [i * i for i in range(3000)], rounds
        st = cl.status()
        assert st["counts"]["SUCCEEDED"] == 9000
        assert (
            st["counts"]["PENDING"] == 0 and st["counts"]["RUNNING"] == 0 and st["counts"]["DISPATCHED"] == 0
        )
    assert c.journal_counts_when({"SUCCEEDED": 9000}) == {"SUCCEEDED": 9000}


def test_child_death_in_a_chunk_blames_only_the_culprit(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wk", cpu=2)
    with Client(c.client_endpoint) as cl:
        # measured as tiny first, so that the burst below travels in chunks
        assert [f.result(30) for f in cl.submit_many(pf_testtasks.die_on, [((i, -1), {}) for i in range(50)])]
        futs = cl.submit_many(pf_testtasks.die_on, [((i, 700), {}) for i in range(1500)])
        for i, f in enumerate(futs):
            if i == 700:
                with pytest.raises(TaskError) as info:
                    f.result(60)
                assert info.value.type == "ChildDied"
            else:
                assert f.result(60) == i
        st = cl.status()
        assert st["counts"]["FAILED"] == 1
        assert st["counts"]["SUCCEEDED"] == 1549
    assert c.journal_counts_when({"SUCCEEDED": 1549, "FAILED": 1}) == {"SUCCEEDED": 1549, "FAILED": 1}


def test_io_timeout_counts_from_the_start_not_the_queue(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wk", cpu=1, io=2)
    with Client(c.client_endpoint) as cl:
        # two threads, four tasks of 0.6 s with a 1 s timeout: the last two wait in the pool's
        # queue for 0.6 s, then run 0.6 s; counted from their start, none times out
        opts = cl.with_options(timeout_s=1.0)
        futs = opts.submit_many(pf_testtasks.io_sleep, [((0.6,), {}) for _ in range(4)])
        assert [f.result(30) for f in futs] == ["slept 0.6"] * 4


def test_big_arguments_and_results_never_wedge_a_busy_child(make_cluster: type[Cluster]) -> None:
    """Arguments and results bigger than a pipe buffer, many in flight at once, on two children:
    each comes back whole, in order, and the worker keeps serving."""
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wk", cpu=2)
    blob = bytes(range(256)) * 2048  # 512 KiB each way, more than a socket buffer holds
    with Client(c.client_endpoint) as cl:
        futs = cl.submit_many(pf_testtasks.echo_big, [((blob, i), {}) for i in range(60)])
        for i, f in enumerate(futs):
            assert f.result(60) == [i, blob[::-1]]
        assert cl.status()["counts"]["SUCCEEDED"] == 60
