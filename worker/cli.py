"""The ``pworker`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import structlog
import typer

from poolfleet.common import logsetup
from poolfleet.common.config import resolve
from poolfleet.common.errors import ConfigError
from poolfleet.common.lifecycle import Notifier, watchdog_interval_s

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def pworker(
    master: Annotated[
        str | None, typer.Option(help="Master's worker endpoint [tcp://127.0.0.1:5556].")
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="Module (mypkg.tasks) or .py file (path/to/mytasks.py) whose functions this worker "
            "may run (repeatable); without it, only poolfleet's built-ins.",
        ),
    ] = None,
    cpu: Annotated[int | None, typer.Option(help="Process-pool slots for kind cpu [core count].")] = None,
    io: Annotated[int | None, typer.Option(help="Thread-pool slots for kind io [8].")] = None,
    cmd: Annotated[int | None, typer.Option(help="Concurrent external programs for kind cmd [2].")] = None,
    queue: Annotated[
        list[str] | None, typer.Option("--queue", help="Queue to serve (repeatable) [default].")
    ] = None,
    allow_cmd: Annotated[
        list[str] | None,
        typer.Option("--allow-cmd", help="Program that cmd tasks may run (repeatable); none by default."),
    ] = None,
    allow_cmd_env: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-cmd-env",
            help="Environment variable that cmd tasks may set although it changes how programs "
            "are loaded or interpreted, such as LD_PRELOAD or PYTHONPATH (repeatable); none by default.",
        ),
    ] = None,
    worker_id: Annotated[str | None, typer.Option(help="Name of this worker [HOST-PID-random].")] = None,
    heartbeat_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats [1.0].")
    ] = None,
    liveness: Annotated[
        int | None, typer.Option(help="Missed heartbeats before the master counts as lost [3].")
    ] = None,
    drain_timeout_s: Annotated[
        float | None, typer.Option(help="Seconds running tasks get to finish after SIGTERM [30].")
    ] = None,
    max_tasks_per_child: Annotated[
        int | None, typer.Option(help="Recycle a pool child after this many tasks [never].")
    ] = None,
    max_task_output: Annotated[
        int | None,
        typer.Option(
            help="Characters of output (stdout, stderr, logging) kept per task, the last ones [65536]."
        ),
    ] = None,
    curve_server_key: Annotated[
        str | None, typer.Option(help="The master's CurveZMQ public key file (NAME.key).")
    ] = None,
    curve_secret_key: Annotated[
        str | None, typer.Option(help="This worker's CurveZMQ secret key file (NAME.key_secret).")
    ] = None,
    run_shipped_code: Annotated[
        bool | None,
        typer.Option(
            "--run-shipped-code",
            help="Also run functions trusted clients ship pickled (defined in __main__, lambdas, "
            "closures): with CurveZMQ keys, only those of clients in the master's "
            "--trusted-client-keys; without keys, only with a master on loopback. A trusted client can "
            "run any code as this worker's user (docs/SECURITY.md). Off by default.",
        ),
    ] = None,
    code_cache_bytes: Annotated[
        int | None, typer.Option(help="Bytes of shipped functions this worker keeps [67108864].")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file ([worker] table).")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error [info].")] = None,
) -> None:
    """Run a poolfleet worker: takes tasks from the master and runs them on local pools.

    Every option can also be set as POOLFLEET_WORKER_<OPTION> (lists comma-separated,
    for example POOLFLEET_WORKER_TASKS=mypkg.tasks) or in the [worker] table of --config.
    """
    cli = {k: v for k, v in locals().items() if k != "config"}
    for key in ("tasks", "queue", "allow_cmd", "allow_cmd_env"):
        if not cli[key]:
            cli[key] = None
    env = dict(os.environ)
    if config is None and env.get("POOLFLEET_WORKER_CONFIG"):
        config = Path(env["POOLFLEET_WORKER_CONFIG"])
    try:
        from poolfleet.worker.daemon import Worker, WorkerSettings
        from poolfleet.worker.registry import TaskRegistry, add_task_dirs, check_sources, task_source

        settings = resolve(WorkerSettings, cli, env, "POOLFLEET_WORKER_", config, "worker")
        logsetup.configure(settings.log_level, daemon="pworker")
        from poolfleet.common.curve import load_client_keys

        load_client_keys(settings.curve_server_key, settings.curve_secret_key)  # both or neither, readable
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        sources = [task_source(entry) for entry in settings.tasks]
        add_task_dirs(sources, sys.path)
        registry = TaskRegistry.load(src.module for src in sources)
        check_sources(sources)
        if not sources:
            structlog.get_logger("pworker").warning(
                "worker_offers_builtins_only",
                modules=list(registry.modules),
                hint="start pworker with --tasks MODULE (or --tasks path/to/file.py) to run your own functions",
            )
        worker = Worker(
            settings,
            registry,
            notifier=Notifier(env.get("NOTIFY_SOCKET")),
            watchdog_s=watchdog_interval_s(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")),
            cmd_env={k: v for k, v in env.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TZ")},
        )
    except ConfigError as exc:
        typer.echo(f"pworker: error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(worker.run())


def main() -> None:
    app(prog_name="pworker")


if __name__ == "__main__":
    main()
