"""The docker-compose cluster, for real: image built by deploy/docker/build.sh, run on a Docker engine.

The image is built the way `make cluster` builds it (no registry: the base image
is made with debootstrap once and cached by tag). The cluster runs under a
project name of its own and is taken down with its volumes at the end, also
when a test fails. The master's client port is published on the host's
loopback only, on a free port, so the test's own client can follow tasks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pfharness import events_named, unavailable, wait_for

from poolfleet.client import Client

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
BUILD = ROOT / "deploy" / "docker" / "build.sh"
IMAGE = os.environ.get("POOLFLEET_IMAGE", "poolfleet:latest")
SLEEP = "poolfleet.worker.builtins:sleep"

# The first build makes the base image with debootstrap, which takes minutes.
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    unavailable("neither `docker compose` nor docker-compose is installed")
    raise AssertionError("unreachable")


class ComposeCluster:
    def __init__(self, workdir: Path) -> None:
        self.project = f"pftest{uuid.uuid4().hex[:8]}"
        self.cmd = [*compose_command(), "--project-name", self.project, "--file", str(COMPOSE_FILE)]
        # An empty port publishes the master's client socket on a free loopback port.
        self.env = {**os.environ, "POOLFLEET_IMAGE": IMAGE, "POOLFLEET_CLIENT_PORT": ""}
        self.workdir = workdir
        self._client: Client | None = None

    def compose(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.cmd, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str, fmt: str) -> str:
        out = subprocess.run(
            ["docker", "inspect", "--format", fmt, self.container(service)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip()

    def events(self, service: str, name: str) -> list[dict[str, Any]]:
        """JSON log events of a service (from `docker-compose logs`, prefixes stripped)."""
        return events_named(self.compose("logs", "--no-color", service).stdout, name)

    @property
    def client(self) -> Client:
        if self._client is None:
            port = self.compose("port", "master", "5555").stdout.strip().rsplit(":", 1)[-1]
            self._client = Client(f"tcp://127.0.0.1:{port}", timeout_s=10)
        return self._client

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["worker_id"]: w for w in self.client.workers(timeout_s=5)}

    def ensure_workers(self) -> None:
        """Both worker containers running and registered with the master."""
        self.compose("up", "--detach", "worker-1", "worker-2")
        wait_for(lambda: set(self.workers()) == {"worker-1", "worker-2"}, 60, 0.1, "both workers registered")

    def busy(self, worker_id: str) -> int:
        w = self.workers().get(worker_id)
        return sum(w["busy"].values()) if w else 0

    def down(self) -> None:
        if self._client is not None:
            self._client.close()
        logs = self.compose("logs", "--no-color", check=False).stdout
        (self.workdir / "compose.log").write_text(logs)
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=180)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        unavailable("docker is not installed")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        unavailable("no Docker engine is reachable")
    started = time.monotonic()
    proc = subprocess.run(
        [str(BUILD)],
        env={**os.environ, "POOLFLEET_IMAGE": IMAGE, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=840,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip().splitlines()[-1] == IMAGE
    sys.stderr.write(f"\nimage {IMAGE} ready in {time.monotonic() - started:.1f} s\n")
    return IMAGE


@pytest.fixture(scope="module")
def cluster(
    image: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ComposeCluster]:
    c = ComposeCluster(tmp_path_factory.mktemp("compose"))
    failed_before = request.session.testsfailed
    try:
        c.compose("up", "--detach", "master", "worker-1", "worker-2", timeout=180)
        yield c
    finally:
        c.down()
        if request.session.testsfailed > failed_before:
            sys.stderr.write((c.workdir / "compose.log").read_text()[-8000:])
        leftovers = subprocess.run(
            ["docker", "ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={c.project}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert not leftovers, f"containers left behind: {leftovers}"


def test_client_service_checks_a_batch_on_both_workers(cluster: ComposeCluster) -> None:
    cluster.ensure_workers()
    proc = cluster.compose("run", "--rm", "-T", "client", check=False, timeout=180)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary = [ev for ev in lines if ev.get("event") == "cluster_checked"]
    assert proc.returncode == 0 and summary, proc.stdout + proc.stderr
    assert summary[-1]["ok"] is True
    assert set(summary[-1]["by_worker"]) == {"worker-1", "worker-2"}
    assert sum(summary[-1]["by_worker"].values()) == summary[-1]["tasks"] == 80

    # Each worker is the one in its own container, running as the unprivileged user.
    workers = cluster.workers()
    for service in ("worker-1", "worker-2"):
        assert workers[service]["host"] == cluster.inspect(service, "{{.Config.Hostname}}")
        assert cluster.inspect(service, "{{.Config.User}}") == "poolfleet"
        uid = subprocess.run(
            ["docker", "exec", cluster.container(service), "id", "-u"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert uid.stdout.strip() not in ("", "0"), uid


def test_stopped_worker_drains_and_the_other_takes_over(cluster: ComposeCluster) -> None:
    cluster.ensure_workers()
    first = cluster.client.submit_many(SLEEP, [((0.5,), {}) for _ in range(40)])
    wait_for(lambda: cluster.busy("worker-2") > 0, 30, 0.05, "worker-2 running tasks")

    # docker-compose stop: SIGTERM through the container's init, then SIGKILL after
    # stop_grace_period. A drained worker exits 0 well before that.
    cluster.compose("stop", "worker-2", timeout=60)
    assert cluster.inspect("worker-2", "{{.State.ExitCode}}") == "0"
    assert cluster.events("worker-2", "worker_draining")
    (stopped,) = cluster.events("worker-2", "worker_stopped")[-1:]
    assert stopped["abandoned"] == 0
    assert not cluster.events("worker-2", "drain_timed_out")

    for f in first:
        f.result(60)
    assert {f.info["worker_id"] for f in first} == {"worker-1", "worker-2"}
    # With worker-2 gone (it said goodbye: the master drops it at once), all work goes to worker-1.
    wait_for(lambda: set(cluster.workers()) == {"worker-1"}, 10, 0.1, "worker-2 to leave the master")
    after = cluster.client.submit_many(SLEEP, [((0.05,), {}) for _ in range(12)])
    for f in after:
        f.result(60)
    assert {f.info["worker_id"] for f in after} == {"worker-1"}


def test_killed_worker_tasks_finish_on_the_other(cluster: ComposeCluster) -> None:
    cluster.ensure_workers()  # worker-2 rejoins if an earlier test stopped it
    futures = cluster.client.submit_many(SLEEP, [((1.0,), {}) for _ in range(24)])
    wait_for(lambda: cluster.busy("worker-2") > 0, 30, 0.05, "worker-2 running tasks")

    subprocess.run(
        ["docker", "kill", cluster.container("worker-2")], check=True, capture_output=True, timeout=30
    )
    for f in futures:
        assert f.result(90) >= 1.0
    rerun = [f for f in futures if f.info["attempt"] > 1]
    assert rerun, "no task of the killed worker was rerun"
    assert {f.info["worker_id"] for f in rerun} == {"worker-1"}
    expired = [e for e in cluster.events("master", "worker_expired") if e["worker_id"] == "worker-2"]
    assert expired and expired[-1]["tasks"] > 0
