"""``ptask keys``: make the CurveZMQ key pairs of the master, the workers and the clients."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated

import typer
from zmq.auth.certs import create_certificates

from poolfleet.common.curve import load_key_pair

EXIT_USAGE = 2
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")

keys_app = typer.Typer(
    help="Make CurveZMQ key pairs (see docs/SECURITY.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _fail(message: str) -> None:
    typer.echo(f"ptask: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


@keys_app.command()
def generate(
    directory: Annotated[Path, typer.Argument(help="Where to write the key pair (created if missing).")],
    name: Annotated[
        str | None,
        typer.Option("--name", help="File name of the pair: NAME.key, NAME.key_secret [host name]."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing pair of that name.")] = False,
) -> None:
    """Write a key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    Master: pmaster --curve-secret-key master.key_secret; give master.key to workers and
    clients (--curve-server-key). Workers and clients: copy NAME.key into the master's
    --curve-workers-dir or --curve-clients-dir and keep NAME.key_secret on their host.
    """
    name = name or socket.gethostname().split(".")[0] or "poolfleet"
    if not _NAME.match(name):
        _fail(f"bad key name {name!r}: use letters, digits, '.', '_' and '-'")
    public = directory / f"{name}.key"
    secret = directory / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists()]
    if existing and not force:
        _fail(f"{' and '.join(existing)} already exist; pass --force to replace the pair")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
        try:
            for p in (public, secret):
                p.unlink(missing_ok=True)
            create_certificates(directory, name)
        finally:
            os.umask(old_umask)
        public.chmod(0o644)
        secret.chmod(0o600)
    except OSError as exc:
        _fail(f"cannot write the key pair in {directory}: {exc.strerror or exc}")
    z85_public, _ = load_key_pair(secret)
    typer.echo(f"public key: {public}  ({z85_public.decode()})")
    typer.echo(f"secret key: {secret}  (keep it on this host only)")
