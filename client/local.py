"""``ptask local``: a master and N workers in the foreground, for trying poolfleet out.

The daemons are child processes in their own process groups, so a Ctrl-C in
the terminal reaches only ``ptask local``, which then stops them in order:
workers first (SIGTERM: they drain), then the master. Their output is merged
into one stream, each line labelled with the daemon's name; their JSON log
lines are rendered readably.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from poolfleet.client.cliopts import EXIT_USAGE, fail
from poolfleet.client.output import dumps, table
from poolfleet.common.errors import ConfigError
from poolfleet.common.lifecycle import kill_session
from poolfleet.common.net import parse_endpoint

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
DEFAULT_CLIENTS = "tcp://127.0.0.1:5555"
DEFAULT_WORKERS = "tcp://127.0.0.1:5556"
READY_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 45.0  # a draining worker gets 30 s by default
MASTER_STOP_TIMEOUT_S = 15.0
_COLORS = ("36", "35", "33", "32", "34", "31")
_SKIP_KEYS = ("event", "level", "timestamp", "daemon")


class LocalError(Exception):
    """A daemon could not start or died; the message is the one error line."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    color: str
    buf: bytes = b""
    open: bool = True

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


def free_or_default(default: str) -> str:
    """The default endpoint if its port is free on loopback, else any free port."""
    port = int(default.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return "tcp://127.0.0.1:0"
    return default


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."


class LogMerger:
    """Writes the daemons' lines to one stream, labelled; renders their JSON events."""

    def __init__(self, stream: IO[str], level: str, as_json: bool, color: bool, width: int) -> None:
        self.stream = stream
        self.min_level = LEVELS.get(level, 20)
        self.as_json = as_json
        self.color = color
        self.width = width

    def line(self, child: Child, text: str) -> dict[str, Any] | None:
        """Show one line of ``child``; return it as an event when it is a JSON log line."""
        event: dict[str, Any] | None = None
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
                event = parsed if isinstance(parsed, dict) and "event" in parsed else None
            except ValueError:
                event = None
        if event is not None and LEVELS.get(str(event.get("level")), 20) < self.min_level:
            return event
        if self.as_json:
            doc = {"source": child.name} | (event if event is not None else {"line": text})
            self._write(json.dumps(doc, ensure_ascii=False))
            return event
        label = f"{child.name:<{self.width}} |"
        if self.color:
            label = f"\x1b[{child.color}m{label}\x1b[0m"
        if event is None:
            self._write(f"{label} {text}")
            return None
        self._write(f"{label} {self.render(child, event)}")
        exc = event.get("exception")
        if isinstance(exc, str):
            for extra in exc.rstrip().splitlines():
                self._write(f"{label}   {extra}")
        return event

    def render(self, child: Child, event: dict[str, Any]) -> str:
        ts = str(event.get("timestamp", ""))
        clock = ts[11:23] if len(ts) >= 19 else ts
        level = str(event.get("level", "info"))
        shown_level = f"{level:<7}"
        if self.color and level in ("warning", "error", "critical"):
            shown_level = f"\x1b[{'33' if level == 'warning' else '31'}m{shown_level}\x1b[0m"
        rest = " ".join(
            f"{k}={_short(v)}"
            for k, v in event.items()
            if k not in _SKIP_KEYS and k != "exception" and not (k == "worker_id" and v == child.name)
        )
        return f"{clock} {shown_level} {event.get('event')} {rest}".rstrip()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


class LocalCluster:
    """Starts, watches and stops the daemons; single-threaded around one selector."""

    def __init__(self, merger: LogMerger, env: dict[str, str]) -> None:
        self.merger = merger
        self.env = env
        self.sel = selectors.DefaultSelector()
        self.children: list[Child] = []
        self.signals = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup = -1

    # -- signals -------------------------------------------------------------------
    def install_signals(self) -> None:
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def close(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        for child in self.children:
            if child.open and child.popen.stdout is not None:
                self.sel.unregister(child.popen.stdout)
                child.popen.stdout.close()
                child.open = False
        self.sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- children --------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str]) -> Child:
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            process_group=0,
            preexec_fn=_die_with_parent(),
        )
        assert popen.stdout is not None
        os.set_blocking(popen.stdout.fileno(), False)
        child = Child(name, popen, _COLORS[len(self.children) % len(_COLORS)])
        self.children.append(child)
        self.sel.register(popen.stdout, selectors.EVENT_READ, child)
        return child

    def pump(self, timeout: float) -> list[tuple[Child, dict[str, Any]]]:
        """Wait up to ``timeout`` for output or a signal; show lines; return the JSON events."""
        events: list[tuple[Child, dict[str, Any]]] = []
        for key, _ in self.sel.select(timeout):
            child = key.data
            if child is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            assert isinstance(child, Child) and child.popen.stdout is not None
            try:
                data = child.popen.stdout.read()
            except (BlockingIOError, OSError):
                continue
            if data is None:
                continue
            if not data:
                self.sel.unregister(child.popen.stdout)
                child.popen.stdout.close()
                child.open = False
                data = b"\n" if child.buf else b""
            child.buf += data
            *lines, child.buf = child.buf.split(b"\n")
            for raw in lines:
                ev = self.merger.line(child, raw.decode(errors="replace").rstrip("\r"))
                if ev is not None:
                    events.append((child, ev))
        return events

    def wait_ready(
        self, wanted: dict[str, str], timeout: float, on_event: Callable[[Child, dict[str, Any]], None]
    ) -> None:
        """Wait until every child named in ``wanted`` has logged its event."""
        deadline = time.monotonic() + timeout
        pending = dict(wanted)
        while pending:
            if self.signals:
                raise KeyboardInterrupt
            for child, ev in self.pump(0.2):
                if pending.get(child.name) == ev.get("event"):
                    pending.pop(child.name)
                    on_event(child, ev)
            for child in self.children:
                if child.name in pending and not child.alive:
                    self.pump(0)
                    raise LocalError(
                        f"{child.name} exited with code {child.popen.returncode} before it was ready "
                        "(its last lines are above)"
                    )
            if time.monotonic() > deadline:
                raise LocalError(
                    f"{', '.join(pending)} not ready after {timeout:.0f} s (see the lines above)"
                )

    def stop(self, names: list[str], sig: int, timeout: float) -> None:
        """Signal the named children, wait for them (showing their output); kill on timeout."""
        targets = [c for c in self.children if c.name in names and c.alive]
        seen = self.signals
        for c in targets:
            c.popen.send_signal(sig)
        deadline = time.monotonic() + timeout
        while any(c.alive for c in targets):
            if time.monotonic() > deadline or self.signals > seen:
                for c in targets:
                    kill_session(c.popen)
                break
            self.pump(0.1)
        self.pump(0)

    def kill_all(self) -> None:
        for c in self.children:
            kill_session(c.popen)


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, children get SIGTERM if ptask local itself dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def setup() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return setup


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def local_command(
    workers: Annotated[int, typer.Option("--workers", "-n", min=1, max=64, help="How many workers.")] = 2,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="Module whose functions the workers may run (repeatable)."),
    ] = None,
    cpu: Annotated[
        int | None, typer.Option(min=0, help="Process-pool slots per worker [cores / workers].")
    ] = None,
    io: Annotated[int | None, typer.Option(min=0, help="Thread-pool slots per worker [8].")] = None,
    allow_cmd: Annotated[
        list[str] | None,
        typer.Option("--allow-cmd", help="Program that cmd tasks may run (repeatable); none by default."),
    ] = None,
    queue: Annotated[
        list[str] | None, typer.Option("--queue", help="Queue the workers serve (repeatable) [default].")
    ] = None,
    clients_endpoint: Annotated[
        str | None,
        typer.Option(help="Master's client endpoint [tcp://127.0.0.1:5555 if free, else a free port]."),
    ] = None,
    workers_endpoint: Annotated[
        str | None,
        typer.Option(help="Master's worker endpoint [tcp://127.0.0.1:5556 if free, else a free port]."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Journal directory [a temporary one, removed at exit].")
    ] = None,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            "-c",
            help="Shell command to run once the cluster is up, with POOLFLEET_MASTER set; "
            "everything stops when it ends and its exit status is ptask's.",
        ),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="Show daemon log lines at this level and above: debug, info, warning, error.")
    ] = "info",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the endpoints and processes as one JSON document; log lines as JSON too."
        ),
    ] = False,
) -> None:
    """Run a master and N workers in the foreground for trying things out; Ctrl-C stops them all.

    Logs of every daemon are merged on standard error, each line labelled with its name.
    Once the workers are registered, the client endpoint is printed, for ptask in another
    terminal (export POOLFLEET_MASTER=...) or for --command.

    Example: ptask local -n 2 --tasks mytasks --allow-cmd echo
    """
    if log_level not in LEVELS:
        fail(f"--log-level must be one of {', '.join(LEVELS)}, not {log_level!r}", EXIT_USAGE)
    try:
        clients = clients_endpoint or free_or_default(DEFAULT_CLIENTS)
        workers_ep = workers_endpoint or free_or_default(DEFAULT_WORKERS)
        for url in (clients, workers_ep):
            if not parse_endpoint(url).is_loopback:
                raise ConfigError(f"ptask local binds loopback only, not {url}")
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE, "use tcp://127.0.0.1:PORT (port 0 picks a free one)")
    temp_dir = None if data_dir is not None else tempfile.mkdtemp(prefix="poolfleet-local-")
    data = data_dir if data_dir is not None else Path(temp_dir or ".")
    cpu_slots = cpu if cpu is not None else max(1, (os.cpu_count() or 1) // workers)
    names = [f"local-{i}" for i in range(1, workers + 1)]
    merger = LogMerger(sys.stderr, log_level, as_json, sys.stderr.isatty() and not as_json, len("pmaster"))
    merger.width = max(len("pmaster"), *(len(n) for n in names))
    cluster = LocalCluster(merger, _child_env())
    cluster.install_signals()
    code = 0
    error: str | None = None
    try:
        code = _run(
            cluster,
            clients,
            workers_ep,
            data,
            names,
            tasks,
            cpu_slots,
            io,
            allow_cmd,
            queue,
            command,
            log_level,
            as_json,
            temp_dir is not None,
        )
    except LocalError as exc:
        error = str(exc)
        cluster.stop(names, signal.SIGTERM, WORKER_STOP_TIMEOUT_S)
        cluster.stop(["pmaster"], signal.SIGTERM, MASTER_STOP_TIMEOUT_S)
    finally:
        cluster.kill_all()
        cluster.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    if error is not None:
        fail(error, 1, "check the task modules (--tasks) and endpoints, then try again")
    raise typer.Exit(code)


def _run(
    cluster: LocalCluster,
    clients: str,
    workers_ep: str,
    data: Path,
    names: list[str],
    tasks: list[str] | None,
    cpu: int,
    io: int | None,
    allow_cmd: list[str] | None,
    queues: list[str] | None,
    command: str | None,
    log_level: str,
    as_json: bool,
    temporary: bool,
) -> int:
    daemon_level = "debug" if log_level == "debug" else "info"
    py = sys.executable
    endpoints: dict[str, str] = {}

    def master_started(_child: Child, ev: dict[str, Any]) -> None:
        endpoints["clients"] = str(ev.get("clients_endpoint"))
        endpoints["workers"] = str(ev.get("workers_endpoint"))

    try:
        master = cluster.spawn(
            "pmaster",
            [
                py,
                "-m",
                "poolfleet.master.cli",
                "--clients",
                clients,
                "--workers",
                workers_ep,
                "--data-dir",
                str(data),
                "--log-level",
                daemon_level,
            ],
        )
        cluster.wait_ready({"pmaster": "master_started"}, READY_TIMEOUT_S, master_started)
        worker_argv = [py, "-m", "poolfleet.worker.cli", "--master", endpoints["workers"], "--cpu", str(cpu)]
        worker_argv += ["--log-level", daemon_level]
        if io is not None:
            worker_argv += ["--io", str(io)]
        for flag, values in (("--tasks", tasks), ("--allow-cmd", allow_cmd), ("--queue", queues)):
            for v in values or []:
                worker_argv += [flag, v]
        for name in names:
            cluster.spawn(name, [*worker_argv, "--worker-id", name])
        cluster.wait_ready({n: "worker_registered" for n in names}, READY_TIMEOUT_S, lambda c, e: None)
        _banner(endpoints, data, temporary, master.popen.pid, cluster, as_json)
        code = _serve(cluster, command, endpoints["clients"])
    except KeyboardInterrupt:
        code = 0
    cluster.stop(names, signal.SIGTERM, WORKER_STOP_TIMEOUT_S)
    cluster.stop(["pmaster"], signal.SIGTERM, MASTER_STOP_TIMEOUT_S)
    return code


def _banner(
    endpoints: dict[str, str],
    data: Path,
    temporary: bool,
    master_pid: int,
    cluster: LocalCluster,
    as_json: bool,
) -> None:
    procs = [{"name": c.name, "pid": c.popen.pid} for c in cluster.children]
    if as_json:
        doc = {
            "clients_endpoint": endpoints["clients"],
            "workers_endpoint": endpoints["workers"],
            "data_dir": str(data),
            "temporary_data_dir": temporary,
            "processes": procs,
            "env": {"POOLFLEET_MASTER": endpoints["clients"]},
        }
        sys.stdout.write(dumps(doc) + "\n")
    else:
        rows = [[p["name"], p["pid"], endpoints["clients"] if p["pid"] == master_pid else ""] for p in procs]
        sys.stdout.write(
            f"poolfleet is running: a master and {len(procs) - 1} workers"
            f" (journal in {data}{', removed at exit' if temporary else ''})\n\n"
            + table(["process", "pid", "client endpoint"], rows)
            + f"\n\nIn another terminal:\n  export POOLFLEET_MASTER={endpoints['clients']}\n"
            "  ptask submit poolfleet.worker.builtins:echo hello --wait\n\nCtrl-C stops everything.\n"
        )
    sys.stdout.flush()


def _serve(cluster: LocalCluster, command: str | None, clients: str) -> int:
    """Run until a signal, the end of --command, or a daemon dying; return the exit status."""
    proc: subprocess.Popen[bytes] | None = None
    if command:
        env = dict(cluster.env) | {"POOLFLEET_MASTER": clients}
        proc = subprocess.Popen(["/bin/sh", "-c", command], env=env)
    try:
        while True:
            cluster.pump(0.5)
            if cluster.signals:
                return 0
            if proc is not None and proc.poll() is not None:
                return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            for c in cluster.children:
                if not c.alive:
                    cluster.pump(0)
                    raise LocalError(f"{c.name} exited unexpectedly with code {c.popen.returncode}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
