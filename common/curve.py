"""CurveZMQ keys, and the master's ZAP authenticator that decides who may connect.

Keys live in the certificate files ZeroMQ tools write (``ptask keys generate``):
``NAME.key`` holds a public key, ``NAME.key_secret`` the public and the secret key.
Every setting that names a key names such a file:

- master: ``curve_secret_key`` is its own ``.key_secret``; ``curve_workers_dir`` and
  ``curve_clients_dir`` are directories of the ``*.key`` files allowed on each socket.
- worker and client: ``curve_server_key`` is the master's public ``.key`` file and
  ``curve_secret_key`` their own ``.key_secret``.

The two master sockets use separate ZAP domains, each with its own allowed keys, so a
client key cannot register as a worker. The allowed directories are read again at the
next handshake after they change: adding or removing a key file needs no restart.
Refused peers are logged as ``peer_refused``.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
import zmq
from zmq.auth.certs import load_certificate
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import Role

log = structlog.get_logger("poolfleet.curve")

KeyFile = str | os.PathLike[str]

#: ZAP domain of each master socket; each has its own allowed keys.
DOMAINS = {Role.WORKER: "poolfleet-workers", Role.CLIENT: "poolfleet-clients"}
SOCKET_NAMES = {Role.WORKER: "workers", Role.CLIENT: "clients"}

#: A refusal repeated by the same peer (ZeroMQ reconnects every 100 ms) is logged at most this often.
REFUSAL_LOG_INTERVAL_S = 10.0

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED
)
_PROTOCOL_REASONS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "peer does not use CurveZMQ (no keys configured)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic handshake failed (peer has a wrong server key?)",
}


# -- key files ---------------------------------------------------------------------
def _z85_key(raw: bytes | None, path: KeyFile, what: str) -> bytes:
    if raw is None or len(raw) != 40:
        raise ConfigError(f"key file {os.fspath(path)} holds no valid {what} key (40 Z85 characters)")
    try:
        z85.decode(raw)
    except Exception as exc:  # z85 raises KeyError, struct.error, ValueError...
        raise ConfigError(f"key file {os.fspath(path)}: {what} key is not valid Z85") from exc
    return raw


def load_public_key(path: KeyFile) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) file; ConfigError if unusable."""
    try:
        public, _secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ key file {os.fspath(path)}: {exc}") from exc
    return _z85_key(public, path, "public")


