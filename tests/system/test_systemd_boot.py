"""The units under a real systemd: a container boots systemd as PID 1, with
poolfleet installed the way docs/OPERATIONS.md describes (the venv in
/opt/poolfleet, the user from the sysusers file, the unit files as shipped,
settings in /etc/poolfleet).

``systemd-analyze verify`` checks syntax only; this shows that the daemons
really start (READY), keep the watchdog, stop cleanly (drain) and run tasks
inside the sandbox the hardening directives build. The image is built by
deploy/docker/build.sh on a Debian base made with debootstrap that also has
systemd, cached by tag.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pfharness import events_named, unavailable, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BUILD = DEPLOY / "docker" / "build.sh"
BASE = "poolfleet-base-systemd:bookworm"
BUILT = "poolfleet-systemd:build"
IMAGE = "poolfleet-systemd:test"
WORKERS = "tcp://127.0.0.1:5556"

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

# Installation steps of docs/OPERATIONS.md, on top of the image that has /opt/poolfleet.
# The test's only change to the units: a short watchdog, through a drop-in as an
# operator would do it, so that pings are seen within seconds.
DOCKERFILE = """\
FROM {built}
LABEL org.poolfleet.image=systemd-test
USER root
RUN userdel poolfleet && rm -rf /var/lib/poolfleet
COPY poolfleet.sysusers.conf /usr/lib/sysusers.d/poolfleet.conf
COPY pmaster.service pworker.service pworker@.service /etc/systemd/system/
COPY etc/ /etc/
WORKDIR /
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
"""
SETTINGS = {
    "poolfleet/pmaster.env": "POOLFLEET_MASTER_HEARTBEAT_INTERVAL_S=0.5\n",
    "poolfleet/pworker.env": f"POOLFLEET_WORKER_MASTER={WORKERS}\nPOOLFLEET_WORKER_CPU=1\nPOOLFLEET_WORKER_IO=2\n"
    "POOLFLEET_WORKER_HEARTBEAT_INTERVAL_S=0.5\n",
    "poolfleet/pworker-b.env": "POOLFLEET_WORKER_QUEUE=b\nPOOLFLEET_WORKER_ALLOW_CMD=id,touch\n",
    "systemd/system/pmaster.service.d/watchdog.conf": "[Service]\nWatchdogSec=2s\n",
    "systemd/system/pworker.service.d/watchdog.conf": "[Service]\nWatchdogSec=2s\n",
    "systemd/system/pworker@.service.d/watchdog.conf": "[Service]\nWatchdogSec=2s\n",
}


class Host:
    """A container running systemd; commands run in it with `docker exec`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sh(self, *argv: str, check: bool = True, timeout: float = 120) -> str:
        proc = subprocess.run(
            ["docker", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout.strip()

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def ptask(self, *args: str, check: bool = True) -> Any:
        command, *rest = args
        out = self.sh("/opt/poolfleet/bin/ptask", command, "--json", *rest, check=check)
        return json.loads(out.splitlines()[-1])

    def events(self, unit: str, name: str) -> list[dict[str, Any]]:
        return events_named(self.sh("journalctl", "--unit", unit, "--output", "cat", "--no-pager"), name)

    def busy(self, worker_id: str) -> int:
        for w in self.ptask("workers"):
            if w["worker_id"] == worker_id:
                return sum(w["busy"].values())
        return 0


def docker_build(context: Path, tag: str) -> None:
    proc = subprocess.run(
        ["docker", "build", "--tag", tag, str(context)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Host]:
    if shutil.which("docker") is None:
        unavailable("docker is not installed")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        unavailable("no Docker engine is reachable")
    started = time.monotonic()
    built = subprocess.run(
        [str(BUILD)],
        env={
            **os.environ,
            "POOLFLEET_BASE_IMAGE": BASE,
            "POOLFLEET_BASE_PACKAGES": "systemd,systemd-sysv,dbus,procps",
            "POOLFLEET_IMAGE": BUILT,
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        timeout=840,
        stdin=subprocess.DEVNULL,
    )
    assert built.returncode == 0, f"build.sh failed:\n{built.stderr[-4000:]}"
    ctx = tmp_path_factory.mktemp("systemd-image")
    (ctx / "Dockerfile").write_text(DOCKERFILE.format(built=BUILT))
    for name in ("pmaster.service", "pworker.service", "pworker@.service", "poolfleet.sysusers.conf"):
        shutil.copy(DEPLOY / "systemd" / name, ctx / name)
    for rel, text in SETTINGS.items():
        (ctx / "etc" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / "etc" / rel).write_text(text)
    docker_build(ctx, IMAGE)
    subprocess.run(
        ["docker", "image", "prune", "--force", "--filter", "label=org.poolfleet.image=systemd-test"],
        capture_output=True,
        timeout=60,
    )
    sys.stderr.write(f"\n{IMAGE} ready in {time.monotonic() - started:.1f} s\n")

    name = f"pfsystemd-{uuid.uuid4().hex[:8]}"
    # systemd needs to mount (the units' sandboxes are mount namespaces) and its
    # own /run; nothing else is granted.
    argv = ["docker", "run", "--detach", "--name", name, "--hostname", "pfhost", "--cap-add", "SYS_ADMIN"]
    argv += ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]
    argv += ["--tmpfs", "/run", "--tmpfs", "/run/lock", "--volume", "/sys/fs/cgroup:/sys/fs/cgroup:ro", IMAGE]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    h = Host(name)
    failed_before = request.session.testsfailed
    try:
        try:
            wait_for(
                lambda: h.sh("systemctl", "is-system-running", check=False) in ("running", "degraded"),
                60,
                0.2,
                "systemd to boot in the container",
            )
        except AssertionError:
            logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stdout
            unavailable(f"systemd does not boot in a container on this host:\n{logs[-2000:]}")
        yield h
    finally:
        if request.session.testsfailed > failed_before:
            sys.stderr.write(h.sh("journalctl", "--no-pager", "-n", "150", check=False))
        subprocess.run(["docker", "rm", "--force", "--volumes", name], capture_output=True, timeout=120)


def watchdog_pinged(host: Host, unit: str, times: int) -> Callable[[], bool]:
    """True once systemd has recorded ``times`` different watchdog pings of ``unit``."""
    seen: set[str] = set()

    def check() -> bool:
        seen.add(host.show(unit, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        return len(seen) >= times

    return check


def test_units_start_notify_and_run_tasks_in_their_sandbox(host: Host) -> None:
    host.sh("systemd-sysusers")
    # `systemctl start` of a Type=notify unit returns once the daemon sent READY=1.
    host.sh("systemctl", "start", "pmaster.service")
    master = host.show("pmaster.service", "ActiveState", "StatusText", "MainPID", "NRestarts")
    assert master["ActiveState"] == "active", master
    assert master["StatusText"] == "serving clients on tcp://127.0.0.1:5555"
    assert host.sh("ps", "-o", "user=", "-p", master["MainPID"]) == "poolfleet"
    assert host.sh("stat", "-c", "%U %a", "/var/lib/poolfleet/journal.sqlite3") == "poolfleet 640"

    host.sh("systemctl", "start", "pworker.service", "pworker@b.service")
    for unit in ("pworker.service", "pworker@b.service"):
        wait_for(
            lambda u=unit: (
                host.show(u, "StatusText")["StatusText"] == f"registered with the master at {WORKERS}"
            ),
            20,
            0.2,
            f"{unit} registered",
        )
        pid = host.show(unit, "MainPID")["MainPID"]
        assert host.sh("ps", "-o", "user=", "-p", pid) == "poolfleet"
    workers = {w["worker_id"]: w for w in host.ptask("workers")}
    assert set(workers) == {"pfhost", "pfhost-b"}
    assert workers["pfhost-b"]["queues"] == ["b"]

    # A cpu task in the process pool and an io task on the other queue, inside the sandbox.
    spin = host.ptask("submit", "poolfleet.worker.builtins:spin", "20", "--wait")
    assert spin["state"] == "SUCCEEDED" and spin["worker_id"] == "pfhost"
    echo = host.ptask("submit", "--queue", "b", "poolfleet.worker.builtins:echo", "hello", "--wait")
    assert echo["result"] == "hello" and echo["worker_id"] == "pfhost-b"
    # External programs run as the service user, may write in the working
    # directory, and find the rest of the file system read-only.
    run = ["run", "--queue", "b", "--wait"]
    assert host.ptask(*run, "--", "id", "-un")["result"]["stdout"] == "poolfleet\n"
    assert host.ptask(*run, "--", "touch", "scratch")["result"]["exit_code"] == 0
    host.sh("test", "-f", "/var/lib/poolfleet-worker/b/scratch")
    denied = host.ptask(*run, "--", "touch", "/etc/poolfleet-probe", check=False)["result"]
    assert denied["exit_code"] != 0 and "Read-only file system" in denied["stderr"], denied

    # WATCHDOG=1 is accepted from each main process (NotifyAccess=main): systemd
    # records every ping, and nothing is restarted.
    for unit in ("pmaster.service", "pworker.service", "pworker@b.service"):
        assert host.show(unit, "WatchdogUSec")["WatchdogUSec"] == "2s"
        wait_for(watchdog_pinged(host, unit, 3), 10, 0.1, f"{unit} watchdog pings")
        assert host.show(unit, "NRestarts")["NRestarts"] == "0"


def test_stop_drains_the_worker_and_restart_keeps_the_master_tasks(host: Host) -> None:
    for unit in ("pmaster.service", "pworker.service", "pworker@b.service"):
        if host.show(unit, "ActiveState")["ActiveState"] != "active":
            host.sh("systemd-sysusers")
            host.sh("systemctl", "start", unit)

    # systemctl stop: SIGTERM to pworker alone (KillMode=mixed); the task running
    # in its pool child finishes, and the worker exits 0.
    task = host.ptask("submit", "--queue", "b", "poolfleet.worker.builtins:spin", "2000")
    wait_for(lambda: host.busy("pfhost-b") > 0, 20, 0.1, "the task to start")
    host.sh("systemctl", "stop", "pworker@b.service")
    stopped = host.show("pworker@b.service", "Result", "ExecMainStatus", "ActiveState")
    assert stopped == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
    done = host.ptask("result", task["id"], "--wait")
    assert done["state"] == "SUCCEEDED" and done["worker_id"] == "pfhost-b" and done["attempt"] == 1
    assert host.events("pworker@b.service", "worker_draining")

    # systemctl restart pmaster while a task runs: the journal keeps it and the
    # worker reports it to the new master, which records its result.
    task = host.ptask("submit", "poolfleet.worker.builtins:sleep", "2")
    wait_for(lambda: host.busy("pfhost") > 0, 20, 0.1, "the task to start")
    host.sh("systemctl", "restart", "pmaster.service")
    assert host.events("pmaster.service", "master_stopped")
    done = host.ptask("result", task["id"], "--wait")
    assert done["state"] == "SUCCEEDED" and done["attempt"] == 1, done
    recovered = host.events("pmaster.service", "journal_recovered")
    assert recovered[-1]["at_workers"] == 1  # dispatched when the master stopped
