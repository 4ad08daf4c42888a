"""The master under faults and hostile peers: a full disk, a damaged journal, clients that
never read, huge frames, a flood of idle connections. It keeps running and loses nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pf_testtasks
import pytest
from pfharness import Cluster, unavailable, wait_for

from poolfleet.client import Client
from poolfleet.common.errors import RemoteError


# -- a full disk -------------------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(where: Path, size: str = "5m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (needs root), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        unavailable("mount is not installed")
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system of ``disk`` to the last byte with one file; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler


def journal_states(c: Cluster) -> dict[str, int]:
    """Tasks by state in the journal file, read without writing to it."""
    db = sqlite3.connect(f"file:{c.data_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
    finally:
        db.close()


def refused(fut: object) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fut.result(30)  # type: ignore[attr-defined]
    return info.value


@pytest.mark.system
def test_full_disk_refuses_submits_keeps_results_and_recovers(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        c = make_cluster()
        c.data_dir = disk / "data"
        master = c.start_master()
        c.start_worker(name="wd")
        gate = tmp_path / "gate"
        big = b"p" * 300_000
        with Client(c.client_endpoint) as cl:
            # a task running when the disk fills; its 1.5 MB result cannot be written then
            running = cl.submit(pf_testtasks.wait_file, str(gate), 1_500_000)
            wait_for(lambda: cl.results([running.task_id])[running.task_id]["state"] == "RUNNING")
            wait_for(lambda: journal_states(c) == {"DISPATCHED": 1})  # its start, written deferred
            filler = fill(disk)
            first = refused(cl.submit(pf_testtasks.echo_big, big, 1))
            assert first.code == "journal_unavailable"
            assert "full" in first.message and str(disk / "data") in first.message
            master.wait_event("journal_unavailable")
            assert cl.status()["counts"]["RUNNING"] == 1  # STATUS still answers
            gate.touch()
            # the result reached the master (a fetch shows it) but is not recorded, so the
            # worker keeps it (no ACK before the commit)
            wait_for(lambda: cl.results([running.task_id])[running.task_id]["state"] == "SUCCEEDED")
            assert journal_states(c) == {"RUNNING": 1} or journal_states(c) == {"DISPATCHED": 1}
            again = refused(cl.submit(pf_testtasks.echo_big, big, 2))
            assert again.code == "journal_unavailable"
            assert len(master.events("journal_unavailable")) == 1  # once per episode
            assert master.alive()
            filler.unlink()
            # space is back: the held result is recorded and pushed, submits are accepted
            assert running.result(30) == b"r" * 1_500_000
            master.wait_event("journal_available")
            assert cl.submit(pf_testtasks.add, 2, 3).result(30) == 5
        assert c.journal_counts_when({"SUCCEEDED": 2}) == {"SUCCEEDED": 2}
        # a restart on a full disk does not crash-loop: a one-line error, exit status 2 (the
        # systemd unit does not restart on 2)
        master.signal(signal.SIGTERM)
        assert master.wait(30) == 0
        filler = fill(disk)
        assert c.master is not None
        out = subprocess.run(c.master.argv, capture_output=True, text=True, timeout=60, env=c.master.env)
        assert out.returncode == 2, out.stderr
        line = out.stderr.strip()
        assert line.startswith("pmaster: error: cannot open the journal") and "\n" not in line
        assert "full" in line and str(disk / "data") in line
        filler.unlink()
        again_master = c.restart_master()
        with Client(c.client_endpoint) as cl:
            assert cl.status()["counts"]["SUCCEEDED"] == 2
            assert cl.submit(pf_testtasks.add, 1, 1).result(30) == 2
        again_master.signal(signal.SIGTERM)
        assert again_master.wait(30) == 0


# -- a damaged journal -------------------------------------------------------------------------
def stopped_journal(c: Cluster) -> Path:
    """A journal with results and pending tasks, its master stopped cleanly (WAL folded in)."""
    c.start_master()
    c.start_worker(name="wj")
    cl = c.client()  # closed at teardown: its held futures stay open
    assert [f.result(30) for f in [cl.submit(pf_testtasks.add, i, 1) for i in range(7)]] == list(range(1, 8))
    cl.pause_queue("held")
    futs = [cl.with_options(queue="held").submit(pf_testtasks.add, i, 2) for i in range(8)]
    for f in futs:
        f.ack.result(30)  # type: ignore[union-attr]
    assert c.master is not None
    c.master.signal(signal.SIGTERM)
    assert c.master.wait(30) == 0
    return c.data_dir / "journal.sqlite3"


def start_fails(c: Cluster) -> str:
    assert c.master is not None
    out = subprocess.run(c.master.argv, capture_output=True, text=True, timeout=60, env=c.master.env)
    assert out.returncode == 2, out.stderr
    return out.stderr.strip()


def damage_header(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.write(b"not a database!!")


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2 + 100)


def flip_index_page(path: Path) -> None:
    """Garbage over the first bytes of the expiry index's root page (its b-tree header)."""
    db = sqlite3.connect(str(path))
    page = db.execute("PRAGMA page_size").fetchone()[0]
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tasks_expiry'").fetchone()[0]
    db.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(bytes([0x0D, 0xFF, 0xFF, 0x7F, 0x7F, 0x00, 0x01, 0xFF]) * 4)


