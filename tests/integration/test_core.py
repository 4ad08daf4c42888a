"""End to end: real pmaster and pworker processes on loopback."""

from __future__ import annotations

import json
from typing import Any

import pf_testtasks
import pytest
from pfharness import Cluster, wait_for

from poolfleet.client import Client, Pool, RemoteError, TaskError
from poolfleet.common.errors import EncodeError, PoolfleetError


def test_client_submit_cpu_io_and_results(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        futs = [c.submit(pf_testtasks.add, i, 1) for i in range(20)]
        assert [f.result(20) for f in futs] == [i + 1 for i in range(20)]
        io = c.submit(pf_testtasks.io_sleep, 0.01)
        assert io.result(20) == "slept 0.01"
        assert list(c.map(pf_testtasks.square, range(10))) == [x * x for x in range(10)]


def test_tasks_spread_over_both_workers(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        futs = [c.submit(pf_testtasks.spin_for, 0.05) for _ in range(16)]
        for f in futs:
            f.result(30)
        workers = {f.info["worker_id"] for f in futs}
    assert workers == {"wa", "wb"}


def test_raising_task_comes_back_as_data(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        f = c.submit(pf_testtasks.boom, "bad input")
        with pytest.raises(TaskError) as info:
            f.result(20)
    err = info.value
    assert err.type == "ValueError"
    assert err.message == "bad input"
    assert "raise ValueError(message)" in err.traceback
    assert err.state == "FAILED"


def test_decorated_function_runs_in_process_pool(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        out = c.submit(pf_testtasks.decorated_cpu, 5).result(20)
    assert out["x"] == 5
    worker_pids = {w.pid for w in cluster.workers}
    assert out["pid"] not in worker_pids  # ran in a pool child, not the worker itself


def test_unknown_task_is_rejected_with_clear_error(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        f = c.submit("pf_testtasks:no_such_function")
        with pytest.raises(RemoteError) as info:
            f.result(20)
    assert info.value.code == "unknown_task"
    assert "pf_testtasks:no_such_function" in info.value.message


def test_unencodable_arguments_fail_at_submit(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        with pytest.raises(EncodeError, match="set"):
            c.submit(pf_testtasks.add, {1, 2}, 3)
        f = c.submit(pf_testtasks.unencodable_result)
        with pytest.raises(TaskError, match="msgpack"):
            f.result(20)


def test_a_big_batch_leaves_in_parts_but_one_bad_call_submits_none(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [((i, 1), {}) for i in range(1000)]
        with pytest.raises(EncodeError, match="set"):
            c.submit_many(pf_testtasks.add, [*calls[:700], (({1}, 1), {}), *calls[700:]])
        counts = c.status()["counts"]
        assert sum(counts.get(state, 0) for state in ("PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED")) == 0
        futs = c.submit_many(pf_testtasks.add, calls)  # sent as parts of 64, 128, 256, 512
        assert [f.result(30) for f in futs] == [i + 1 for i in range(1000)]
        assert c.status()["counts"]["SUCCEEDED"] == 1000


def test_function_from_main_gets_clear_error(cluster: Cluster) -> None:
    def local_fn() -> None:
        pass

    local_fn.__module__ = "__main__"
    local_fn.__qualname__ = "local_fn"
    with Client(cluster.client_endpoint) as c, pytest.raises(PoolfleetError, match=r"__main__.*--tasks"):
        c.submit(local_fn)


def test_options_do_not_collide_with_task_kwargs(cluster: Cluster) -> None:
    with Client(cluster.client_endpoint) as c:
        f = c.with_options(kind="io", retries=1).submit(
            "poolfleet.worker.builtins:echo", kind="mine", queue="q", timeout_s=3
        )
        assert f.result(20) == {"args": [], "kwargs": {"kind": "mine", "queue": "q", "timeout_s": 3}}


def test_queues_route_to_subscribed_workers(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--queue", "gpu", name="wq")
    c.start_worker(name="wd")
    with Client(c.client_endpoint) as cl:
        fq = [cl.with_options(queue="gpu").submit(pf_testtasks.pid_and_host) for _ in range(4)]
        fd = [cl.submit(pf_testtasks.pid_and_host) for _ in range(4)]
        for f in fq + fd:
            f.result(20)
    assert {f.info["worker_id"] for f in fq} == {"wq"}
    assert {f.info["worker_id"] for f in fd} == {"wd"}


def test_seed_pool_example(cluster: Cluster) -> None:
    p = Pool(2, master=cluster.client_endpoint)
    jobs = [p.apply_async(pf_testtasks.long_time_wait, args=(i,)) for i in range(10)]
    p.close()
    p.join()
    assert [j.get() for j in jobs] == [f"hello {i}" for i in range(10)]


def test_pool_api_mirrors_multiprocessing(cluster: Cluster) -> None:
    got: list[object] = []
    errors: list[BaseException] = []
    with Pool(master=cluster.client_endpoint) as p:
        assert p.apply(pf_testtasks.add, (1, 2)) == 3
        assert p.map(pf_testtasks.square, range(6)) == [0, 1, 4, 9, 16, 25]
        assert p.starmap(pf_testtasks.add, [(1, 2), (3, 4)]) == [3, 7]
        assert list(p.imap(pf_testtasks.square, range(5))) == [0, 1, 4, 9, 16]
        assert sorted(p.imap_unordered(pf_testtasks.square, range(5))) == [0, 1, 4, 9, 16]
        r = p.apply_async(pf_testtasks.add, (2, 2), callback=got.append)
        bad = p.apply_async(pf_testtasks.boom, ("x",), error_callback=errors.append)
        r.wait(20)
        bad.wait(20)
        assert r.ready() and r.successful() and r.get() == 4
        assert not bad.successful()
        with pytest.raises(TaskError):
            bad.get()
        m = p.map_async(pf_testtasks.square, [3, 4])
        assert m.get(20) == [9, 16]
    wait_for(lambda: got == [4] and len(errors) == 1, what="callbacks")
    with pytest.raises(ValueError):
        p.apply(pf_testtasks.add, (1, 1))


def test_ptask_submit_wait_json_and_result(cluster: Cluster) -> None:
    r = cluster.ptask("submit", "pf_testtasks:add", "2", "40", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["result"] == 42 and doc["state"] == "SUCCEEDED"
    r = cluster.ptask("submit", "pf_testtasks:add", "--kwargs", '{"a": "x", "b": "y"}')
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    r = cluster.ptask("result", task_id, "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "xy"


def test_ptask_string_args_and_failure_status(cluster: Cluster) -> None:
    r = cluster.ptask("submit", "poolfleet.worker.builtins:echo", "hello", "[1, 2]", "--wait", "--json")
    assert json.loads(r.stdout)["result"] == ["hello", [1, 2]]
    r = cluster.ptask("submit", "pf_testtasks:boom", "nope", "--wait")
    assert r.returncode == 1
    assert "ValueError: nope" in r.stderr
    r = cluster.ptask("submit", "pf_testtasks:missing", "--wait")
    assert r.returncode == 4
    assert "unknown task" in r.stderr


def test_ptask_run_cmd(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--allow-cmd", "echo", "--allow-cmd", "cat", name="wc")
    r = c.ptask("run", "--wait", "--", "echo", "hello", "world")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello world\n"
    r = c.ptask("run", "--wait", "--json", "--stdin", "piped", "--", "cat")
    doc = json.loads(r.stdout)
    assert doc["result"] == {"exit_code": 0, "stdout": "piped", "stderr": ""}
    # the master knows what the worker allows: refused at submit, naming the option to allow it
    r = c.ptask("run", "--wait", "--", "ls", "/")
    assert r.returncode == 4
    assert (
        "program 'ls' is not allowed on any worker serving queue 'default' (they allow: cat, echo)"
        in r.stderr
    )
    assert "start a worker with --allow-cmd ls" in r.stderr


def test_cmd_refused_when_worker_allows_nothing(cluster: Cluster) -> None:
    r = cluster.ptask("run", "--wait", "--timeout", "5", "--", "echo", "hi")
    # no worker has cmd slots: refused at submit, nothing queued; the master still answers
    assert r.returncode == 4
    assert "(none of them runs cmd tasks); start a worker with --allow-cmd echo" in r.stderr
    st = cluster.ptask("status", "--json")
    assert json.loads(st.stdout)["counts"]["PENDING"] == 0


def test_ptask_status_workers_cancel(cluster: Cluster) -> None:
    r = cluster.ptask("workers", "--json")
    ws = json.loads(r.stdout)
    assert sorted(w["worker_id"] for w in ws) == ["wa", "wb"]
    assert all(w["slots"] == {"cpu": 2, "io": 4} for w in ws)
    # a task on a queue nobody serves stays pending and can be cancelled
    r = cluster.ptask("submit", "pf_testtasks:add", "1", "2", "--queue", "nobody")
    tid = r.stdout.strip()
    st = json.loads(cluster.ptask("status", "--json").stdout)
    assert {"queue": "nobody", "kind": "cpu", "depth": 1} in st["queues"]
    r = cluster.ptask("cancel", tid, "--json")
    assert json.loads(r.stdout)[0]["outcome"] == "cancelled"
    r = cluster.ptask("result", tid, "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["state"] == "CANCELLED"
    human = cluster.ptask("status")
    assert "CANCELLED" in human.stdout and "workers connected: 2" in human.stdout


def test_ptask_unreachable_master(tmp_path: object) -> None:
    import subprocess

    from pfharness import BIN, daemon_env

    r = subprocess.run(
        [str(BIN / "ptask"), "--master", "tcp://127.0.0.1:9", "status", "--timeout", "1"],
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=30,
    )
    assert r.returncode == 3
    assert r.stderr == (
        "ptask: error: nothing is listening at tcp://127.0.0.1:9, after 1 s of trying (--timeout) "
        "(hint: is pmaster running? check --master or POOLFLEET_MASTER)\n"
    )


def test_ptask_help_reads_well() -> None:
    import subprocess

    from pfharness import BIN

    for cmd in ([], ["submit"], ["run"], ["result"], ["status"], ["workers"], ["cancel"]):
        r = subprocess.run([str(BIN / "ptask"), *cmd, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout
