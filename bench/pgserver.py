"""A throwaway PostgreSQL server: initdb + pg_ctl in a temporary dir, on a free port, as the
unprivileged ``postgres`` user when run as root; always stopped and removed. Used by the
benchmark's journal run and by the tests (tests/pfpostgres.py).

The role ``poolfleet`` has a password that is only in a password file (PGPASSFILE), as an
operator would set it up.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class PgUnavailable(RuntimeError):
    """PostgreSQL's programs or its user are not installed here."""


ROLE = "poolfleet"
PASSWORD = "pf-test-secret"  # a throwaway server's, written to the password file only


def find_bin() -> Path | None:
    """The newest Debian postgresql's bin dir (initdb, pg_ctl are not on PATH there)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    root: Path
    host: str
    port: int
    passfile: Path
    sockdir: Path
    _ids: itertools.count[int]

    def url(self, db: str) -> str:
        """How a master names the database: no password in it."""
        return f"postgresql://{ROLE}@{self.host}:{self.port}/{db}"

    def local_url(self, db: str) -> str:
        """The same, for this test process: the password file named in the URL."""
        return f"{self.url(db)}?passfile={self.passfile}"

    def socket_url(self, db: str) -> str:
        """The database over the server's Unix socket, which any network namespace reaches."""
        return f"postgresql://{ROLE}@/{db}?host={self.sockdir}&port={self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a daemon needs in its environment to log in."""
        return {"PGPASSFILE": str(self.passfile)}

    def admin(self, sql: str) -> list[tuple[object, ...]]:
        """Run ``sql`` as the superuser, over the Unix socket; its rows, if any."""
        import psycopg

        with psycopg.connect(host=str(self.sockdir), port=self.port, user="postgres", autocommit=True) as c:
            cur = c.execute(sql)
            return list(cur.fetchall()) if cur.description else []

    def version(self) -> str:
        return f"PostgreSQL {self.admin('SHOW server_version')[0][0]}"

    def new_database(self) -> str:
        name = f"pf_test_{next(self._ids)}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE}")
        return name


def _as_postgres() -> dict[str, object]:
    """subprocess arguments that run a server program as ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PgUnavailable("no postgres user to run the server as (apt-get install postgresql)") from None
    return {"user": pw.pw_uid, "group": pw.pw_gid}


@contextlib.contextmanager
def running_server(listen: str = "127.0.0.1", wrap: list[str] | None = None) -> Iterator[PgServer]:
    """A server listening on ``listen`` (and its Unix socket), started in the network namespace
    that ``wrap`` enters (as root: ``ip netns exec NS``); stopped and removed afterwards."""
    bindir = find_bin()
    if bindir is None:
        raise PgUnavailable("PostgreSQL's initdb not found (apt-get install postgresql)")
    run_as = _as_postgres()
    # ip netns exec needs root: the server program changes to postgres inside the namespace
    as_postgres = ["runuser", "-u", "postgres", "--"] if wrap and run_as else []
    root = Path(tempfile.mkdtemp(prefix="pf-pg-"))
    data, log = root / "data", root / "server.log"
    try:
        if run_as:
            os.chown(root, run_as["user"], run_as["group"])  # type: ignore[arg-type]
        superpw = root / "superpw"
        superpw.write_text(PASSWORD + "\n")
        os.chmod(superpw, 0o644)
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={superpw}",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **run_as,  # type: ignore[call-overload]
        )
        if listen != "127.0.0.1":  # hosts of the server's own subnet log in like loopback ones
            with (data / "pg_hba.conf").open("a") as hba:
                hba.write("host all all samenet scram-sha-256\n")
        port = free_port()
        opts = f"-p {port} -k {root} -c listen_addresses={listen} -c fsync=off -c max_connections=50"
        start = [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "start",
        ]
        if wrap:
            subprocess.run([*wrap, *as_postgres, *start], check=True, capture_output=True)
        else:
            subprocess.run(start, check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
        passfile = root / "pgpass"
        passfile.write_text(f"{listen}:{port}:*:{ROLE}:{PASSWORD}\n")
        os.chmod(passfile, 0o600)
        server = PgServer(root, listen, port, passfile, root, itertools.count(1))
        server.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    capture_output=True,
                    timeout=60,
                    **run_as,  # type: ignore[call-overload]
                )
        shutil.rmtree(root, ignore_errors=True)