@pytest.mark.parametrize("damage", [damage_header, truncate, flip_index_page])
def test_damaged_journal_is_a_one_line_start_error(make_cluster: type[Cluster], damage: object) -> None:
    c = make_cluster()
    path = stopped_journal(c)
    damage(path)  # type: ignore[operator]
    line = start_fails(c)
    assert line.startswith(f"pmaster: error: the journal at {path} is damaged") and "\n" not in line
    assert "OPERATIONS.md" in line and ".recover" in line
    assert "Traceback" not in line


def test_rows_of_unknown_state_or_kind_are_reported_and_left_alone(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    path = stopped_journal(c)
    db = sqlite3.connect(str(path))
    pending = [r[0] for r in db.execute("SELECT id FROM tasks WHERE state = 'PENDING' ORDER BY id")]
    assert len(pending) == 8
    with db:
        db.executemany("UPDATE tasks SET state = 'PENDINX' WHERE id = ?", [(t,) for t in pending[:5]])
        db.execute("UPDATE tasks SET kind = 'gpu' WHERE id = ?", (pending[5],))
    db.close()
    master = c.restart_master()
    ev = master.wait_event("journal_rows_invalid")
    assert ev["count"] == 6
    assert ev["reasons"] == {"unknown state 'PENDINX'": 5, "unknown kind 'gpu'": 1}
    with Client(c.client_endpoint) as cl:
        st = cl.status()
        assert "PENDINX" not in st["counts"]
        assert st["counts"]["SUCCEEDED"] == 7 and st["counts"]["PENDING"] == 2
        cl.resume_queue("held")
        c.start_worker("--queue", "held", name="wj2")
        wait_for(lambda: cl.status()["counts"]["SUCCEEDED"] == 9, what="the two good tasks run")
    master.signal(signal.SIGTERM)
    assert master.wait(30) == 0
    # nothing was dropped: the six rows are still there, as they were
    states = journal_states(c)
    assert states == {"SUCCEEDED": 9, "PENDINX": 5, "PENDING": 1}


# -- a client that does not read ---------------------------------------------------------------
RESULT_BYTES = 25_000


STOPPED_CLIENT = """
import sys, time
from poolfleet.client import Client
endpoint, start, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with Client(endpoint) as cl:
    futs = cl.submit_many("pf_testtasks:wait_file", [((start, size), {}) for _ in range(n)])
    for f in futs:
        f.ack.result(120)
    print("submitted", flush=True)
    ok = sum(f.result(300) == b"r" * size for f in futs)
    print(f"results {ok}", flush=True)
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_pushes_to_a_client_that_does_not_read_are_bounded(
    make_cluster: type[Cluster], tmp_path: Path
) -> None:
    """A client stopped (SIGSTOP: not even ZeroMQ reads its socket) while 300 MB of results
    are pushed to it: the master stops pushing at its 16 MiB budget and its memory stays
    bounded; continued, the client gets every result."""
    import sys

    from pfharness import daemon_env

    c = make_cluster(heartbeat_s=1.0, liveness=10)  # 300 MB through a loaded machine: no expiry churn
    master = c.start_master()
    c.start_worker(name="wp", cpu=1, io=4)
    start = tmp_path / "start"
    n = 12_000
    client = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLIENT, c.client_endpoint, str(start), str(n), str(RESULT_BYTES)],
        stdout=subprocess.PIPE,
        text=True,
        env=daemon_env(),
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "submitted"
        base = rss_mib(master.pid)
        client.send_signal(signal.SIGSTOP)
        start.touch()
        with Client(c.client_endpoint) as watcher:
            wait_for(
                lambda: watcher.status()["counts"].get("SUCCEEDED", 0) == n,
                timeout=180,
                what="all tasks done",
            )
        paused = master.wait_event("pushes_paused")
        assert paused["unread_bytes"] <= 32 * 1024 * 1024  # the budget and one push at most
        grown = rss_mib(master.pid) - base
        # without the budget all 300 MB waited in the master for the client
        assert grown < 200, f"master RSS grew {grown:.0f} MiB for a client that does not read"
        client.send_signal(signal.SIGCONT)
        assert client.stdout.readline().strip() == f"results {n}"  # every result, none lost
        # (by a refetch when the master resumes its pushes, or by the resync of a client
        # that, continued, found its master silent for too long and reconnected)
        assert client.wait(60) == 0
    finally:
        client.kill()
        client.send_signal(signal.SIGCONT)
        client.wait(30)
        if client.stdout is not None:
            client.stdout.close()


# -- huge frames ---------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_huge_submit_map_is_refused_before_it_is_built(make_cluster: type[Cluster]) -> None:
    import msgpack
    import zmq

    from poolfleet.common.messages import decode, encode
    from poolfleet.common.protocol import MAGIC, PROTOCOL_VERSION, MsgKind

    c = make_cluster()
    master = c.start_master()
    c.start_worker(name="wh")
    # a SUBMIT body of one map with just under a million keys: msgpack's item limits let it
    # through, and building it took 0.8 s and more of the master's loop each time
    keys = 999_990
    rest = b"".join(msgpack.packb(f"k{i}") + b"\x00" for i in range(keys))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    try:
        sock.connect(c.client_endpoint)
        sock.send_multipart(encode(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "client"}))
        assert decode(sock.recv_multipart())[0] is MsgKind.WELCOME
        before = cpu_s(master.pid)
        for req in range(1, 31):
            body = b"\xdf" + (keys + 1).to_bytes(4, "big") + msgpack.packb("req") + msgpack.packb(req) + rest
            sock.send_multipart([MAGIC, bytes((MsgKind.SUBMIT,)), body])
        for req in range(1, 31):
            kind, body = decode(sock.recv_multipart())
            assert kind is MsgKind.ERROR and body["req"] == req
            assert body["code"] == "bad_frame" and "max_map_len" in body["message"]
        with Client(c.client_endpoint) as cl:
            assert cl.submit(pf_testtasks.add, 20, 22).result(30) == 42
        used = cpu_s(master.pid) - before
        assert used < 5, f"the master used {used:.1f} CPU seconds on 30 refused frames"
        assert master.alive()
    finally:
        sock.close()
        ctx.term()


# -- a flood of idle connections -----------------------------------------------------------------
def test_idle_connection_flood_under_a_low_descriptor_limit(make_cluster: type[Cluster]) -> None:
    """1,200 idle TCP connections at a master limited to 256 descriptors: the master caps them
    (a log line), keeps its descriptors for workers and the journal, does not spin, and real
    clients and a new worker are served."""
    import resource
    import socket

    if shutil.which("prlimit") is None:
        unavailable("prlimit is not installed (util-linux)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip(f"the test needs 1,400 descriptors of its own, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    c = make_cluster()
    master = c.start_master(wrap=["prlimit", "--nofile=128:256"])
    raised = master.wait_event("fd_limit_raised")
    assert raised["soft"] == 256 and raised["was"] == 128
    c.start_worker(name="wf1")
    host, port = c.client_endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    idle: list[socket.socket] = []
    try:
        for _ in range(1200):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((host, int(port)))
            idle.append(s)
        capped = master.wait_event("connections_capped")
        assert capped["socket"] == "clients" and capped["cap"] < 128
        before = cpu_s(master.pid)
        out = c.ptask("submit", "pf_testtasks:add", "2", "40", "--wait", "--timeout", "60", timeout=90)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "42"
        c.start_worker(name="wf2")  # waits for worker_registered
        with Client(c.client_endpoint) as cl:
            futs = [cl.submit(pf_testtasks.square, i) for i in range(50)]
            assert [f.result(60) for f in futs] == [i * i for i in range(50)]
        used = cpu_s(master.pid) - before
        # a master spinning on accept() failing would use about one CPU second per second
        assert used < 10, f"the master used {used:.1f} CPU seconds"
        assert master.alive()
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_damage_found_while_running_is_logged_and_the_master_serves_on(make_cluster: type[Cluster]) -> None:
    c = make_cluster()
    path = stopped_journal(c)
    master = c.restart_master()  # the journal is sound at start
    # another connection's write makes the master's SQLite drop its page cache at its next read;
    # then the expiry index's page is damaged in the file: the next sweep reads it from there
    db = sqlite3.connect(str(path))
    with db:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('test', 'x')")
    db.close()
    flip_index_page(path)
    failed = master.wait_event("results_expiry_failed")
    assert "malformed" in failed["reason"] or "damaged" in failed["reason"] or "corrupt" in failed["reason"]
    with Client(c.client_endpoint) as cl:
        assert cl.status()["counts"]["SUCCEEDED"] == 7  # STATUS still answers
    assert master.alive()
    assert len(master.events("results_expiry_failed")) == 1  # once, not every second
    master.signal(signal.SIGTERM)
    assert master.wait(30) == 0