def load_key_pair(path: KeyFile) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys of a ``.key_secret`` file; ConfigError if unusable."""
    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read CurveZMQ key file {os.fspath(path)}: {exc}") from exc
    if secret is None:
        raise ConfigError(
            f"key file {os.fspath(path)} holds no secret key: pass the NAME.key_secret file, not NAME.key"
        )
    return _z85_key(public, path, "public"), _z85_key(secret, path, "secret")


def load_client_keys(
    server_public_key: KeyFile | None, secret_key: KeyFile | None
) -> tuple[bytes, bytes, bytes] | None:
    """Check the key settings of a worker or client: both or neither.

    Returns ``(server_public, public, secret)`` or None when CurveZMQ is not used.
    """
    if not server_public_key and not secret_key:
        return None
    if not server_public_key or not secret_key:
        raise ConfigError(
            "CurveZMQ needs both keys: the master's public key file (--curve-server-key) "
            "and this side's secret key file (--curve-secret-key)"
        )
    server = load_public_key(server_public_key)
    public, secret = load_key_pair(secret_key)
    return server, public, secret


def apply_client_keys(sock: zmq.Socket[Any], server_public_key: KeyFile, secret_key: KeyFile) -> None:
    """Make ``sock`` (not yet connected) a CurveZMQ client of the master whose public key file is given."""
    keys = load_client_keys(server_public_key, secret_key)
    if keys is not None:
        set_client_keys(sock, keys)


def set_client_keys(sock: zmq.Socket[Any], keys: tuple[bytes, bytes, bytes]) -> None:
    """Apply keys returned by :func:`load_client_keys` to a socket not yet connected."""
    server, public, secret = keys
    sock.setsockopt(zmq.CURVE_SERVERKEY, server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def apply_server_keys(sock: zmq.Socket[Any], secret_key: KeyFile, domain: str) -> None:
    """Make ``sock`` (not yet bound) a CurveZMQ server whose peers the ZAP ``domain`` decides on."""
    public, secret = load_key_pair(secret_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)


# -- allowed keys --------------------------------------------------------------------
class KeyDir:
    """The public keys allowed on one socket: every ``*.key`` file of a directory.

    The directory is listed at each handshake and read again when a ``.key`` file was
    added, removed or changed, so keys can be installed and revoked without a restart.
    """

    def __init__(self, path: Path, role: Role, label: str | None = None) -> None:
        #: what the keys are, in messages and logs (``workers``, ``clients``, ``trusted clients``)
        self.label = label or SOCKET_NAMES[role]
        if not path.is_dir():
            raise ConfigError(f"allowed {self.label} keys directory {path} does not exist")
        self.path = path
        self.role = role
        self.keys: dict[bytes, str] = {}  # Z85 public key -> file name
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None
        self.refresh()

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        entries = []
        try:
            with os.scandir(self.path) as it:
                for entry in it:
                    if not entry.name.endswith(".key"):
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        entries.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError as exc:
            log.error("keys_unreadable", socket=self.label, path=str(self.path), reason=str(exc))
            return ()
        return tuple(sorted(entries))

    def refresh(self) -> bool:
        """Reload the keys if the directory changed; True if it did."""
        signature = self._scan()
        if signature == self._signature:
            return False
        keys: dict[bytes, str] = {}
        for name, *_ in signature:
            try:
                keys[load_public_key(self.path / name)] = name
            except ConfigError as exc:
                log.warning("key_file_ignored", socket=self.label, file=name, reason=str(exc))
        first = self._signature is None
        self._signature = signature
        self.keys = keys
        log.info(
            "keys_loaded" if first else "keys_reloaded",
            socket=self.label,
            path=str(self.path),
            count=len(keys),
        )
        return True

    def lookup(self, z85_key: bytes) -> str | None:
        """The file name of an allowed key, or None."""
        self.refresh()
        return self.keys.get(z85_key)


class _RefusalLog:
    """Log each distinct refusal at once, then at most every REFUSAL_LOG_INTERVAL_S."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}

    def refused(self, socket: str, reason: str, **fields: Any) -> None:
        key = (socket, reason, str(fields.get("key", "")))
        now = self.clock()
        with self._lock:
            last, suppressed = self._seen.get(key, (float("-inf"), 0))
            if now - last < REFUSAL_LOG_INTERVAL_S:
                self._seen[key] = (last, suppressed + 1)
                return
            if len(self._seen) > 10_000:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if suppressed:
            fields["repeated"] = suppressed
        log.warning("peer_refused", socket=socket, reason=reason, **fields)


class _KeyCheck:
    """ZAP credentials provider for one domain (pyzmq calls ``callback`` on its auth thread)."""

    def __init__(self, keys: KeyDir, auth: Any, refusals: _RefusalLog, admins: KeyDir | None = None) -> None:
        self.keys = keys
        self.auth = auth
        self.refusals = refusals
        self.admins = admins

    def callback(self, domain: str, z85_key: bytes) -> bool:
        socket = SOCKET_NAMES[self.keys.role]
        name = self.keys.lookup(z85_key)
        if name is None and self.admins is not None:
            name = self.admins.lookup(z85_key)
        if name is None:
            self.refusals.refused(
                socket,
                f"public key not in the allowed {socket} keys directory",
                key=z85_key.decode("ascii", "replace"),
                address=self.auth.peer_address,
            )
            return False
        log.info("peer_authenticated", socket=socket, key_file=name, address=self.auth.peer_address)
        return True


def _authenticator(ctx: zmq.Context[Any]) -> Any:
    """pyzmq's ZAP thread, remembering the address of the request being decided (for the log).

    Imported here: it pulls in asyncio, which clients and workers do not need.
    """
    from zmq.auth.thread import ThreadAuthenticator

    class Authenticator(ThreadAuthenticator):
        peer_address = ""

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.peer_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
            await super().handle_zap_message(msg)

    return Authenticator(ctx)


