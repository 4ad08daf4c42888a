"""A new user's first hour: every message says what happened and what to do.

Each test asserts the exact words (and hint) a user sees, from real daemons and a real
ptask over loopback sockets.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pf_testtasks
import pytest
from pfharness import BIN, Cluster, daemon_env

from poolfleet.client import Client
from poolfleet.common.suggest import unknown_task_message
from poolfleet.worker.registry import TaskRegistry

UNREACHABLE_HINT = "(hint: is pmaster running? check --master or POOLFLEET_MASTER)"


def free_endpoint() -> str:
    """A loopback endpoint nothing listens at (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=daemon_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the process's stderr, or fail after ``timeout`` seconds."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    assert ready, f"no line on stderr within {timeout} s"
    return proc.stderr.readline()


# -- 19.1: no master running --------------------------------------------------------------
def test_ptask_says_within_2_s_that_nothing_listens_and_keeps_trying(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    ep = free_endpoint()
    argv = [
        str(BIN / "ptask"),
        "--master",
        ep,
        "submit",
        "pf_testtasks:add",
        "2",
        "3",
        "--wait",
        "--timeout",
        "60",
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        notice = read_line(proc, timeout=10)
        waited = time.monotonic() - started
        assert notice == (
            f"ptask: nothing is listening at {ep}; ptask keeps trying until --timeout (60 s) {UNREACHABLE_HINT}\n"
        )
        assert waited < 4.5, f"the notice came after {waited:.1f} s"
        assert proc.poll() is None  # still trying
        # a master that comes up meanwhile gets the task
        c.start_master(clients=ep)
        c.start_worker(name="wlate")
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, "5\n"), err
        assert err.startswith("ptask: submitted task ") and err.count("\n") == 1  # the id line only
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_read_only_commands_give_up_after_a_short_default() -> None:
    ep = free_endpoint()
    for cmd in ("status", "workers"):
        r = run(str(BIN / "ptask"), "--master", ep, cmd, timeout=30)
        assert r.returncode == 3, r.stderr
        assert r.stderr.splitlines() == [
            f"ptask: nothing is listening at {ep}; ptask keeps trying until --timeout (5 s) {UNREACHABLE_HINT}",
            f"ptask: error: nothing is listening at {ep}, after 5 s of trying (--timeout) {UNREACHABLE_HINT}",
        ]


def test_ptask_says_when_the_endpoint_is_not_the_masters_client_endpoint(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    r = run(str(BIN / "ptask"), "--master", c.worker_endpoint, "status", "--timeout", "20", timeout=30)
    assert r.returncode == 3
    # the master's worker socket refuses the client's HELLO: ptask gives up at once, with that reason
    assert r.stderr.startswith(f"ptask: error: {c.worker_endpoint} refused this client: ")
    assert r.stderr.endswith(
        " (hint: check that --master is the endpoint pmaster serves clients on (its --clients))\n"
    )
    assert r.stderr.count("\n") == 1


def test_ptask_says_when_a_peer_accepts_but_no_master_answers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:  # accepts, never speaks
        ep = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
        r = run(str(BIN / "ptask"), "--master", ep, "status", "--timeout", "3", timeout=30)
    assert r.returncode == 3
    hint = "(hint: check that --master is the endpoint pmaster serves clients on (its --clients))"
    assert r.stderr.splitlines() == [
        f"ptask: connected to {ep}, but no pmaster has answered there; ptask keeps trying until --timeout "
        f"(3 s) {hint}",
        f"ptask: error: connected to {ep}, but no pmaster has answered there, after 3 s of trying (--timeout) "
        f"{hint}",
    ]


# -- 13.7: an idle client keeps its connection --------------------------------------------
def test_idle_client_keeps_its_connection_and_sends_its_next_request_once(
    make_cluster: type[Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    from pfpeers import TcpRelay

    c = make_cluster()
    c.start_master()
    c.start_worker(name="widle")
    relay = TcpRelay(c.client_endpoint)  # counts the client's connections and what it sends
    caplog.set_level(logging.INFO, logger="poolfleet.client")
    try:
        with Client(relay.endpoint) as cl:
            assert cl.status(timeout_s=10)["workers"] == 1
            # The subject of the test, not a synchronisation: stay idle past the client's
            # silence limit (1 s heartbeats x liveness 3).
            time.sleep(4.5)
            marker = f"idle-{uuid.uuid4().hex}"
            f = cl.submit(pf_testtasks.add, marker, "!")
            assert f.result(20) == marker + "!"
            assert relay.sent.count(marker.encode()) == 1, "the request went to the master more than once"
            assert relay.accepted == 1, "the client reconnected"
    finally:
        relay.close()
    # (clients of earlier tests may still log from their own threads: only this one's count)
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "master_silent" in m and relay.endpoint in m], said


# -- 19.2: a typo in a task name ----------------------------------------------------------
def _offered() -> list[str]:
    return list(TaskRegistry.load(["pf_testtasks"]).to_wire())


def test_typo_in_a_function_name_names_the_closest_offered_names(cluster: Cluster) -> None:
    r = cluster.ptask("submit", "pf_testtasks:ad", "1", "2")
    assert r.returncode == 4
    message = unknown_task_message("pf_testtasks:ad", _offered())
    assert message.endswith("has no function 'ad'; did you mean pf_testtasks:add?")
    assert r.stderr == (
        f"ptask: error: unknown_task: {message} (hint: see 'ptask workers' for what the workers offer)\n"
    )


def test_ptask_workers_lists_what_the_workers_offer(cluster: Cluster) -> None:
    r = cluster.ptask("workers")
    assert r.returncode == 0, r.stderr
    block = r.stdout.split("\n\n", 1)[1].splitlines()
    assert block[0] == "wa, wb offer:"
    functions = sorted(n.split(":")[1] for n in _offered() if n.startswith("pf_testtasks:"))
    assert f"  pf_testtasks: {', '.join(functions)}" in block


def test_ptask_workers_without_offers_still_lists_the_workers(cluster: Cluster) -> None:
    r = cluster.ptask("workers")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["worker", "host", "pid", "queues", "running/slots", "heartbeat"]
    assert sorted(line.split()[0] for line in lines[1:3]) == ["wa", "wb"]


# -- 19.3: --tasks with a file, and a worker with built-ins only -----------------------------
def test_pworker_loads_a_task_file_given_by_path(make_cluster: type[Cluster], tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "myfiletasks.py").write_text(
        "import os\n\n\ndef square(x):\n    return x * x\n\n\ndef where():\n    return os.getpid()\n"
    )
    c = make_cluster()
    c.start_master()
    w = c.start_worker(name="wfile", tasks=(str(jobs / "myfiletasks.py"),), cpu=1)
    started = w.wait_event("worker_started")
    assert started["modules"] == ["myfiletasks", "poolfleet.worker.builtins"]
    r = c.ptask("submit", "myfiletasks:square", "7", "--wait")  # kind cpu: runs in a pool child
    assert (r.returncode, r.stdout) == (0, "49\n"), r.stderr
    assert re.fullmatch(  # the id, told as soon as the master acknowledged the task
        r"ptask: submitted task [0-9a-f-]{36}; waiting for its result \(Ctrl-C stops waiting, not the task\)\n",
        r.stderr,
    )
    r = c.ptask("submit", "myfiletasks:where", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["result"] != w.pid  # a pool child imported the file by name


def test_pworker_task_file_that_does_not_exist_says_to_give_the_module_name(tmp_path: Path) -> None:
    r = run(str(BIN / "pworker"), "--tasks", "mytasks.py")
    assert r.returncode == 2
    assert r.stderr == (
        "pworker: error: no task file 'mytasks.py'; --tasks takes a module name without .py (--tasks mytasks, "
        "importable from the working directory or PYTHONPATH) or the path of an existing .py file\n"
    )


def test_worker_without_tasks_warns_that_it_offers_only_the_builtins(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    w = c.start_worker(name="wbare", tasks=())
    ev = w.wait_event("worker_offers_builtins_only")
    assert ev["level"] == "warning"
    assert ev["modules"] == ["poolfleet.worker.builtins"]
    assert ev["hint"] == (
        "start pworker with --tasks MODULE (or --tasks path/to/file.py) to run your own functions"
    )


# -- 19.6: a worker whose master is not there ------------------------------------------------
def test_worker_that_cannot_reach_its_master_at_start_says_where(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    ep = free_endpoint()
    w = c.start_worker(name="wlonely", master=ep, wait=False)
    ev = w.wait_event("master_unreachable")
    assert ev["endpoint"] == ep
    assert ev["reason"].startswith(f"cannot reach the master at {ep} (no message for ")
    assert ev["reason"].endswith(" s); is pmaster running there?")
    assert w.events("master_lost") == []


# -- 19.4: ptask run shows the exit code ----------------------------------------------------
def test_ptask_run_shows_the_programs_exit_code(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    c.start_worker("--allow-cmd", "sh", name="wsh")
    r = c.ptask("run", "--wait", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (1, "out\n", "err\nptask: sh exited with code 3\n")
    r = c.ptask("run", "--wait", "--", "sh", "-c", "kill -9 $$")
    assert (r.returncode, r.stderr) == (1, "ptask: sh was killed by signal 9\n")
    r = c.ptask("run", "--wait", "--", "sh", "-c", "echo fine")
    assert (r.returncode, r.stdout, r.stderr) == (0, "fine\n", "")


# -- 19.5: task ids as ptask prints them -------------------------------------------------------
ID_ERROR = (
    "a task id is the 36-character form ptask prints, like 0190f1b2-3c4d-7e5f-8a6b-7c8d9e0f1a2b, "
    "with or without its dashes (32 hex digits)"
)


def test_task_ids_are_taken_with_or_without_dashes(cluster: Cluster) -> None:
    r = cluster.ptask("submit", "pf_testtasks:add", "20", "22")
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip()
    assert len(printed) == 36
    for form in (printed, printed.replace("-", ""), printed.upper()):
        r = cluster.ptask("result", form, "--wait")
        assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr


def test_a_bad_task_id_is_bad_usage_at_once_and_says_what_an_id_looks_like() -> None:
    ep = free_endpoint()  # no master: a bad id needs none to be refused
    # (a run of hex digits is an id prefix, which the master resolves: see test_operate.py)
    for argv in (
        ["result", "12345z"],
        ["result", "12345z", "--wait"],
        ["cancel", "12345z"],
        ["show", "12345z"],
    ):
        r = run(str(BIN / "ptask"), "--master", ep, *argv, timeout=30)
        expected = f"ptask: error: not a task id or id prefix: '12345z'; {ID_ERROR}, or its first digits\n"
        assert (r.returncode, r.stderr) == (2, expected), argv


# -- 19.6: help that tells the truth ----------------------------------------------------------
def test_query_commands_do_not_offer_a_wait_they_do_not_have() -> None:
    for cmd in ("cancel", "status", "workers"):
        r = run(str(BIN / "ptask"), cmd, "--help")
        assert r.returncode == 0
        assert "--wait" not in r.stdout, cmd
        assert "Seconds to wait for the master's answer." in r.stdout, cmd


def test_pworker_help_says_tasks_takes_a_file_and_what_runs_without_it() -> None:
    r = run(str(BIN / "pworker"), "--help")
    text = " ".join(r.stdout.split())
    assert "Module (mypkg.tasks) or .py file (path/to/mytasks.py)" in text
    assert "without it, only poolfleet's built-ins." in text


def test_a_worker_started_from_another_directory_finds_a_relative_task_file(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    here = tmp_path / "c0"  # the worker's working directory (the harness starts it in its log dir)
    here.mkdir(parents=True, exist_ok=True)
    (here / "reltasks.py").write_text("def hello(name):\n    return 'hello ' + name\n")
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wrel", tasks=(os.path.join(".", "reltasks.py"),))
    r = c.ptask("submit", "reltasks:hello", "you", "--wait")
    assert (r.returncode, r.stdout) == (0, "hello you\n"), r.stderr


def test_pmaster_help_shows_the_journal_sync_default() -> None:
    r = run(str(BIN / "pmaster"), "--help")
    text = " ".join(r.stdout.split())
    assert "or full (also power loss) [normal]." in text
