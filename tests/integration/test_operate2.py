"""Operating the fleet, part two, against real daemons: what a task writes (ptask logs, logs -f,
the future's logs()), its progress (ptask show, ptask tasks, the future's callback), purging a
queue, and draining or stopping a worker over the protocol."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import pytest
from pfharness import BIN, Cluster, daemon_env, wait_for
from pfpostgres import PgServer

from poolfleet.client import Client
from poolfleet.client.client import UnservedQueueWarning

T = "pf_outtasks"


def _start(c: Cluster, *args: str, name: str = "wo") -> None:
    c.start_master()
    c.start_worker(*args, tasks=("pf_outtasks", "pf_testtasks"), name=name, cpu=1, io=2)


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_output_of_stdout_stderr_and_logging_is_kept_with_the_result(
    make_cluster: type[Cluster], kind: str
) -> None:
    c = make_cluster()
    _start(c)
    cl: Client = c.client()
    fut = cl.with_options(kind=kind).submit(f"{T}:chatty", 2)
    assert fut.result(30) == 2
    want = "".join(f"out {i}\nerr {i}\nINFO pf_outtasks: log {i}\n" for i in range(2))
    assert fut.logs() == want
    out = c.ptask("logs", fut.task_id)
    assert out.returncode == 0, out.stderr
    assert out.stdout == want
    doc = json.loads(c.ptask("logs", fut.task_id, "--json").stdout)
    assert (doc["state"], doc["start"], doc["end"], doc["final"]) == ("SUCCEEDED", 0, len(want), True)
    shown = c.ptask("show", fut.task_id).stdout
    assert f"output:    {len(want)} characters" in shown
    # a task that wrote nothing has no output; an unknown id is refused clearly
    quiet = cl.with_options(kind=kind).submit("pf_testtasks:add", 1, 2)
    assert quiet.result(30) == 3
    assert c.ptask("logs", quiet.task_id).stdout == ""
    bad = c.ptask("logs", "ffffffff")
    assert bad.returncode != 0 and "ffffffff" in bad.stderr


def test_output_is_bounded_by_the_worker_option(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    _start(c, "--max-task-output", "1000")
    cl: Client = c.client()
    fut = cl.with_options(kind="cpu").submit(f"{T}:big_output", 5000)
    assert fut.result(30) == 5000
    text = "".join(str(i % 10) for i in range(4999)) + "\n"
    doc = json.loads(c.ptask("logs", fut.task_id, "--json").stdout)
    assert (doc["output"], doc["start"], doc["end"]) == (text[-1000:], 4000, 5000)
    out = c.ptask("logs", fut.task_id)
    assert out.stdout == text[-1000:] and "first 4000 characters were not kept" in out.stderr


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_running_output_and_progress_are_seen_live_and_followed(
    make_cluster: type[Cluster], tmp_path: Path, kind: str
) -> None:
    c = make_cluster()
    _start(c)
    cl: Client = c.client()
    gate = tmp_path / f"gate-{kind}"
    seen: list[dict[str, Any]] = []
    fut = cl.with_options(kind=kind).submit(f"{T}:gated", str(gate))
    fut.add_progress_callback(lambda f: seen.append(dict(f.progress or {})))
    # while it waits at the gate: its output, and its last report, are at the master
    assert wait_for(lambda: cl.logs(fut.task_id)["output"] == "before the gate\n", what="live output")
    assert wait_for(lambda: any(p.get("message") == "waiting at the gate" for p in seen), what="a push")
    assert all(0.0 <= p["fraction"] <= 1.0 for p in seen)
    assert len(seen) < 100  # throttled: not one push per report
    shown = json.loads(c.ptask("show", fut.task_id, "--json").stdout)
    assert shown["state"] == "RUNNING"
    assert (shown["progress"]["fraction"], shown["progress"]["message"]) == (0.5, "waiting at the gate")
    listed = json.loads(c.ptask("tasks", "--json", "--state", "RUNNING").stdout)["tasks"]
    assert [t["progress"]["message"] for t in listed] == ["waiting at the gate"]
    table = c.ptask("tasks", "--state", "RUNNING").stdout
    assert "50% waiting at the gate" in table
    top = c.ptask("top", "--once", "--interval", "0.1").stdout
    assert "progress" in top and "50% waiting at the gate" in top
    # ptask logs -f prints what is there, keeps following, and ends with the task
    env = daemon_env({"POOLFLEET_MASTER": c.client_endpoint})
    follower = subprocess.Popen(
        [str(BIN / "ptask"), "logs", "-f", fut.task_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "before the gate\n"
        gate.touch()
        assert fut.result(30) == "done"
        rest, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert rest == "after the gate\n", err
    assert follower.returncode == 0
    assert wait_for(lambda: any(p.get("message") == "through" for p in seen) or fut.done(), what="end")
    final = json.loads(c.ptask("show", fut.task_id, "--json").stdout)
    assert (final["progress"]["fraction"], final["progress"]["message"]) == (1.0, "through")
    done = json.loads(c.ptask("tasks", "--json", "--state", "SUCCEEDED").stdout)["tasks"]
    assert done[0]["progress"]["message"] == "through"
    assert fut.logs() == "before the gate\nafter the gate\n"


def test_queue_purge_counts_asks_and_cancels_pending_or_running_tasks(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    _start(c)
    cl: Client = c.client()
    parked = [cl.with_options(queue="parked").submit("pf_testtasks:add", i, 1) for i in range(3)]
    for f in parked:
        assert f.ack is not None
        f.ack.result(10)
    other = cl.with_options(queue="elsewhere").submit("pf_testtasks:add", 9, 9)
    assert other.ack is not None
    other.ack.result(10)
    out = c.ptask("queue", "purge", "parked", input="n\n")
    assert out.returncode != 0
    assert "cancel 3 PENDING tasks of queue parked?" in out.stdout
    assert not any(f.done() for f in parked)
    out = c.ptask("queue", "purge", "parked", input="y\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith("queue parked: 3 tasks cancelled")
    for f in parked:
        assert wait_for(f.done, what="the purged task's result")
        assert "purged from queue parked" in str(f.exception())
    assert not other.done()  # another queue keeps its tasks
    assert c.ptask("queue", "purge", "parked", "--yes").stdout == "queue parked: no PENDING tasks to purge\n"
    # a running task is cancelled at its worker
    gate = tmp_path / "never"
    running = cl.with_options(kind="io").submit(f"{T}:gated", str(gate))
    assert wait_for(lambda: cl.show(running.task_id)["state"] == "RUNNING", what="running")  # type: ignore[index]
    out = c.ptask("queue", "purge", "default", "--state", "RUNNING", "--yes")
    assert out.returncode == 0, out.stderr
    assert wait_for(running.done, what="the cancelled task")
    assert cl.show(running.task_id)["state"] == "CANCELLED"  # type: ignore[index]
    assert c.ptask("queue", "purge", "default", "--state", "FAILED").returncode != 0
    assert c.master is not None
    actions = c.master.events("control_action")
    assert [(a["kind"], a.get("queue"), a.get("dry_run")) for a in actions] == [
        ("QUEUE_PURGE", "parked", True),
        ("QUEUE_PURGE", "parked", True),
        ("QUEUE_PURGE", "parked", False),
        ("QUEUE_PURGE", "parked", True),
        ("QUEUE_PURGE", "default", True),
        ("QUEUE_PURGE", "default", False),
    ]


def test_worker_drain_and_stop_over_the_protocol(make_cluster: type[Cluster], tmp_path: Path) -> None:
    c = make_cluster()
    c.start_master()
    wd = c.start_worker(tasks=("pf_outtasks",), name="wd", cpu=1, io=2)
    cl: Client = c.client()
    gate = tmp_path / "gate"
    fut = cl.with_options(kind="io").submit(f"{T}:gated", str(gate))
    assert wait_for(lambda: cl.show(fut.task_id)["state"] == "RUNNING", what="running")  # type: ignore[index]
    out = c.ptask("worker", "drain", "wd")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "worker wd: draining\n"
    wd.wait_event("worker_draining")
    assert wait_for(lambda: cl.workers()[0]["draining"], what="the master sees it draining")
    assert wd.alive()  # it finishes what runs
    gate.touch()
    assert fut.result(30) == "done"
    assert wd.wait(30) == 0
    assert wait_for(lambda: cl.workers() == [], what="the worker gone")

    ws = c.start_worker(tasks=("pf_outtasks",), name="ws", cpu=1, io=2)
    held = cl.with_options(kind="io").submit(f"{T}:gated", str(tmp_path / "never"))
    assert wait_for(lambda: cl.show(held.task_id)["state"] == "RUNNING", what="running")  # type: ignore[index]
    out = c.ptask("worker", "stop", "ws")
    assert out.returncode == 0, out.stderr
    assert ws.wait(30) == 0
    # what it ran goes back to the queue (no worker left to take it)
    assert wait_for(lambda: cl.show(held.task_id)["state"] == "PENDING", what="requeued")  # type: ignore[index]
    out = c.ptask("worker", "drain", "nobody")
    assert out.returncode != 0 and "no worker 'nobody'" in out.stderr


def _keys(root: Path, *names: str) -> None:
    for name in names:
        r = subprocess.run(
            [str(BIN / "ptask"), "keys", "generate", str(root), "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
            env=daemon_env(),
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr


def test_with_an_admin_directory_only_admin_keys_steer_and_actions_name_the_key(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    made = tmp_path / "made"
    _keys(made, "master", "worker", "viewer", "boss")
    dirs = {d: tmp_path / d for d in ("workers", "clients", "admins")}
    for d in dirs.values():
        d.mkdir()
    shutil.copy(made / "worker.key", dirs["workers"])
    shutil.copy(made / "viewer.key", dirs["clients"])
    shutil.copy(made / "boss.key", dirs["admins"])  # an admin key needs no copy among the clients
    c = make_cluster()
    master = c.start_master(
        "--curve-secret-key",
        str(made / "master.key_secret"),
        "--curve-workers-dir",
        str(dirs["workers"]),
        "--curve-clients-dir",
        str(dirs["clients"]),
        "--curve-admin-dir",
        str(dirs["admins"]),
    )

    def ptask(who: str, *args: str) -> subprocess.CompletedProcess[str]:
        keys = {
            "POOLFLEET_CURVE_SERVER_KEY": str(made / "master.key"),
            "POOLFLEET_CURVE_SECRET_KEY": str(made / f"{who}.key_secret"),
        }
        return c.ptask(*args, env=keys)

    out = ptask("viewer", "queue", "pause", "q1")
    assert out.returncode != 0
    assert "admin keys directory" in out.stderr
    assert ptask("viewer", "status").returncode == 0  # looking is open to every client key
    assert ptask("viewer", "worker", "drain", "w1").returncode != 0
    out = ptask("boss", "queue", "pause", "q1")
    assert out.returncode == 0, out.stderr
    refused = master.events("control_refused")
    assert [(e["kind"], e["key"]) for e in refused] == [
        ("QUEUE_CONTROL", "viewer.key"),
        ("WORKER_CONTROL", "viewer.key"),
    ]
    done = master.events("control_action")
    assert [(e["kind"], e["key"], e["queue"], e["action"]) for e in done] == [
        ("QUEUE_CONTROL", "boss.key", "q1", "pause")
    ]

    # keys on and no admin directory: no client key steers
    master.signal(signal.SIGTERM)
    assert master.wait(30) == 0
    shutil.copy(made / "boss.key", dirs["clients"])
    c.start_master(
        "--curve-secret-key",
        str(made / "master.key_secret"),
        "--curve-workers-dir",
        str(dirs["workers"]),
        "--curve-clients-dir",
        str(dirs["clients"]),
    )
    out = ptask("boss", "queue", "resume", "q1")
    assert out.returncode != 0 and "this master has none (pmaster --curve-admin-dir)" in out.stderr
    assert ptask("boss", "tasks").returncode == 0


def test_workers_functions_and_a_submit_to_an_unserved_queue_warns(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker(tasks=("pf_outtasks",), name="w1", cpu=1, io=1)
    c.start_worker(
        "--queue", "default", "--queue", "fast", tasks=("pf_outtasks", "pf_testtasks"), name="w2", cpu=1, io=1
    )
    doc = json.loads(c.ptask("workers", "--functions", "--json").stdout)
    assert doc[f"{T}:chatty"]["workers"] == 2
    assert doc["pf_testtasks:add"]["workers"] == 1
    assert doc["pf_testtasks:decorated_cpu"]["kind"] == "cpu"
    table = c.ptask("workers", "--functions").stdout.splitlines()
    assert table[0].split() == ["name", "workers", "kind", "retries", "timeout_s"]
    assert any(line.split()[:2] == [f"{T}:chatty", "2"] for line in table)

    out = c.ptask("submit", "--queue", "nowhere", "pf_testtasks:add", "1", "2")
    assert out.returncode == 0, out.stderr  # a warning, not an error: the task waits
    assert "warning: no connected worker serves queue nowhere" in out.stderr
    assert "served queues: default, fast" in out.stderr
    out = c.ptask("submit", "--queue", "fast", "pf_testtasks:add", "1", "2")
    assert out.returncode == 0 and "warning" not in out.stderr

    cl: Client = c.client()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fut = cl.with_options(queue="nowhere").submit("pf_testtasks:add", 3, 4)
        assert wait_for(lambda: any(w.category is UnservedQueueWarning for w in caught), what="the warning")
    assert not fut.done()


# -- metrics and the Grafana dashboard ------------------------------------------------------
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "poolfleet.json"


def _scrape(url: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], set[str]]:
    """Samples by (name, labels), and every family and sample name exported."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for s in family.samples:
            names.add(s.name)
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, names


