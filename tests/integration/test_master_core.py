"""The master core against real daemons: routing by what workers offer, each worker's own task
defaults, no hoarding and honest states, one master per data dir, results that survive a
master kill, and worker identity (twins, restarts, one HELLO per reconnect)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import zmq
from pfharness import BIN, TASKMODS, Cluster, Proc, daemon_env, wait_for
from pfpeers import RawPeer

from poolfleet.client import Client, TaskTimeout
from poolfleet.common import codec
from poolfleet.common.errors import RemoteError
from poolfleet.common.protocol import PROTOCOL_VERSION, MsgKind

BUILTINS = "poolfleet.worker.builtins"


def master_of(c: Cluster) -> Proc:
    assert c.master is not None
    return c.master


def worker_entry(cl: Client, worker_id: str) -> dict[str, Any]:
    found = [w for w in cl.workers() if w["worker_id"] == worker_id]
    assert len(found) == 1, f"{worker_id} is not registered exactly once"
    return found[0]


def offered_in_cli(lines: list[str], worker_id: str, module: str) -> list[str] | None:
    """The functions of ``module`` that ``ptask workers`` lists under "<worker_id> offers:"."""
    at = lines.index(f"{worker_id} offers:")
    for line in lines[at + 1 :]:
        if not line.startswith("  "):
            return None
        if line.startswith(f"  {module}: "):
            return line.split(": ", 1)[1].split(", ")
    return None


def versions_env(which: str) -> dict[str, str]:
    """PYTHONPATH with one version of the module ``pf_defaults`` ahead of the test task modules."""
    return {"PYTHONPATH": os.pathsep.join([str(TASKMODS / which), str(TASKMODS)])}


def done_at_least(futs: Sequence[Future[Any]], n: int) -> bool:
    return sum(f.done() for f in futs) >= n


def read_marks(path: Path) -> dict[int, list[str]]:
    """The lines ``pf_coretasks.mark`` wrote, as ["start", "end", ...] per tag, in file order."""
    runs: dict[int, list[str]] = {}
    for line in path.read_text().splitlines():
        what, tag, _pid = line.split()
        runs.setdefault(int(tag), []).append(what)
    return runs


def ran_again_after_it_returned(runs: dict[int, list[str]]) -> list[int]:
    """Tags with a ``start`` after an ``end``: a task run again after its function had returned."""
    return [tag for tag, seq in runs.items() if "end" in seq and "start" in seq[seq.index("end") :]]


# -- 1. routing by offers ---------------------------------------------------------------------


def test_tasks_go_only_to_workers_that_offer_their_name(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    c.start_master()
    with Client(c.client_endpoint) as cl:
        # before any worker ever registered, any well-formed name is queued
        waiting = [cl.submit("pf_modc:fc", i) for i in range(3)]
        wait_for(lambda: c.journal_counts().get("PENDING") == 3, what="the pf_modc tasks journalled")
        c.start_worker(name="wa", tasks=("pf_moda",), cpu=2)
        c.start_worker(name="wb", tasks=("pf_modb",), cpu=2)

        fa = [cl.submit("pf_moda:fa", i) for i in range(40)]
        fb = [cl.submit("pf_modb:fb", i) for i in range(40)]
        assert [f.result(60)[:2] for f in fa] == [["a", i] for i in range(40)]
        assert [f.result(60)[:2] for f in fb] == [["b", i] for i in range(40)]
        assert {f.info["worker_id"] for f in fa} == {"wa"}
        assert {f.info["worker_id"] for f in fb} == {"wb"}
        assert {f.info["state"] for f in fa + fb} == {"SUCCEEDED"}

        # a name no connected worker offers stays PENDING and is listed as unserved
        st = cl.status()
        assert st["counts"]["PENDING"] == 3
        assert st["unserved"] == [{"name": "pf_modc:fc", "queue": "default", "kind": "cpu", "pending": 3}]
        assert not any(f.done() for f in waiting)
        out = c.ptask("status")
        assert out.returncode == 0, out.stderr
        assert "waiting for a worker that offers them:" in out.stdout
        section = out.stdout.split("waiting for a worker that offers them:")[1]
        assert "pf_modc:fc" in section and "default" in section

        # each worker says what it offers
        wa, wb = worker_entry(cl, "wa"), worker_entry(cl, "wb")
        assert wa["offers"] == sorted(wa["offers"]) and wb["offers"] == sorted(wb["offers"])
        assert "pf_moda:fa" in wa["offers"] and "pf_modb:fb" not in wa["offers"]
        assert "pf_modb:fb" in wb["offers"] and "pf_moda:fa" not in wb["offers"]
        assert f"{BUILTINS}:echo" in wa["offers"]
        out = c.ptask("workers")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert offered_in_cli(lines, "wa", "pf_moda") == ["double_it", "fa"]
        assert offered_in_cli(lines, "wb", "pf_modb") == ["fb"]
        assert offered_in_cli(lines, "wa", "pf_modb") is None
        assert offered_in_cli(lines, "wb", "pf_moda") is None

        # once workers are known, a name none of them ever offered is refused at submit
        with pytest.raises(RemoteError) as refused:
            cl.submit("pf_nosuch:f").result(20)
        assert refused.value.code == "unknown_task"
        assert "pf_nosuch:f" in refused.value.message
        with pytest.raises(RemoteError) as typo:
            cl.submit("pf_moda:doubel_it", 1).result(20)
        assert typo.value.code == "unknown_task"
        assert re.search(
            r"workers load module '?pf_moda'? but it has no function 'doubel_it'; "
            r"did you mean '?pf_moda:double_it'?",
            typo.value.message,
        ), typo.value.message

        # a worker that joins later and offers the name runs what waited for it
        c.start_worker(name="wc", tasks=("pf_modc",), cpu=1)
        assert [f.result(60)[:2] for f in waiting] == [["c", i] for i in range(3)]
        assert {f.info["worker_id"] for f in waiting} == {"wc"}
        st = cl.status()
        assert st["unserved"] == [] and st["counts"]["PENDING"] == 0
        assert st["counts"]["SUCCEEDED"] == 83
    assert c.journal_counts_when({"SUCCEEDED": 83}) == {"SUCCEEDED": 83}


# -- 2. each worker's own defaults ------------------------------------------------------------


def test_each_worker_runs_with_the_defaults_its_own_module_declares(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    m = c.start_master()
    # the same module name in two versions: nap declares timeout_s=0.2 on ws, 30 on wl
    c.start_worker("--queue", "qs", name="ws", tasks=("pf_defaults",), env=versions_env("defaults_short"))
    c.start_worker("--queue", "ql", name="wl", tasks=("pf_defaults",), env=versions_env("defaults_long"))
    name = "pf_defaults:nap"
    conflict = m.wait_event("task_defaults_conflict")
    assert conflict["task_name"] == name
    assert set(conflict["workers"]) == {"ws", "wl"}
    assert {conflict["workers"]["ws"]["timeout_s"], conflict["workers"]["wl"]["timeout_s"]} == {0.2, 30.0}
    with Client(c.client_endpoint) as cl:
        short = [cl.with_options(queue="qs").submit(name, 1.0) for _ in range(2)]
        long_ = [cl.with_options(queue="ql").submit(name, 1.0) for _ in range(2)]
        for f in short:
            with pytest.raises(TaskTimeout):
                f.result(60)
            assert f.info["worker_id"] == "ws" and f.info["state"] == "TIMED_OUT"
        for f in long_:
            assert f.result(60) == "long version finished"
            assert f.info["worker_id"] == "wl"

        # a client's explicit timeout wins over either worker's default
        longer = cl.with_options(queue="qs", timeout_s=30).submit(name, 1.0)
        shorter = cl.with_options(queue="ql", timeout_s=0.2).submit(name, 1.0)
        assert longer.result(60) == "short version finished"
        assert longer.info["worker_id"] == "ws"
        with pytest.raises(TaskTimeout):
            shorter.result(60)
        assert shorter.info["worker_id"] == "wl"

        # both workers show the disagreement
        for wid in ("ws", "wl"):
            assert worker_entry(cl, wid)["conflicts"] == [name]
        out = c.ptask("workers")
        assert out.returncode == 0, out.stderr
        for wid in ("ws", "wl"):
            assert f"{wid}: {name}: other workers declare other defaults for it" in out.stdout

        # a third worker with one of the two versions adds no new disagreement: still logged once
        c.start_worker("--queue", "ql", name="wl2", tasks=("pf_defaults",), env=versions_env("defaults_long"))
        again = cl.with_options(queue="ql").submit(name, 0.1)
        assert again.result(60) == "long version finished"
        assert worker_entry(cl, "wl2")["conflicts"] == [name]
    assert [e["task_name"] for e in m.events("task_defaults_conflict")] == [name]


# -- 3. no hoarding, honest states ------------------------------------------------------------


def test_no_prefetch_before_run_times_are_known_and_a_joining_worker_starts_at_once(
    make_cluster: type[Cluster],
) -> None:
    hb = 0.5
    c = make_cluster(heartbeat_s=hb)
    c.start_master()
    c.start_worker(name="w1", cpu=2, tasks=("pf_coretasks",))
    busy_seen: list[int] = []

    def w1_busy(cl: Client) -> int:
        n = int(worker_entry(cl, "w1")["busy"]["cpu"])
        busy_seen.append(n)
        return n

    with Client(c.client_endpoint) as cl:
        futs = [cl.submit("pf_coretasks:nap", 5.0) for _ in range(10)]
        # a slot started them: RUNNING; the rest waits at the master, not at w1
        wait_for(lambda: cl.status()["counts"]["RUNNING"] == 2 and w1_busy(cl) == 2, what="2 running on w1")
        counts = cl.status()["counts"]
        assert (counts["RUNNING"], counts["DISPATCHED"], counts["PENDING"]) == (2, 0, 8)
        assert worker_entry(cl, "w1")["started"]["cpu"] == 2

        c.start_worker(name="w2", cpu=2, tasks=("pf_coretasks",))
        # within one heartbeat interval of registering, the newcomer has started two of them
        wait_for(
            lambda: w1_busy(cl) <= 2 and worker_entry(cl, "w2")["started"]["cpu"] >= 2,
            timeout=hb,
            interval=0.01,
            what="w2 to start 2 tasks",
        )
        counts = cl.status()["counts"]
        assert (counts["RUNNING"], counts["DISPATCHED"], counts["PENDING"]) == (4, 0, 6)
        assert max(busy_seen) == 2, f"w1 was sent more than its 2 free slots: {busy_seen}"
        out = c.ptask("status")
        assert out.returncode == 0, out.stderr
        rows = dict(
            line.split()[:2] for line in out.stdout.splitlines() if line.split()[:1] == ["DISPATCHED"]
        )
        assert rows == {"DISPATCHED": "0"}
        assert not any(f.done() for f in futs)


def test_prefetched_tasks_go_back_to_a_worker_that_joins_idle(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    hb = 0.5
    c = make_cluster(heartbeat_s=hb)
    c.start_master()
    c.start_worker(name="w1", cpu=2, tasks=("pf_coretasks",))
    marks = tmp_path / "marks.txt"
    with Client(c.client_endpoint) as cl:
        # short tasks first: the master learns that w1's cpu tasks are short and prefetches
        assert [f.result(30) for f in [cl.submit("pf_coretasks:quick", i) for i in range(20)]] == list(
            range(20)
        )
        futs = [cl.submit("pf_coretasks:mark", str(marks), i, 2.0) for i in range(10)]

        def states() -> tuple[int, int, int]:
            counts = cl.status()["counts"]
            return counts["RUNNING"], counts["DISPATCHED"], counts["PENDING"]

        # sent is not started: 2 RUNNING in w1's slots, the rest DISPATCHED to it
        wait_for(lambda: states() == (2, 8, 0), what="2 running and 8 dispatched on w1")
        w1 = worker_entry(cl, "w1")
        assert (w1["busy"]["cpu"], w1["started"]["cpu"]) == (10, 2)
        out = c.ptask("status")
        assert out.returncode == 0, out.stderr
        rows = dict(
            line.split()[:2]
            for line in out.stdout.splitlines()
            if line.split()[:1] in (["DISPATCHED"], ["RUNNING"])
        )
        assert rows == {"DISPATCHED": "8", "RUNNING": "2"}

        c.start_worker(name="w2", cpu=2, tasks=("pf_coretasks",))
        # w1's unstarted tasks are taken back for w2, which starts two within one interval
        wait_for(
            lambda: worker_entry(cl, "w2")["started"]["cpu"] >= 2,
            timeout=hb,
            interval=0.01,
            what="w2 to start 2 tasks",
        )
        assert [f.result(60) for f in futs] == list(range(10))
        by_worker = Counter(f.info["worker_id"] for f in futs)
        assert by_worker["w2"] >= 2
        assert {f.info["attempt"] for f in futs} == {1}  # a task handed back never counted an attempt
    assert master_of(c).events("tasks_recalled")
    runs = read_marks(marks)
    assert {tag: seq for tag, seq in runs.items() if seq != ["start", "end"]} == {}  # each ran once
    assert sorted(runs) == list(range(10))


# -- 4. one master per data dir ---------------------------------------------------------------


def run_pmaster(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pmaster"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=daemon_env(),
        stdin=subprocess.DEVNULL,
    )


def test_a_second_master_on_the_same_data_dir_exits_and_the_first_serves_on(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    first = c.start_master()
    c.start_worker(name="wd")
    with Client(c.client_endpoint) as cl:
        assert cl.submit("pf_testtasks:add", 1, 2).result(20) == 3
        second = run_pmaster(
            "--clients", "tcp://127.0.0.1:0", "--workers", "tcp://127.0.0.1:0", "--data-dir", str(c.data_dir)
        )
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert str(c.data_dir) in lines[0] and f"pid {first.pid}" in lines[0]
        # the first one still serves, its journal untouched by the second
        assert first.alive()
        assert cl.submit("pf_testtasks:add", 2, 3).result(20) == 5
        assert cl.status()["counts"]["SUCCEEDED"] == 2
    assert c.journal_counts_when({"SUCCEEDED": 2}) == {"SUCCEEDED": 2}

    # a master that cannot bind (the port is taken) leaves no new data dir behind
    fresh = tmp_path / "fresh-data"
    taken = run_pmaster(
        "--clients", c.client_endpoint, "--workers", "tcp://127.0.0.1:0", "--data-dir", str(fresh)
    )
    assert taken.returncode != 0
    assert "bind" in taken.stderr or "in use" in taken.stderr, taken.stderr
    assert not fresh.exists()
    assert first.alive()


def test_a_master_that_cannot_bind_leaves_no_new_parent_dirs(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster()
    c.start_master()
    top = tmp_path / "new-parent"
    taken = run_pmaster(
        "--clients", c.client_endpoint, "--workers", "tcp://127.0.0.1:0", "--data-dir", str(top / "data")
    )
    assert taken.returncode != 0
    assert not (top / "data").exists()
    assert not top.exists()


# -- 5. results survive -----------------------------------------------------------------------


def test_master_kill9_three_times_reruns_no_task_that_had_returned(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    c = make_cluster(heartbeat_s=0.2)
    c.start_master()
    workers = [c.start_worker(name=f"wk{i}", cpu=2, tasks=("pf_coretasks",)) for i in range(3)]
    marks = tmp_path / "marks.txt"
    n = 240
    with Client(c.client_endpoint) as cl:
        futs = cl.submit_many("pf_coretasks:mark", [((str(marks), i, 0.05), {}) for i in range(n)])
        for kill, progress in enumerate((30, 90, 150), start=1):
            wait_for(partial(done_at_least, futs, progress), timeout=60, what=f"{progress} results")
            lost_before = [len(w.events("master_lost")) for w in workers]
            master_of(c).kill()  # SIGKILL, tasks running on every worker
            if kill == 2:
                # this time every worker gives up on the master and drops its connection (and
                # whatever was queued in it) before the master comes back
                for w, seen in zip(workers, lost_before, strict=True):
                    w.wait_event("master_lost", count=seen + 1, timeout=30)
            c.restart_master()
        assert [f.result(120) for f in futs] == list(range(n))
        assert {f.info["state"] for f in futs} == {"SUCCEEDED"}
        assert cl.status()["counts"]["SUCCEEDED"] == n
    assert c.journal_counts_when({"SUCCEEDED": n}) == {"SUCCEEDED": n}  # each recorded exactly once
    runs = read_marks(marks)
    assert sorted(runs) == list(range(n))
    assert all("end" in seq for seq in runs.values())
    assert ran_again_after_it_returned(runs) == []
    # a task running at a kill may run twice, but only alongside its first run
    twice = sorted(tag for tag, seq in runs.items() if seq.count("start") > 1)
    print(f"tasks run more than once across 3 master kills: {len(twice)} of {n} {twice}")
    # every kill hit tasks at the workers, which claimed them from the next master (in HELLO, or
    # with their results): recorded DISPATCHED, or still PENDING in the journal (a start is
    # written up to START_DEFER_S late); after the second, the workers sent again the results
    # they kept for want of an acknowledgement
    masters = [p for p in c.procs if p.name.startswith("pmaster")]
    assert len(masters) == 4
    claimed = [
        m.wait_event("journal_recovered")["at_workers"]
        + sum(e["adopted"] for e in m.events("worker_registered"))
        + sum(e["tasks"] for e in m.events("results_claimed"))
        for m in masters[1:]
    ]
    assert all(n > 0 for n in claimed), claimed
    resent = [e.get("buffered_results", 0) for w in workers for e in w.events("worker_registered")]
    assert sum(resent) > 0, resent


def test_a_start_the_journal_has_not_recorded_yet_is_claimed_after_a_kill_not_run_twice(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    """The master writes a start up to START_DEFER_S after the DISPATCH (a task that ends
    sooner costs one write): killed in between, its journal shows the task PENDING at its
    old attempt; the restarted master holds it for the grace and the worker's HELLO claims it."""
    c = make_cluster(heartbeat_s=0.2)
    c.start_master()
    marks = tmp_path / "marks.txt"
    with Client(c.client_endpoint) as cl:
        # submitted (and committed) before any worker is there: its start is a write of its
        # own, not folded into the insert
        [fut] = cl.submit_many("pf_coretasks:mark", [((str(marks), 7, 2.0), {})])
        wait_for(lambda: cl.status()["counts"]["PENDING"] == 1)
        c.start_worker(name="wk", cpu=2, tasks=("pf_coretasks",))
        wait_for(lambda: marks.exists() and "start 7" in marks.read_text())
        master_of(c).kill()
        db = sqlite3.connect(f"file:{c.data_dir / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            [(recorded, attempt)] = db.execute("SELECT state, attempt FROM tasks").fetchall()
        finally:
            db.close()
        print(f"journal at the kill: {recorded} at attempt {attempt}")
        assert (recorded, attempt) in (("PENDING", 0), ("DISPATCHED", 1))
        again = c.restart_master()
        assert fut.result(60) == 7
        assert fut.info["attempt"] == 1  # the same attempt: claimed, not dispatched anew
    assert read_marks(marks) == {7: ["start", "end"]}  # ran once
    assert sum(e["adopted"] for e in again.events("worker_registered")) == 1  # the HELLO claimed it


class GhostWorker:
    """A hand-driven worker that registers, takes DISPATCH, never runs anything and heartbeats
    that it holds nothing; one thread owns its socket."""

    def __init__(self, endpoint: str, heartbeat_s: float, offers: dict[str, dict[str, Any]]) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.endpoint = endpoint
        self.heartbeat_s = heartbeat_s
        self.offers = offers
        self.dispatched: list[dict[str, Any]] = []
        self.welcomed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ghost-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peer = RawPeer(self.ctx, self.endpoint, identity=b"ghost/s1")
        try:
            peer.send(
                MsgKind.HELLO,
                {
                    "version": PROTOCOL_VERSION,
                    "role": "worker",
                    "worker_id": "ghost",
                    "host": "nowhere",
                    "pid": 1,
                    "session": "s1",
                    "queues": ["default"],
                    "slots": {"cpu": 1},
                    "tasks": self.offers,
                    "holding": [],
                },
            )
            while not self._stop.is_set():
                got = peer.recv(self.heartbeat_s / 2)
                if got is not None:
                    kind, body = got
                    if kind is MsgKind.WELCOME:
                        self.welcomed.set()
                    elif kind is MsgKind.DISPATCH:
                        self.dispatched.extend(body["tasks"])
                if self.welcomed.is_set():
                    peer.send(MsgKind.HEARTBEAT, {"holding": []})
        finally:
            peer.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.ctx.term()


def test_a_result_is_acknowledged_by_a_gathered_commit_when_nothing_else_happens(
    make_cluster: type[Cluster],
) -> None:
    """A commit only the workers' ACKs wait for may gather the next turns while messages keep
    coming: with no other traffic at all (heartbeats every 5 s), it is written at once, ACKed."""
    hb = 5.0
    c = make_cluster(heartbeat_s=hb)
    c.start_master()
    ctx: zmq.Context[Any] = zmq.Context()
    peer = RawPeer(ctx, c.worker_endpoint, identity=b"hand/s1")
    try:
        hello = {
            "version": PROTOCOL_VERSION,
            "role": "worker",
            "worker_id": "hand",
            "host": "nowhere",
            "pid": 1,
            "session": "s1",
            "queues": ["default"],
            "slots": {"cpu": 1},
            "tasks": {"pf_moda:fa": {"kind": "cpu"}},
            "holding": [],
        }
        peer.send(MsgKind.HELLO, hello)
        assert peer.recv_until(MsgKind.WELCOME) is not None
        with Client(c.client_endpoint) as cl:
            for n in range(3):
                f = cl.submit("pf_moda:fa", n)
                dispatch = peer.recv_until(MsgKind.DISPATCH)
                assert dispatch is not None
                [task] = dispatch["tasks"]
                ref = {"id": task["id"], "attempt": task["attempt"]}
                value = codec.pack_data(n * 10)
                peer.send(MsgKind.TASK_RESULTS, {"results": [{**ref, "state": "SUCCEEDED", "value": value}]})
                assert f.result(10) == n * 10  # pushed before the commit
                ack = peer.recv_until(MsgKind.ACK, timeout=hb / 2)
                assert ack is not None, "no ACK: the commit that waited was never written"
                assert ack["tasks"] == [ref]
        assert c.journal_counts_when({"SUCCEEDED": 3}) == {"SUCCEEDED": 3}
    finally:
        peer.close()
        ctx.term()


def test_a_dispatch_the_worker_never_holds_is_requeued(make_cluster: type[Cluster]) -> None:
    hb = 0.2
    c = make_cluster(heartbeat_s=hb)
    m = c.start_master()
    ghost = GhostWorker(c.worker_endpoint, hb, {"pf_moda:fa": {"kind": "cpu"}})
    try:
        assert ghost.welcomed.wait(10), "the master never welcomed the hand-driven worker"
        with Client(c.client_endpoint) as cl:
            f = cl.submit("pf_moda:fa", 7)
            wait_for(lambda: ghost.dispatched, what="the DISPATCH to the hand-driven worker")
            assert ghost.dispatched[0]["id"] == f.id_bytes
            # its heartbeats say it holds nothing: within a few intervals the task is back
            requeued = m.wait_event(
                "task_requeued", timeout=10 * hb, where=lambda e: e.get("task_id") == f.task_id
            )
            assert requeued["reason"] == "its worker does not hold it"
            c.start_worker(name="wa", tasks=("pf_moda",), cpu=2)
            assert f.result(30)[:2] == ["a", 7]
            assert f.info["worker_id"] == "wa"
            assert f.info["state"] == "SUCCEEDED"
            # it stayed registered all along: requeued for what it reported, not for silence
            assert "ghost" in {w["worker_id"] for w in cl.workers()}
        assert not [e for e in m.events("worker_expired") if e.get("worker_id") == "ghost"]
        assert not m.events("task_finished")
    finally:
        ghost.close()


# -- 6. worker identity -----------------------------------------------------------------------


def test_a_twin_worker_id_is_refused_and_a_restart_is_let_in(make_cluster: type[Cluster]) -> None:
    c = make_cluster(heartbeat_s=0.2)
    m = c.start_master()
    first = c.start_worker(name="wt", cpu=2, tasks=("pf_coretasks",))
    with Client(c.client_endpoint) as cl:
        futs = [cl.submit("pf_coretasks:nap", 0.2) for _ in range(30)]
        twin = c.start_worker(name="wt-twin", worker_id="wt", cpu=2, tasks=("pf_coretasks",), wait=False)
        refused = twin.wait_event("worker_refused")
        assert refused["pid"] == twin.pid and "worker id" in refused["reason"]
        clash = m.wait_event("worker_id_clash")
        assert clash["worker_id"] == "wt"
        assert (clash["pid"], clash["registered_pid"]) == (twin.pid, first.pid)
        # the healthy tasks never noticed: each ran once, on the first process
        for f in futs:
            f.result(60)
        assert {f.info["attempt"] for f in futs} == {1}
        assert {f.info["worker_id"] for f in futs} == {"wt"}
        assert not m.events("task_requeued") and not m.events("worker_removed")
        assert worker_entry(cl, "wt")["pid"] == first.pid
        assert not twin.events("worker_registered")

        # a real restart: the old process dies, a new one with the same worker id gets in
        twin.kill()
        first.kill()
        again = c.start_worker(name="wt-again", worker_id="wt", cpu=2, tasks=("pf_coretasks",))
        m.wait_event("worker_registered", where=lambda e: e.get("pid") == again.pid)
        f = cl.submit("pf_coretasks:nap", 0.01)
        assert f.result(30) > 0
        assert f.info["worker_id"] == "wt"
        assert worker_entry(cl, "wt")["pid"] == again.pid


def test_one_reregistration_per_reconnect_after_a_master_restart(make_cluster: type[Cluster]) -> None:
    # a long liveness: the master comes back well before the workers would give up on it, so each
    # worker reconnects through the not_registered replies to what it had sent meanwhile
    c = make_cluster(heartbeat_s=0.2, liveness=25)
    c.start_master()
    workers = [c.start_worker(name=f"wr{i}", cpu=2, tasks=("pf_coretasks",)) for i in range(2)]
    with Client(c.client_endpoint) as cl:
        futs = [cl.submit("pf_coretasks:nap", 0.3) for _ in range(40)]
        wait_for(lambda: sum(f.done() for f in futs) >= 4, timeout=30, what="4 results")
        master_of(c).kill()
        second = c.restart_master("--recovery-grace-s", "1")
        for w in workers:
            w.wait_event("worker_registered", count=2, timeout=30)
        for f in futs:
            f.result(60)
        assert {f.info["state"] for f in futs} == {"SUCCEEDED"}
        assert cl.status()["counts"]["SUCCEEDED"] == 40
    for w in workers:
        assert not w.events("master_lost"), f"{w.name} gave up on the master instead"
        assert len(w.events("worker_reregistering")) == 1, w.log_tail()
        assert len(w.events("worker_registered")) == 2
        hellos = [e for e in second.events("worker_registered") if e.get("worker_id") == w.name]
        assert len(hellos) == 1, hellos
    assert c.journal_counts_when({"SUCCEEDED": 40}) == {"SUCCEEDED": 40}


def test_a_burst_of_not_registered_replies_gets_one_hello(make_cluster: type[Cluster]) -> None:
    from pfpeers import FakeMaster

    c = make_cluster(heartbeat_s=0.2)
    ctx: zmq.Context[Any] = zmq.Context()
    fake = FakeMaster(ctx)
    try:
        w = c.start_worker(name="wn", master=fake.endpoint, wait=False)
        fake.wait_worker()
        w.wait_event("worker_registered")
        assert fake.hellos == 1
        # five replies saying "not registered" at once, as after a master restart with several
        # messages of this worker in flight
        for _ in range(5):
            fake.send(
                MsgKind.ERROR, {"code": "not_registered", "message": "unknown worker: send HELLO first"}
            )

        def second_hello() -> bool:
            fake.pump(0.05)
            return fake.hellos >= 2

        wait_for(second_hello, timeout=10, what="the second HELLO")
        # the fake welcomed it again: its next heartbeat shows it has handled every reply
        w.wait_event("worker_registered", count=2)
        heard = fake.received
        fake.wait_heard(heard + 2)
        assert fake.hellos == 2
        assert len(w.events("worker_reregistering")) == 1
    finally:
        fake.close()
        ctx.term()
