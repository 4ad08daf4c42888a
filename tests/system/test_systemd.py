"""The systemd units and the daemons' side of the sd_notify protocol.

The units are checked by ``systemd-analyze`` (syntax, and exposure of the
hardening), and by reading them for the settings the operations guide promises.
The daemons run for real with ``NOTIFY_SOCKET`` pointing at a datagram socket
this test binds, the way systemd's manager would: READY=1, WATCHDOG=1 and
STOPPING=1 must come from the daemon's main process (``NotifyAccess=main``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pfharness import BIN, Cluster, unavailable, wait_for

from poolfleet.client import Client
from poolfleet.common.config import resolve
from poolfleet.master.settings import MasterSettings
from poolfleet.worker.daemon import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
UNIT_FILES = ("pmaster.service", "pworker.service", "pworker@.service")
INSTALLED_BIN = "/opt/poolfleet/bin/"


# -- reading unit files ------------------------------------------------------------
def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line}"
        assert "=" in line, f"{path.name}: not a setting: {line}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def env_file_settings(path: Path, prefix: str) -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented out) POOLFLEET settings of an example environment file."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        target = active
        if line.startswith("#"):
            line = line[1:].strip()
            target = commented
        if line.startswith(prefix) and "=" in line and " " not in line.split("=", 1)[0]:
            name, value = line.split("=", 1)
            target[name] = value
    return active, commented


def settings_names(cls: type, prefix: str) -> set[str]:
    return {prefix + f.name.upper() for f in dataclasses.fields(cls)} | {prefix + "CONFIG"}


@pytest.fixture(scope="module")
def units_for_verify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit files as shipped, with ExecStart pointing at this environment's daemons.

    ``systemd-analyze verify`` checks that ExecStart's program exists and is
    executable; nothing else is changed.
    """
    out = tmp_path_factory.mktemp("units")
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        assert INSTALLED_BIN in text, f"{name}: ExecStart is expected under {INSTALLED_BIN}"
        (out / name).write_text(text.replace(INSTALLED_BIN, f"{BIN}/"))
    return out


def need_systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        unavailable("systemd-analyze is not installed (apt-get install systemd)")
    return exe


