"""The ``pmaster`` command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import structlog
import typer

from poolfleet.common import logsetup
from poolfleet.common.config import resolve
from poolfleet.common.errors import ConfigError
from poolfleet.common.lifecycle import Notifier, watchdog_interval_s
from poolfleet.common.net import check_bind_allowed, is_loopback_host, parse_endpoint
from poolfleet.master.settings import MasterSettings

app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def pmaster(
    clients: Annotated[
        str | None, typer.Option(help="Endpoint clients connect to [tcp://127.0.0.1:5555].")
    ] = None,
    workers: Annotated[
        str | None, typer.Option(help="Endpoint workers connect to [tcp://127.0.0.1:5556].")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Directory of the SQLite journal [./poolfleet-data].")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML config file ([master] table).")] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="Allow binding a non-loopback address without CurveZMQ keys."),
    ] = None,
    heartbeat_interval_s: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats [1.0].")
    ] = None,
    liveness: Annotated[
        int | None, typer.Option(help="Missed heartbeats before a worker is expired [3].")
    ] = None,
    max_heartbeats_per_s: Annotated[
        float | None,
        typer.Option(
            help="Heartbeats a second from all workers together, at most: a bigger fleet beats less "
            "often, in whole multiples of the heartbeat interval (so expiry takes longer); 0: no bound [200]."
        ),
    ] = None,
    prefetch: Annotated[
        int | None,
        typer.Option(
            help="Least tasks per kind a worker may hold beyond its free slots; short tasks get more "
            "(about 50 ms of work per slot, at most 1000); 0 turns prefetch off [4]."
        ),
    ] = None,
    result_ttl_s: Annotated[float | None, typer.Option(help="Seconds results are kept [604800].")] = None,
    journal_sync: Annotated[
        str | None,
        typer.Option(
            help="SQLite synchronous mode: normal (survives a pmaster crash) or full (also power loss) [normal]."
        ),
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option(
            help="postgresql://user@host:port/database: keep the journal in PostgreSQL, shared by an "
            "active master and its standbys (the password from PGPASSFILE, ~/.pgpass or PGPASSWORD, "
            "never in the URL) [the SQLite journal in --data-dir]."
        ),
    ] = None,
    lease_s: Annotated[
        float | None,
        typer.Option(
            help="PostgreSQL journal: seconds the active master's lease lasts unless renewed; a "
            "standby takes over this long after the active one stops renewing it [3]."
        ),
    ] = None,
    max_queue_length: Annotated[
        int | None,
        typer.Option(help="Pending tasks per queue and kind before submits get 'queue full' [1000000]."),
    ] = None,
    max_lost: Annotated[
        int | None,
        typer.Option(help="Times a task may lose its worker or pool child before it fails as poison [3]."),
    ] = None,
    backoff_base_s: Annotated[
        float | None,
        typer.Option(help="First retry delay in seconds; doubles per failure, with jitter [0.5]."),
    ] = None,
    backoff_max_s: Annotated[float | None, typer.Option(help="Longest retry delay in seconds [60].")] = None,
    max_unacked_per_client: Annotated[
        int | None,
        typer.Option(help="Pending tasks one client may have before submits are refused [100000]."),
    ] = None,
    recovery_grace_s: Annotated[
        float | None,
        typer.Option(
            help="After a restart, seconds to wait for workers to report running tasks [4 heartbeats]."
        ),
    ] = None,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="Largest message frame accepted, in bytes [67108864].")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="HOST:PORT to serve Prometheus metrics on (off by default).")
    ] = None,
    curve_secret_key: Annotated[Path | None, typer.Option(help="Master's CurveZMQ secret key file.")] = None,
    curve_workers_dir: Annotated[
        Path | None, typer.Option(help="Directory of allowed worker public keys.")
    ] = None,
    curve_clients_dir: Annotated[
        Path | None, typer.Option(help="Directory of allowed client public keys.")
    ] = None,
    dashboard: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT to serve the web dashboard on (off by default); off loopback it needs "
            "--dashboard-token-file or TLS."
        ),
    ] = None,
    dashboard_token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token dashboard requests must carry (at least 16 characters)."),
    ] = None,
    dashboard_tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain: the dashboard speaks HTTPS.")
    ] = None,
    dashboard_tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --dashboard-tls-cert.")
    ] = None,
    dashboard_curve_secret_key: Annotated[
        Path | None,
        typer.Option(
            help="With CurveZMQ keys: the dashboard's client key pair (.key_secret); its public key must "
            "be in --curve-clients-dir."
        ),
    ] = None,
    trusted_client_keys: Annotated[
        Path | None,
        typer.Option(
            help="Directory of the public keys of clients allowed to ship code (functions defined in "
            "__main__, lambdas, closures) to workers started with --run-shipped-code; needs CurveZMQ. "
            "Without keys, only a master bound to loopback accepts shipped code [none]."
        ),
    ] = None,
    max_code_bytes: Annotated[
        int | None, typer.Option(help="Largest shipped (pickled) function accepted, in bytes [1048576].")
    ] = None,
    curve_admin_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory of client public keys allowed to steer (retry, pause, purge, drain, stop); "
            "other client keys can only look (with keys on and no such directory, no key steers)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error [info].")] = None,
) -> None:
    """Run the poolfleet master: keeps the queue and the journal, dispatches tasks to workers.

    Every option can also be set as POOLFLEET_MASTER_<OPTION> (for example
    POOLFLEET_MASTER_DATA_DIR) or in the [master] table of --config.
    """
    cli = {k: v for k, v in locals().items() if k != "config"}
    env = dict(os.environ)
    if config is None and env.get("POOLFLEET_MASTER_CONFIG"):
        config = Path(env["POOLFLEET_MASTER_CONFIG"])
    try:
        settings = resolve(MasterSettings, cli, env, "POOLFLEET_MASTER_", config, "master")
        logsetup.configure(settings.log_level, daemon="pmaster")
        for what, url in (("clients", settings.clients), ("workers", settings.workers)):
            check_bind_allowed(parse_endpoint(url), settings.has_curve, settings.insecure, what)
        if settings.metrics:
            from poolfleet.master.metrics import parse_listen

            host, _port = parse_listen(settings.metrics)
            if not is_loopback_host(host) and not settings.insecure:
                raise ConfigError(
                    f"refusing to serve metrics on {settings.metrics}: the endpoint has no authentication "
                    "and shows task names and load. Serve it on loopback behind a proxy, or pass --insecure."
                )
        if settings.dashboard:
            from poolfleet.master.dashboard.server import check_dashboard_settings

            check_dashboard_settings(settings)
        from poolfleet.master.server import Master

        master = Master(
            settings,
            notifier=Notifier(env.get("NOTIFY_SOCKET")),
            watchdog_s=watchdog_interval_s(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")),
        )
    except ConfigError as exc:
        typer.echo(f"pmaster: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"pmaster: error: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        if type(exc).__module__.startswith("psycopg"):
            typer.echo(f"pmaster: error: cannot open the PostgreSQL journal: {str(exc).strip()}", err=True)
            raise typer.Exit(1) from None
        if type(exc).__module__.startswith("zmq"):
            typer.echo(f"pmaster: error: cannot bind: {exc}", err=True)
            raise typer.Exit(1) from None
        raise
    structlog.get_logger("pmaster").debug("settings_loaded", settings=repr(settings))
    raise typer.Exit(master.run())


def main() -> None:
    app(prog_name="pmaster")


if __name__ == "__main__":
    main()