def test_metrics_of_paused_queues_retries_and_progress_and_the_dashboard_queries_only_them(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    master = c.start_master("--metrics", "127.0.0.1:0")
    url = master.wait_event("metrics_started")["url"]
    c.start_worker(tasks=("pf_outtasks", "pf_testtasks"), name="wm", cpu=1, io=2)
    cl: Client = c.client()
    assert c.ptask("queue", "pause", "slow").returncode == 0
    failed = cl.with_options(retries=1).submit("pf_testtasks:boom", "twice")
    assert wait_for(failed.done, what="the failing task")
    assert c.ptask("retry", failed.task_id).returncode == 0
    gate = tmp_path / "gate"
    running = cl.with_options(kind="io").submit(f"{T}:gated", str(gate))
    assert wait_for(lambda: (cl.show(running.task_id) or {}).get("progress"), what="a report")

    def value(name: str, **labels: str) -> float:
        return _scrape(url)[0].get((name, tuple(sorted(labels.items()))), -1.0)

    assert wait_for(lambda: value("poolfleet_tasks_reporting_progress") == 1, what="1 reporting")
    assert value("poolfleet_queue_paused", queue="slow") == 1
    assert value("poolfleet_queues_paused") == 1
    assert value("poolfleet_tasks_retried_total") == 1
    assert wait_for(
        lambda: value("poolfleet_task_retries_total") >= 2, what="retries counted"
    )  # two boom runs
    assert value("poolfleet_progress_reports_total") >= 1
    gate.touch()
    assert running.result(30) == "done"
    assert c.ptask("queue", "resume", "slow").returncode == 0
    assert wait_for(lambda: value("poolfleet_queue_paused", queue="slow") == 0, what="resumed")
    assert wait_for(lambda: value("poolfleet_tasks_reporting_progress") == 0, what="none reporting")

    # every metric the Grafana dashboard queries is one this master exports
    _, exported = _scrape(url)
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bpoolfleet_[a-z_]+\b", e)}
    assert len(queried) >= 10
    assert sorted(queried - exported) == []
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])


