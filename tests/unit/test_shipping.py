"""Shipped code, the pure parts: names and hashes, version skew, who may ship, the bounded stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolfleet.client.shipping import needs_shipping, ship_mode
from poolfleet.common import codec
from poolfleet.common.errors import PoolfleetError, ProtocolError
from poolfleet.common.protocol import Kind
from poolfleet.common.shipping import (
    SHIPPED_ROUTE,
    digest_of,
    shipped_digest,
    shipped_name,
    skew,
)
from poolfleet.master.codestore import CodeStore, Trust, version_refusal
from poolfleet.master.core_base import task_route
from poolfleet.master.gate import ShippingGate
from poolfleet.master.registry import Offer, WorkerInfo
from poolfleet.master.settings import MasterSettings
from poolfleet.worker.codecache import CodeCache, Shipped


def test_a_shipped_name_holds_the_hash_and_a_label_and_routes_by_the_shipped_route() -> None:
    digest = digest_of(b"pickle")
    name = shipped_name(digest, "main.<locals>.<lambda>")
    assert name == f"poolfleet.shipped.h{digest.hex()}:main_locals_lambda"
    assert shipped_digest(name) == digest
    assert shipped_digest("poolfleet.shipped.hzz:f") is None and shipped_digest("mytasks:f") is None
    assert task_route(name, codec.pack_call((1,), {})) == SHIPPED_ROUTE
    chunk = codec.pack_call((name, [[1]]), {})
    assert task_route("poolfleet.worker.builtins:starmap_chunk", chunk) == SHIPPED_ROUTE
    assert task_route("mytasks:f", codec.pack_call((name,), {})) == "mytasks:f"


def test_version_skew_names_both_versions() -> None:
    assert skew("3.11", "3.1.1", "3.11", "3.0.0") is None
    msg = skew("3.12", "3.1.1", "3.11", "3.1.1")
    assert msg is not None and "Python 3.12 (cloudpickle 3.1.1)" in msg and "Python 3.11" in msg
    msg = skew("3.11", "2.2.1", "3.11", "3.1.1")
    assert msg is not None and "cloudpickle 2.2.1" in msg and "cloudpickle 3.1.1" in msg
    assert "not installed" in (skew("3.11", "3.1.1", "3.11", None) or "")


def worker(python: str | None, ships: bool = True) -> WorkerInfo:
    offers = {SHIPPED_ROUTE: Offer(Kind.CPU)} if ships else {"mytasks:f": Offer(Kind.CPU)}
    return WorkerInfo(
        b"w",
        "w",
        "h",
        1,
        ("default",),
        {Kind.CPU: 1},
        0.0,
        0.0,
        offers=offers,
        python=python,
        cloudpickle="3.1.1",
    )


def test_the_master_refuses_a_version_only_when_no_connected_shipping_worker_has_it() -> None:
    assert version_refusal("2.7", "3.1.1", []) is None  # nobody to ask yet: the worker decides
    assert version_refusal("2.7", "3.1.1", [worker("3.11", ships=False)]) is None
    refusal = version_refusal("2.7", "3.1.1", [worker("3.11")])
    assert refusal is not None and "Python 2.7" in refusal
    assert version_refusal("3.11", "3.1.1", [worker("3.12"), worker("3.11")]) is None


def test_a_worker_runs_shipped_code_only_if_it_says_so() -> None:
    silent = WorkerInfo(b"w", "w", "h", 1, ("default",), {Kind.CPU: 1}, 0.0, 0.0, offers=None)
    assert silent.offers_name("mytasks:anything") and not silent.offers_name(SHIPPED_ROUTE)
    assert worker("3.11").offers_name(SHIPPED_ROUTE)


def put_body(blob: bytes, python: str = "3.11") -> dict[str, object]:
    return {"req": 1, "hash": digest_of(blob), "blob": blob, "python": python, "cloudpickle": "3.1.1"}


def test_the_code_store_checks_trust_size_and_hash_and_keeps_a_bounded_memory() -> None:
    journal: dict[bytes, tuple[bytes, str, str, str]] = {}
    store = CodeStore(100, 250, journal.get)
    alice = Trust("alice.key")
    with pytest.raises(ProtocolError, match="what to configure") as refused:
        store.put(put_body(b"x"), Trust(None, "what to configure"), [])
    assert refused.value.code == "code_refused"
    with pytest.raises(ProtocolError) as big:
        store.put(put_body(b"x" * 101), alice, [])
    assert big.value.code == "code_too_large" and "101" in big.value.message
    forged = dict(put_body(b"one"), hash=digest_of(b"other"))
    with pytest.raises(ProtocolError, match="SHA-256"):
        store.put(forged, alice, [])
    blobs = [bytes([i]) * 100 for i in range(3)]
    new = [store.put(put_body(b), alice, []) for b in blobs]
    assert all(n is not None and n.shipped_by == "alice.key" for n in new)
    assert store.put(put_body(blobs[2]), alice, []) is None  # held already
    assert store.counters() == {"received": 4, "stored": 3, "sent": 0, "cached": 2, "cached_bytes": 200}
    # the oldest left memory; the journal still has it
    assert store.get(digest_of(blobs[0])) is None
    journal[digest_of(blobs[0])] = (blobs[0], "3.11", "3.1.1", "alice.key")
    found = store.get(digest_of(blobs[0]))
    assert found is not None and found.blob == blobs[0]


def test_the_workers_cache_drops_the_least_recently_used_beyond_its_bytes() -> None:
    cache = CodeCache(250)
    items = [Shipped(bytes([i]) * 32, bytes([i]) * 100, "3.11", "3.1.1") for i in range(3)]
    cache.add(items[0])
    cache.add(items[1])
    assert cache.get(items[0].digest) is items[0]  # now the most recent
    cache.add(items[2])
    assert cache.get(items[1].digest) is None and len(cache) == 2 and cache.bytes == 200


def test_without_keys_only_a_loopback_master_lets_clients_ship(tmp_path: Path) -> None:
    assert ShippingGate(MasterSettings(data_dir=tmp_path)).trust(None) == Trust("loopback")
    remote = MasterSettings(data_dir=tmp_path, clients="tcp://0.0.0.0:5555", insecure=True)
    refusal = ShippingGate(remote).trust(None).refusal
    assert refusal is not None and "tcp://0.0.0.0:5555" in refusal
    assert "--curve-secret-key" in refusal and "--trusted-client-keys DIR" in refusal


def test_trusted_client_keys_need_curve_keys(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="trusted_client_keys names client keys"):
        MasterSettings(data_dir=tmp_path, trusted_client_keys=tmp_path)


def test_the_client_ships_only_when_asked_and_only_what_workers_cannot_import() -> None:
    assert ship_mode(None, {}) is False
    assert ship_mode(None, {"POOLFLEET_SHIP_CODE": "1"}) is True
    assert ship_mode(False, {"POOLFLEET_SHIP_CODE": "1"}) is False
    with pytest.raises(PoolfleetError, match="POOLFLEET_SHIP_CODE"):
        ship_mode(None, {"POOLFLEET_SHIP_CODE": "maybe"})

    def local() -> None: ...

    assert needs_shipping(local) and needs_shipping(lambda: 1)
    assert not needs_shipping(digest_of) and not needs_shipping(len) and not needs_shipping("m:f")
