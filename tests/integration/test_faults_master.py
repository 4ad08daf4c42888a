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
        assert c.journal_counts() == {"SUCCEEDED": 2}
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
