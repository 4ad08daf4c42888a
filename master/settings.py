"""Settings of the pmaster daemon (parsed once at the entry point)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import DEFAULT_MAX_MESSAGE_BYTES
from poolfleet.common.shipping import DEFAULT_MAX_CODE_BYTES

#: pworker's default reconnect_max_s (the longest pause between two reconnect attempts).
WORKER_RECONNECT_MAX_S = 5.0

POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres(url: str | None) -> bool:
    """Whether ``url`` names a PostgreSQL journal (else the SQLite one in the data dir)."""
    return bool(url) and urlsplit(url or "").scheme in POSTGRES_SCHEMES


def check_journal_url(url: str | None) -> None:
    """ConfigError unless ``url`` is empty (SQLite in the data dir) or a PostgreSQL URL without
    a password (the password comes from libpq's own means: PGPASSFILE, ~/.pgpass, PGPASSWORD)."""
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            "journal must be a postgresql://user@host:port/database URL (or unset, for the SQLite "
            f"journal in the data dir), not {url!r}"
        )
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ConfigError(
            "the journal URL carries a password, which would show in the process list and in logs: "
            "remove it and give it to libpq instead, in a password file (PGPASSFILE or ~/.pgpass) "
            "or in PGPASSWORD"
        )


@dataclass(frozen=True)
class MasterSettings:
    """Every pmaster setting; environment names are POOLFLEET_MASTER_<FIELD>."""

    clients: str = "tcp://127.0.0.1:5555"
    workers: str = "tcp://127.0.0.1:5556"
    data_dir: Path = Path("poolfleet-data")
    insecure: bool = False
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    #: heartbeats a second the workers send the master, at most, all together (and the master
    #: them): a fleet bigger than this many intervals' worth beats less often, in whole
    #: multiples of heartbeat_interval_s; 0: every worker beats at heartbeat_interval_s
    max_heartbeats_per_s: float = 200.0
    prefetch: int = 4
    result_ttl_s: float = 7 * 24 * 3600.0
    journal_sync: str = "normal"
    #: None: the SQLite journal in data_dir; postgresql://user@host:port/db: a shared journal
    journal: str | None = None
    #: how long the active master's lease on a PostgreSQL journal lasts unless renewed
    lease_s: float = 3.0
    max_queue_length: int = 1_000_000
    max_unacked_per_client: int = 100_000
    backoff_base_s: float = 0.5
    backoff_max_s: float = 60.0
    max_lost: int = 3
    recovery_grace_s: float | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics: str | None = None
    curve_secret_key: Path | None = None
    curve_workers_dir: Path | None = None
    curve_clients_dir: Path | None = None
    #: HOST:PORT of the web dashboard (off when None); see poolfleet.master.dashboard
    dashboard: str | None = None
    #: a file holding the token every dashboard request must carry (header or login cookie)
    dashboard_token_file: Path | None = None
    #: PEM certificate chain and private key: the dashboard speaks HTTPS
    dashboard_tls_cert: Path | None = None
    dashboard_tls_key: Path | None = None
    #: with CurveZMQ keys: the dashboard's own client key pair (.key_secret), whose public key is
    #: in curve_clients_dir; the dashboard connects to the client socket with it
    dashboard_curve_secret_key: Path | None = None
    #: shipped code: the public keys of the clients allowed to ship functions (with CurveZMQ)
    trusted_client_keys: Path | None = None
    max_code_bytes: int = DEFAULT_MAX_CODE_BYTES
    #: pickled functions kept in memory (the journal keeps them all)
    code_cache_bytes: int = 64 << 20
    #: client keys allowed to steer (retry, pause, purge, drain); with keys on and none, no key may
    curve_admin_dir: Path | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s must be positive")
        if self.liveness < 1:
            raise ConfigError("liveness must be at least 1")
        if not 0 <= self.max_heartbeats_per_s < math.inf:
            raise ConfigError("max_heartbeats_per_s must be 0 (no bound) or positive")
        if self.prefetch < 0:
            raise ConfigError("prefetch must not be negative")
        if self.result_ttl_s <= 0:
            raise ConfigError("result_ttl_s must be positive")
        if self.journal_sync not in ("normal", "full"):
            raise ConfigError(f"journal_sync must be 'normal' or 'full', not {self.journal_sync!r}")
        check_journal_url(self.journal)
        if self.lease_s < 0.3:
            raise ConfigError("lease_s must be at least 0.3 s")
        if self.max_queue_length < 1:
            raise ConfigError("max_queue_length must be at least 1")
        if self.max_lost < 0:
            raise ConfigError("max_lost must not be negative")
        if self.max_unacked_per_client < 1:
            raise ConfigError("max_unacked_per_client must be at least 1")
        if self.max_message_bytes < 4096:
            raise ConfigError("max_message_bytes must be at least 4096")
        curve = (self.curve_secret_key, self.curve_workers_dir, self.curve_clients_dir)
        if any(v is not None for v in curve) and not all(v is not None for v in curve):
            raise ConfigError(
                "CurveZMQ needs all three settings: curve_secret_key (the master's .key_secret file), "
                "curve_workers_dir and curve_clients_dir (directories of allowed public keys)"
            )
        if self.curve_admin_dir is not None and self.curve_secret_key is None:
            raise ConfigError(
                "curve_admin_dir needs CurveZMQ keys (curve_secret_key and the key directories)"
            )
        self._check_code_and_dashboard()

    def _check_code_and_dashboard(self) -> None:
        if self.trusted_client_keys is not None and not self.has_curve:
            raise ConfigError(
                "trusted_client_keys names client keys, so it needs CurveZMQ (curve_secret_key, "
                "curve_workers_dir, curve_clients_dir); without keys, shipped code is accepted only "
                "by a master bound to loopback"
            )
        if self.max_code_bytes < 1 or self.code_cache_bytes < self.max_code_bytes:
            raise ConfigError("max_code_bytes must be positive and code_cache_bytes at least max_code_bytes")

        if (self.dashboard_tls_cert is None) != (self.dashboard_tls_key is None):
            raise ConfigError(
                "the dashboard's TLS needs both dashboard_tls_cert (the PEM certificate chain) and "
                "dashboard_tls_key (its private key)"
            )
        if self.dashboard and self.has_curve and self.dashboard_curve_secret_key is None:
            raise ConfigError(
                "with CurveZMQ keys the dashboard connects to the client socket as a client: give "
                "dashboard_curve_secret_key, a client key pair (ptask keys generate) whose public "
                "NAME.key is in curve_clients_dir"
            )

    @property
    def dashboard_tls(self) -> bool:
        return self.dashboard_tls_cert is not None

    @property
    def has_curve(self) -> bool:
        return self.curve_secret_key is not None

    @property
    def curve_paths(self) -> tuple[Path, Path, Path]:
        """The master's secret key file and the allowed workers' and clients' key directories."""
        if self.curve_secret_key is None or self.curve_workers_dir is None or self.curve_clients_dir is None:
            raise ConfigError("CurveZMQ is not configured")
        return self.curve_secret_key, self.curve_workers_dir, self.curve_clients_dir

    @property
    def renew_interval_s(self) -> float:
        """How often the active master renews its lease (and a standby tries to take it)."""
        return min(self.heartbeat_interval_s, self.lease_s / 3)

    @property
    def grace_s(self) -> float:
        """How long after a restart the master waits for workers to report what they hold."""
        if self.recovery_grace_s is not None:
            return self.recovery_grace_s
        # workers notice a silent master after liveness intervals and then reconnect with a
        # backoff of up to 5 s (pworker's reconnect_max_s): the grace covers both, so a worker
        # that held or finished a task is back before anyone else is given it
        return self.heartbeat_interval_s * (self.liveness + 1) + WORKER_RECONNECT_MAX_S
