"""Key files, the allowed-keys directories and the refusal log (no sockets)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import structlog
import zmq
from zmq.auth.certs import create_certificates

from poolfleet.common import curve
from poolfleet.common.errors import ConfigError
from poolfleet.common.protocol import Role


def pair(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = create_certificates(directory, name)
    return Path(public), Path(secret)


def test_key_files_load_and_bad_ones_are_named(tmp_path: Path) -> None:
    public, secret = pair(tmp_path, "a")
    pub, sec = curve.load_key_pair(secret)
    assert curve.load_public_key(public) == pub == curve.load_public_key(secret)
    assert len(pub) == len(sec) == 40
    with pytest.raises(ConfigError, match=r"holds no secret key: pass the NAME\.key_secret file"):
        curve.load_key_pair(public)
    with pytest.raises(ConfigError, match=r"cannot read CurveZMQ key file .*missing"):
        curve.load_public_key(tmp_path / "missing")
    bad = tmp_path / "bad.key"
    bad.write_text('curve\n    public-key = "' + "#" * 40 + '"\n')
    with pytest.raises(ConfigError, match="not valid Z85"):
        curve.load_public_key(bad)
    bad.write_text('curve\n    public-key = "short"\n')
    with pytest.raises(ConfigError, match="no valid public key"):
        curve.load_public_key(bad)


def test_client_keys_are_both_or_neither(tmp_path: Path) -> None:
    server_public, _ = pair(tmp_path, "master")
    _, secret = pair(tmp_path, "worker")
    assert curve.load_client_keys(None, None) is None
    for one in ((str(server_public), None), (None, str(secret))):
        with pytest.raises(ConfigError, match="needs both keys"):
            curve.load_client_keys(*one)
    keys = curve.load_client_keys(str(server_public), str(secret))
    assert keys is not None and keys[0] == curve.load_public_key(server_public)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        assert sock.getsockopt(zmq.MECHANISM) == zmq.NULL
        curve.apply_client_keys(sock, str(server_public), str(secret))
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    finally:
        sock.close(linger=0)
        ctx.term()


def test_key_dir_follows_additions_removals_and_changes(tmp_path: Path) -> None:
    made = tmp_path / "made"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    a_pub, _ = pair(made, "a")
    b_pub, _ = pair(made, "b")
    a, b = curve.load_public_key(a_pub), curve.load_public_key(b_pub)
    keys = curve.KeyDir(allowed, Role.WORKER)
    assert keys.lookup(a) is None
    shutil.copy(a_pub, allowed)
    (allowed / "b.key_secret").write_text("secret files are never read here")
    assert keys.lookup(a) == "a.key" and keys.lookup(b) is None
    shutil.copy(b_pub, allowed / "a.key")  # replaced in place: a is out, b is in
    assert keys.lookup(a) is None and keys.lookup(b) == "a.key"
    os.remove(allowed / "a.key")
    assert keys.lookup(b) is None and keys.keys == {}
    assert not keys.refresh()  # nothing changed since


def test_key_dir_skips_unreadable_files_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed clients keys directory .* does not exist"):
        curve.KeyDir(tmp_path / "nope", Role.CLIENT)
    pub, _ = pair(tmp_path / "made", "good")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(pub, allowed)
    (allowed / "junk.key").write_text("not a certificate")
    with structlog.testing.capture_logs() as logs:
        keys = curve.KeyDir(allowed, Role.CLIENT)
    assert list(keys.keys.values()) == ["good.key"]
    assert [e["file"] for e in logs if e["event"] == "key_file_ignored"] == ["junk.key"]


def test_refusals_are_logged_once_then_rate_limited() -> None:
    now = [0.0]
    refusals = curve._RefusalLog(clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(50):  # ZeroMQ retrying every 100 ms for 5 s
            refusals.refused("workers", "unknown key", key="K1")
            now[0] += 0.1
        refusals.refused("workers", "unknown key", key="K2")  # another peer: logged at once
        now[0] += curve.REFUSAL_LOG_INTERVAL_S
        refusals.refused("workers", "unknown key", key="K1")
    events = [(e["key"], e.get("repeated")) for e in logs if e["event"] == "peer_refused"]
    assert events == [("K1", None), ("K2", None), ("K1", 49)]