# -- the PostgreSQL journal -------------------------------------------------------------------
def test_inspection_and_control_on_the_postgresql_journal(
    make_cluster: type[Cluster], pg_server: PgServer, tmp_path: Path
) -> None:
    db = pg_server.new_database()
    c = make_cluster()
    c.start_master("--journal", pg_server.url(db), "--lease-s", "2", env=pg_server.env)
    c.start_worker(tasks=("pf_outtasks", "pf_testtasks"), name="wp", cpu=1, io=2)
    cl: Client = c.client()
    said = cl.with_options(kind="cpu").submit(f"{T}:chatty", 1)
    assert said.result(30) == 1
    failed = cl.with_options(retries=1).submit("pf_testtasks:boom", "no good")
    assert wait_for(failed.done, what="the failed task")
    ids = [said.task_id, failed.task_id]

    listed = json.loads(c.ptask("tasks", "--json").stdout)["tasks"]
    assert sorted(t["id"] for t in listed) == sorted(ids)
    assert [t["id"] for t in json.loads(c.ptask("tasks", "--json", "--state", "FAILED").stdout)["tasks"]] == [
        failed.task_id
    ]
    shown = json.loads(c.ptask("show", failed.task_id[:13], "--json").stdout)
    assert shown["state"] == "FAILED" and shown["error"]["message"] == "no good"
    assert [(a["attempt"], a["outcome"]) for a in shown["attempts"]] == [
        (1, "FAILED (retried)"),
        (2, "FAILED"),
    ]
    assert c.ptask("logs", said.task_id).stdout == "out 0\nerr 0\nINFO pf_outtasks: log 0\n"
    out = c.ptask("retry", failed.task_id)  # its arguments are kept: it can run again
    assert out.returncode == 0, out.stderr

    assert c.ptask("queue", "pause", "slow").returncode == 0
    parked = cl.with_options(queue="slow").submit("pf_testtasks:add", 1, 1)
    assert parked.ack is not None
    parked.ack.result(10)
    assert json.loads(c.ptask("status", "--json").stdout)["paused"] == ["slow"]
    out = c.ptask("queue", "purge", "slow", "--yes")
    assert out.returncode == 0 and "1 tasks cancelled" in out.stdout
    assert wait_for(parked.done, what="the purged task")
    # a new master on the same database keeps the pause, the attempts and the output
    assert c.master is not None
    c.master.signal(signal.SIGTERM)
    assert c.master.wait(30) == 0
    c.start_master("--journal", pg_server.url(db), "--lease-s", "2", env=pg_server.env)
    assert json.loads(c.ptask("status", "--json").stdout)["paused"] == ["slow"]
    again = json.loads(c.ptask("show", failed.task_id, "--json").stdout)
    assert [a["outcome"] for a in again["attempts"]] == ["FAILED (retried)", "FAILED"]
    assert c.ptask("logs", said.task_id).stdout == "out 0\nerr 0\nINFO pf_outtasks: log 0\n"
