"""Endpoints and ZeroMQ socket helpers."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import zmq

from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import DEFAULT_MAX_MESSAGE_BYTES

_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_*]+):(?P<port>\d+|\*)$")


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (IPv6 in brackets and IPv4-mapped ones too)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True)
class Endpoint:
    """A parsed ZeroMQ endpoint (tcp or ipc)."""

    url: str
    scheme: str
    host: str
    port: int | None

    @property
    def is_loopback(self) -> bool:
        return self.scheme == "ipc" or is_loopback_host(self.host)

    @property
    def wants_ipv6(self) -> bool:
        """IPv6 literals and the any-address need ZMQ_IPV6 on the socket."""
        return self.scheme == "tcp" and (self.host.startswith("[") or self.host == "*")

    def bind_url(self) -> str:
        """The URL to bind: port 0 means any free port (ZeroMQ spells it ``*``)."""
        if self.scheme == "tcp" and self.port == 0:
            return f"tcp://{self.host}:*"
        return self.url


def parse_endpoint(url: str) -> Endpoint:
    """Parse ``tcp://HOST:PORT`` or ``ipc://PATH``; raise ConfigError naming the problem."""
    url = url.strip()
    if url.startswith("ipc://") and len(url) > len("ipc://"):
        return Endpoint(url, "ipc", url[len("ipc://") :], None)
    m = _TCP.match(url)
    if not m:
        raise ConfigError(
            f"malformed endpoint {url!r}: expected tcp://HOST:PORT (for example tcp://127.0.0.1:5555) "
            "or ipc://PATH"
        )
    port_text = m.group("port")
    port = 0 if port_text == "*" else int(port_text)
    if port > 65535:
        raise ConfigError(f"malformed endpoint {url!r}: port {port} is out of range")
    return Endpoint(url, "tcp", m.group("host"), port)


def check_bind_allowed(endpoint: Endpoint, has_curve: bool, insecure: bool, what: str) -> None:
    """Refuse a non-loopback bind without CurveZMQ keys unless explicitly insecure."""
    if endpoint.is_loopback or has_curve or insecure:
        return
    raise ConfigError(
        f"refusing to bind the {what} socket to {endpoint.url} without CurveZMQ keys: "
        "anyone who can reach it could run tasks. Configure keys (see docs/SECURITY.md) "
        "or pass --insecure to accept the risk."
    )


def tune(
    sock: zmq.Socket[bytes], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, endpoint: str | None = None
) -> None:
    """Options every poolfleet socket gets: bounded messages, no linger, IPv6 where the endpoint needs it."""
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    if endpoint is not None and parse_endpoint(endpoint).wants_ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)


def last_endpoint(sock: zmq.Socket[bytes]) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    return value.decode() if isinstance(value, bytes) else str(value)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes], flags: int = 0) -> None:
    """``send_multipart`` without its per-frame type checks, for frames we made ourselves.

    pyzmq's ``send_multipart`` checks every frame's buffer interface before sending: three
    times the cost of the sends themselves for a message of a few small frames. Raises what
    ``send`` raises (zmq.Again with NOBLOCK on a full queue: the first frame decides, a
    message is queued whole or not at all).
    """
    send = sock.send
    more = flags | zmq.SNDMORE
    for frame in frames[:-1]:
        send(frame, more)
    send(frames[-1], flags)