class MasterCurve:
    """The master's side of CurveZMQ: its key pair, the ZAP authenticator, refusal logging.

    Create it before binding (ZeroMQ lets everyone in while no ZAP handler runs), call
    :meth:`secure` on each socket before ``bind``, and :meth:`stop` before closing the sockets.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        secret_key: Path,
        workers_dir: Path,
        clients_dir: Path,
        admins_dir: Path | None = None,
    ) -> None:
        load_key_pair(secret_key)  # fail at start, not at the first handshake
        self.secret_key = secret_key
        self.refusals = _RefusalLog()
        self.dirs = {
            Role.WORKER: KeyDir(workers_dir, Role.WORKER),
            Role.CLIENT: KeyDir(clients_dir, Role.CLIENT),
        }
        #: client keys that may steer (control requests); None: no client key may
        self.admins = KeyDir(admins_dir, Role.CLIENT) if admins_dir is not None else None
        #: the Z85 public key of each client connection (routing identity), from ZAP's User-Id
        self._client_keys: dict[bytes, str] = {}
        self.auth = _authenticator(ctx)
        self.auth.start()
        for role, keys in self.dirs.items():
            admins = self.admins if role is Role.CLIENT else None
            self.auth.configure_curve_callback(
                DOMAINS[role], _KeyCheck(keys, self.auth, self.refusals, admins)
            )
        self._watched: list[tuple[zmq.Socket[Any], threading.Thread]] = []

    # -- who is asking (control requests) --------------------------------------------------
    def recv_keyed(self, sock: zmq.Socket[Any]) -> list[bytes]:
        """Receive one message (NOBLOCK) and remember the sender's public key by identity."""
        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        frames = [p.bytes for p in parts]
        if frames and frames[0] not in self._client_keys:
            try:
                user = parts[-1].get("User-Id")
            except zmq.ZMQError:
                user = None
            if isinstance(user, str):
                if len(self._client_keys) > 100_000:
                    self._client_keys.clear()
                self._client_keys[frames[0]] = user
        return frames

    def peer_key(self, ident: bytes) -> str | None:
        """The Z85 public key a client connection authenticated with, if seen."""
        return self._client_keys.get(ident)

    def key_name(self, ident: bytes) -> str | None:
        """The key file name of a client connection, or None if unknown."""
        key = self._client_keys.get(ident)
        if key is None:
            return None
        raw = key.encode()
        return self.dirs[Role.CLIENT].keys.get(raw) or (self.admins.keys.get(raw) if self.admins else None)

    @property
    def has_admins(self) -> bool:
        return self.admins is not None

    def is_admin(self, ident: bytes) -> bool:
        key = self._client_keys.get(ident)
        return key is not None and self.admins is not None and self.admins.lookup(key.encode()) is not None

    def secure(
        self,
        sock: zmq.Socket[Any],
        role: Role,
        on_event: Callable[[Mapping[str, Any]], None] | None = None,
        events: int = 0,
    ) -> None:
        """Give ``sock`` the server keys and the ZAP domain of ``role``; log failed handshakes.
        A socket has one monitor: the other ``events`` it reports go to ``on_event`` (called on
        the watching thread)."""
        apply_server_keys(sock, self.secret_key, DOMAINS[role])
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS | events)
        thread = threading.Thread(
            target=self._watch,
            args=(monitor, SOCKET_NAMES[role], on_event),
            name=f"pf-handshakes-{role}",
            daemon=True,
        )
        thread.start()
        self._watched.append((sock, thread))

    def _watch(
        self, monitor: zmq.Socket[Any], socket: str, on_event: Callable[[Mapping[str, Any]], None] | None
    ) -> None:
        """Log handshakes that fail before ZAP is asked (no keys, wrong server key)."""
        try:
            while True:
                try:
                    event = recv_monitor_message(monitor)
                except zmq.ZMQError:
                    return
                kind = event["event"]
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    return
                if not kind & _HANDSHAKE_EVENTS:
                    if on_event is not None:
                        on_event(event)
                    continue
                if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                    value = int(event["value"])
                    reason = _PROTOCOL_REASONS.get(value, f"handshake protocol error {value:#x}")
                else:
                    reason = "handshake failed before authentication (peer without CurveZMQ keys?)"
                self.refusals.refused(socket, reason)
        finally:
            monitor.close(linger=0)

    def stop(self) -> None:
        """Stop watching and authenticating (call from the sockets' thread, before closing them)."""
        for sock, thread in self._watched:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            thread.join(timeout=2)
        self._watched.clear()
        self.auth.stop()