# -- the unit files ------------------------------------------------------------------
@pytest.mark.system
def test_units_pass_systemd_analyze_verify(units_for_verify: Path) -> None:
    exe = need_systemd_analyze()
    # The template is verified through an instance, so %i is expanded as systemd would.
    targets = [units_for_verify / "pmaster.service", units_for_verify / "pworker.service"]
    targets.append(units_for_verify / "pworker@ci-test.service")
    proc = subprocess.run(
        [exe, "verify", "--man=no", *map(str, targets)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and unparsable values and only prints them:
    # any output at all is a finding.
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
        f"systemd-analyze verify (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    )


@pytest.mark.system
@pytest.mark.parametrize(("unit", "limit"), [("pmaster.service", 2.0), ("pworker.service", 4.0)])
def test_units_hardening_exposure(units_for_verify: Path, unit: str, limit: float) -> None:
    """systemd's own score of the sandboxing (0 = locked down, 10 = fully exposed)."""
    exe = need_systemd_analyze()
    proc = subprocess.run(
        [exe, "security", "--offline=yes", f"--threshold={int(limit * 10)}", str(units_for_verify / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = [line for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    assert proc.returncode == 0, f"{unit} is more exposed than {limit}:\n{overall}\n{proc.stderr}"
    assert overall, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", UNIT_FILES)
def test_unit_runs_as_a_notifying_hardened_service(name: str) -> None:
    unit = parse_unit(UNITS / name)
    svc = unit["Service"]

    def one(key: str) -> str:
        assert key in svc, f"{name}: {key}= is missing"
        return svc[key][-1]

    daemon = "pmaster" if name.startswith("pmaster") else "pworker"
    assert one("ExecStart").split()[0] == INSTALLED_BIN + daemon
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert seconds(one("WatchdogSec")) >= 10
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"  # a configuration error is not retried
    assert one("User") not in ("root", "0") and "DynamicUser" not in svc
    assert one("StateDirectory")
    assert one("WorkingDirectory").startswith("%S/")
    assert any(f.lstrip("-").startswith("/etc/poolfleet/") for f in svc["EnvironmentFile"])
    assert "KillSignal" not in svc, "SIGTERM is graceful: no KillSignal override"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
    }.items():
        assert one(key) == value, f"{name}: {key}={one(key)}, expected {value}"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    if daemon == "pmaster":
        assert "POOLFLEET_MASTER_DATA_DIR=%S/poolfleet" in svc["Environment"]
        assert one("StateDirectory") == "poolfleet"
    else:
        # SIGTERM to pworker alone, so pool children finish their tasks while it drains.
        assert one("KillMode") == "mixed"
        drain = WorkerSettings().drain_timeout_s
        _, commented = env_file_settings(DEPLOY / "pworker.env", "POOLFLEET_WORKER_")
        drain = max(drain, float(commented.get("POOLFLEET_WORKER_DRAIN_TIMEOUT_S", drain)))
        assert seconds(one("TimeoutStopSec")) > drain + 10
        ids = [e for e in svc["Environment"] if e.startswith("POOLFLEET_WORKER_WORKER_ID=")]
        assert ids == (
            ["POOLFLEET_WORKER_WORKER_ID=%H-%i"] if "@" in name else ["POOLFLEET_WORKER_WORKER_ID=%H"]
        )
        if "@" in name:
            assert "%i" in one("StateDirectory")
            assert "-/etc/poolfleet/pworker-%i.env" in svc["EnvironmentFile"]


# -- the example settings files -------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "cls", "prefix"),
    [
        (DEPLOY / "pmaster.env", MasterSettings, "POOLFLEET_MASTER_"),
        (DEPLOY / "pmaster-pair.env", MasterSettings, "POOLFLEET_MASTER_"),
        (DEPLOY / "pworker.env", WorkerSettings, "POOLFLEET_WORKER_"),
    ],
)
def test_example_env_files_name_real_settings(path: Path, cls: type, prefix: str) -> None:
    active, commented = env_file_settings(path, prefix)
    known = settings_names(cls, prefix)
    assert set(active) | set(commented) <= known, (
        f"unknown in {path.name}: {(set(active) | set(commented)) - known}"
    )
    assert active, f"{path.name} sets nothing"
    # Both what is set and every documented value parse into valid settings.
    for env in (active, {**commented, **active}):
        env = {k: v for k, v in env.items() if not k.endswith("_CONFIG")}
        resolve(cls, {}, env, prefix)


def test_example_toml_parses_for_master_and_worker() -> None:
    path = DEPLOY / "poolfleet.toml"
    doc = tomllib.loads(path.read_text())
    master = resolve(MasterSettings, {}, {}, "POOLFLEET_MASTER_", path, "master")
    worker = resolve(WorkerSettings, {}, {}, "POOLFLEET_WORKER_", path, "worker")
    assert master.heartbeat_interval_s == worker.heartbeat_interval_s == doc["heartbeat_interval_s"]
    assert worker.tasks == tuple(doc["worker"]["tasks"])


# -- sd_notify, for real ------------------------------------------------------------
@dataclasses.dataclass
class Notice:
    at: float
    pid: int | None
    fields: dict[str, str]


class NotifySocket:
    """A datagram socket standing in for systemd's: records each message and its sender's pid."""

    def __init__(self) -> None:
        # A short path: AF_UNIX paths are limited to 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="pfnotify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # Like systemd: have the kernel attach the sender's credentials.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notices: list[Notice] = []

    def read(self) -> list[Notice]:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(struct.calcsize("iII")), socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return self.notices
            pid = None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", cdata[: struct.calcsize("iII")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.notices.append(Notice(time.monotonic(), pid, fields))

    def matching(self, key: str, value: str | None = None) -> list[Notice]:
        return [n for n in self.read() if key in n.fields and (value is None or n.fields[key] == value)]

    def wait(self, key: str, value: str | None = "1", count: int = 1, timeout: float = 20.0) -> list[Notice]:
        found: list[Notice] = wait_for(
            lambda: (m := self.matching(key, value)) and len(m) >= count and m,
            timeout,
            what=f"{count} x {key}={value} on NOTIFY_SOCKET",
        )
        return found

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket()
    yield ns
    ns.close()


WATCHDOG_USEC = 1_000_000  # WatchdogSec=1s: the daemons must ping at least every second


def assert_watchdog_kept(ns: NotifySocket, pid: int, count: int = 4) -> None:
    pings = ns.wait("WATCHDOG", count=count, timeout=15)
    assert {p.pid for p in pings} == {pid}
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"a watchdog ping came late: gaps {gaps}"


def assert_only_main_pid(ns: NotifySocket, pid: int) -> None:
    senders = {n.pid for n in ns.read()}
    assert senders == {pid}, f"notifications from {senders}, NotifyAccess=main accepts only {pid}"


def notify_env(ns: NotifySocket) -> dict[str, str]:
    return {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


@pytest.mark.system
def test_pmaster_notifies_ready_watchdog_and_stopping(
    make_cluster: type[Cluster], notify_socket: NotifySocket
) -> None:
    cluster = make_cluster()
    master = cluster.start_master(env=notify_env(notify_socket))
    (ready,) = notify_socket.wait("READY")
    assert ready.pid == master.pid
    assert ready.fields.get("MAINPID") == str(master.pid)
    assert not notify_socket.matching("STOPPING")
    assert_watchdog_kept(notify_socket, master.pid)

    master.signal(signal.SIGTERM)
    (stopping,) = notify_socket.wait("STOPPING")
    assert stopping.pid == master.pid
    assert master.wait(20) == 0
    assert_only_main_pid(notify_socket, master.pid)


@pytest.mark.system
def test_pworker_notifies_and_drains_on_sigterm(
    make_cluster: type[Cluster], notify_socket: NotifySocket
) -> None:
    cluster = make_cluster()
    cluster.start_master()
    worker = cluster.start_worker(name="wn", env=notify_env(notify_socket))
    (ready,) = notify_socket.wait("READY")
    assert ready.pid == worker.pid
    notify_socket.wait("STATUS", value=f"registered with the master at {cluster.worker_endpoint}")
    assert_watchdog_kept(notify_socket, worker.pid)

    with Client(cluster.client_endpoint) as client:
        fut = client.submit("pf_testtasks:io_sleep", 2.0)
        wait_for(
            lambda: any(sum(w["busy"].values()) for w in client.workers(timeout_s=5)),
            what="the task to start on the worker",
        )
        worker.signal(signal.SIGTERM)
        (stopping,) = notify_socket.wait("STOPPING")
        # STOPPING comes at once, while the running task still has time to finish.
        assert stopping.pid == worker.pid
        assert worker.alive() and not fut.done()
        assert fut.result(30) == "slept 2.0"
        assert fut.info["worker_id"] == "wn"
    assert worker.wait(30) == 0
    assert_only_main_pid(notify_socket, worker.pid)


@pytest.mark.system
def test_pworker_is_ready_while_the_master_is_away(
    make_cluster: type[Cluster], notify_socket: NotifySocket
) -> None:
    """A worker started before its master must not fail the service start: it reconnects by itself."""
    cluster = make_cluster()
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    worker = cluster.start_worker(name="wz", master=endpoint, wait=False, env=notify_env(notify_socket))
    (ready,) = notify_socket.wait("READY")
    assert ready.pid == worker.pid
    assert ready.fields.get("STATUS") == f"connecting to {endpoint}"
    assert_watchdog_kept(notify_socket, worker.pid, count=3)
    worker.signal(signal.SIGTERM)
    notify_socket.wait("STOPPING")
    assert worker.wait(20) == 0
