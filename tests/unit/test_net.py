"""Endpoint parsing and the refusal of insecure non-loopback binds."""

from __future__ import annotations

import pytest

from poolfleet.common.errors import ConfigError
from poolfleet.common.net import Endpoint, check_bind_allowed, parse_endpoint


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port"),
    [
        ("tcp://127.0.0.1:5555", "tcp", "127.0.0.1", 5555),
        ("tcp://localhost:1", "tcp", "localhost", 1),
        ("tcp://[::1]:5556", "tcp", "[::1]", 5556),
        ("tcp://[fe80::1]:80", "tcp", "[fe80::1]", 80),
        ("tcp://*:5555", "tcp", "*", 5555),
        ("tcp://host-1.example.org:65535", "tcp", "host-1.example.org", 65535),
        ("tcp://127.0.0.1:*", "tcp", "127.0.0.1", 0),
        ("  tcp://127.0.0.1:0 ", "tcp", "127.0.0.1", 0),
        ("ipc:///run/poolfleet/master.sock", "ipc", "/run/poolfleet/master.sock", None),
    ],
)
def test_parse_valid_endpoints(url: str, scheme: str, host: str, port: int | None) -> None:
    ep = parse_endpoint(url)
    assert (ep.scheme, ep.host, ep.port) == (scheme, host, port)
    assert ep.url == url.strip()


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:5555",
        "tcp://127.0.0.1",
        "tcp://:5555",
        "tcp://127.0.0.1:port",
        "tcp://::1:5555",  # IPv6 literals need brackets
        "tcp://[::1:5555",
        "udp://127.0.0.1:5555",
        "inproc://x",
        "ipc://",
        "tcp://host name:1",
        "",
    ],
)
def test_malformed_endpoints_name_the_endpoint(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_endpoint(url)
    msg = str(info.value)
    assert msg.startswith(f"malformed endpoint {url.strip()!r}")
    assert "\n" not in msg
    assert "tcp://HOST:PORT" in msg


def test_port_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"malformed endpoint 'tcp://127.0.0.1:65536': port 65536"):
        parse_endpoint("tcp://127.0.0.1:65536")


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("tcp://127.0.0.1:1", True),
        ("tcp://127.1.2.3:1", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:1", True),
        ("ipc:///tmp/x.sock", True),
        ("tcp://0.0.0.0:1", False),
        ("tcp://*:1", False),
        ("tcp://[::]:1", False),
        ("tcp://10.0.0.5:1", False),
        ("tcp://eth0:1", False),
        ("tcp://example.org:1", False),
    ],
)
def test_loopback_detection(url: str, loopback: bool) -> None:
    assert parse_endpoint(url).is_loopback is loopback


def test_bind_url_spells_port_zero_as_any() -> None:
    assert parse_endpoint("tcp://127.0.0.1:0").bind_url() == "tcp://127.0.0.1:*"
    assert parse_endpoint("tcp://[::1]:0").bind_url() == "tcp://[::1]:*"
    assert parse_endpoint("tcp://127.0.0.1:5555").bind_url() == "tcp://127.0.0.1:5555"
    assert parse_endpoint("ipc:///tmp/a").bind_url() == "ipc:///tmp/a"


def test_non_loopback_bind_needs_keys_or_insecure() -> None:
    public = parse_endpoint("tcp://0.0.0.0:5555")
    with pytest.raises(ConfigError) as info:
        check_bind_allowed(public, has_curve=False, insecure=False, what="clients")
    msg = str(info.value)
    assert "clients socket" in msg and "tcp://0.0.0.0:5555" in msg
    assert "CurveZMQ" in msg and "--insecure" in msg
    check_bind_allowed(public, has_curve=True, insecure=False, what="clients")
    check_bind_allowed(public, has_curve=False, insecure=True, what="clients")


def test_loopback_bind_is_always_allowed() -> None:
    for url in ("tcp://127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///tmp/pf.sock"):
        check_bind_allowed(parse_endpoint(url), has_curve=False, insecure=False, what="workers")


def test_endpoint_is_a_value() -> None:
    assert parse_endpoint("tcp://127.0.0.1:5") == Endpoint("tcp://127.0.0.1:5", "tcp", "127.0.0.1", 5)
