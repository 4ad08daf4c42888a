"""Test harness: real pmaster and pworker processes on loopback, cleaned up always.

Daemons log JSON lines to files; tests wait on log events and on client
queries with deadlines, never on bare sleeps.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from poolfleet.common.lifecycle import kill_session

TESTS = Path(__file__).resolve().parent
TASKMODS = TESTS / "taskmods"
BIN = Path(sys.executable).parent
#: CI services set CI in the environment: there a missing tool fails a system test instead of skipping it
IN_CI = bool(os.environ.get("CI"))


class ProcessExited(AssertionError):
    """A daemon died while a test waited for it: fail at once."""


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ProcessExited:
            raise
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOLFLEET_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TASKMODS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


@dataclass
class Proc:
    """A daemon we started, with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    wrap: list[str] = field(default_factory=list)

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.popen = subprocess.Popen(
            [*self.wrap, *self.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
            cwd=str(self.log_path.parent),
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self.popen.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def wait_event(
        self,
        name: str,
        count: int = 1,
        timeout: float = 20.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            evs = [e for e in self.events(name) if where is None or where(e)]
            if len(evs) >= count:
                return evs[count - 1]
            if self.popen is not None and self.popen.poll() is not None:
                raise ProcessExited(
                    f"{self.name} exited with {self.popen.returncode} before {name}:\n" + self.log_tail()
                )
            return None

        result: dict[str, Any] = wait_for(found, timeout, what=f"{self.name} event {name}")
        return result

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        if self.popen is None:
            raise RuntimeError("not started")
        return self.popen.wait(timeout)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """Kill the daemon and its whole session (pool children, forkserver)."""
        if self.popen is None:
            return
        kill_session(self.popen)


class Cluster:
    """A master and workers on random loopback ports, all killed by ``close()``."""

    def __init__(self, tmp: Path, heartbeat_s: float = 0.2, liveness: int = 3) -> None:
        self.tmp = tmp
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.procs: list[Proc] = []
        self.master: Proc | None = None
        self.workers: list[Proc] = []
        self.client_endpoint = ""
        self.worker_endpoint = ""
        self.data_dir = tmp / "data"
        self._clients: list[Any] = []
        self._n = 0

    def start_master(
        self,
        *args: str,
        clients: str = "tcp://127.0.0.1:0",
        workers: str = "tcp://127.0.0.1:0",
        wrap: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        self._n += 1
        argv = [
            str(BIN / "pmaster"),
            "--clients",
            clients,
            "--workers",
            workers,
            "--data-dir",
            str(self.data_dir),
            "--heartbeat-interval-s",
            str(self.heartbeat_s),
            "--liveness",
            str(self.liveness),
            *args,
        ]
        p = Proc(
            f"pmaster#{self._n}", argv, self.tmp / f"pmaster-{self._n}.log", daemon_env(env), wrap=wrap or []
        ).start()
        self.procs.append(p)
        self.master_args, self.master_env = args, env
        ev = p.wait_event("master_started")
        self.client_endpoint = ev["clients_endpoint"]
        self.worker_endpoint = ev["workers_endpoint"]
        self.master = p
        return p

    def restart_master(self, *args: str) -> Proc:
        """Start a new master on the same endpoints, data dir and journal (``args``: instead
        of the last master's)."""
        return self.start_master(
            *(args or self.master_args),
            clients=self.client_endpoint,
            workers=self.worker_endpoint,
            env=self.master_env,
        )

    def start_worker(
        self,
        *args: str,
        tasks: tuple[str, ...] = ("pf_testtasks",),
        cpu: int = 2,
        io: int = 4,
        wait: bool = True,
        name: str | None = None,
        master: str | None = None,
        wrap: list[str] | None = None,
        env: dict[str, str] | None = None,
        worker_id: str | None = None,
    ) -> Proc:
        """Start a pworker; ``name`` names its log file and, unless ``worker_id`` is given, the worker."""
        self._n += 1
        name = name or f"w{self._n}"
        argv = [
            str(BIN / "pworker"),
            "--master",
            master or self.worker_endpoint,
            "--cpu",
            str(cpu),
            "--io",
            str(io),
            "--worker-id",
            worker_id or name,
            "--heartbeat-interval-s",
            str(self.heartbeat_s),
            "--liveness",
            str(self.liveness),
        ]
        for t in tasks:
            argv += ["--tasks", t]
        argv += list(args)
        p = Proc(name, argv, self.tmp / f"{name}.log", daemon_env(env), wrap=wrap or []).start()
        self.procs.append(p)
        self.workers.append(p)
        if wait:
            p.wait_event("worker_registered")
        return p

    def journal_counts(self) -> dict[str, int]:
        """Tasks in the master's SQLite journal, by state (read straight from the file)."""
        db = sqlite3.connect(str(self.data_dir / "journal.sqlite3"))
        try:
            return dict(db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        finally:
            db.close()

    def journal_counts_when(self, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
        """journal_counts() once it equals ``expected``, else its last reading at ``timeout``.

        A result reaches its client before the commit that records it (in the same loop turn
        of the master; the worker keeps the result until that commit), so a test that reads
        the journal right after its results may be a turn early."""
        seen: list[dict[str, int]] = [{}]

        def settled() -> bool:
            seen[0] = self.journal_counts()
            return seen[0] == expected

        try:
            wait_for(settled, timeout, what=f"the journal to hold {expected}")
        except AssertionError:
            pass  # the caller's assertion shows the last reading against what it expected
        return seen[0]

    def client(self, **kwargs: Any) -> Any:
        from poolfleet.client import Client

        c = Client(self.client_endpoint, **kwargs)
        self._clients.append(c)
        return c

    def ptask(
        self, *args: str, timeout: float = 60, input: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        e = daemon_env(env)
        e["POOLFLEET_MASTER"] = self.client_endpoint
        return subprocess.run(
            [str(BIN / "ptask"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=e,
            input=input,
            stdin=None if input else subprocess.DEVNULL,
        )

    def close(self) -> None:
        for c in self._clients:
            try:
                c.shutdown(wait=False, cancel_futures=True)
            except Exception:  # noqa: BLE001 - cleanup goes on
                pass
        for p in reversed(self.procs):
            p.kill()

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(40)}" for p in self.procs)


#: A process as (pid, start time in clock ticks since boot): a reused pid is another process.
ProcRef = tuple[int, int]


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, session id, start time) of ``pid`` from /proc, or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    f = data[data.rindex(b")") + 2 :].split()
    return f[0].decode(), int(f[1]), int(f[3]), int(f[19])


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def process_tree(root: int) -> list[ProcRef]:
    """Every live process below ``root`` (its forkserver, pool children, programs...)."""
    children: dict[int, list[ProcRef]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None and st[0] != "Z":
            children.setdefault(st[1], []).append((pid, st[3]))
    out: list[ProcRef] = []
    todo = [root]
    while todo:
        for ref in children.get(todo.pop(), []):
            out.append(ref)
            todo.append(ref[0])
    return out


def survivors(refs: list[ProcRef], session: int | None = None) -> list[str]:
    """The processes of ``refs`` still alive (zombies count as gone), plus every live process
    of ``session``; described by pid, state and command line, for an assertion message."""
    found: dict[int, str] = {}
    wanted = dict(refs)
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        if wanted.get(pid) == st[3] or (session is not None and st[2] == session):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
            except OSError:
                cmd = "?"
            found[pid] = f"pid {pid} ({st[0]}, parent {st[1]}): {cmd}"
    return sorted(found.values())


def kill_refs(refs: list[ProcRef]) -> None:
    """Test cleanup: SIGKILL the processes of ``refs`` that are still the same processes."""
    for pid, started in refs:
        st = _proc_stat(pid)
        if st is not None and st[3] == started:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def iter_json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.strip().startswith("{"):
            yield json.loads(line)


def events_named(text: str, name: str) -> list[dict[str, Any]]:
    """The JSON log events called ``name`` in ``text``; a line may carry a prefix before its
    JSON (``docker-compose logs`` puts the service name there)."""
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            ev = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == name:
            found.append(ev)
    return found


def unavailable(reason: str) -> None:
    """Skip a system test whose tool is missing; on CI, fail it (.ci/run must provide it)."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must provide it (.ci/run installs and starts it)")
    pytest.skip(reason)
