"""Shared fixtures: a cluster factory that always cleans up."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE / "taskmods", HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pfharness import Cluster  # noqa: E402


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[type[Cluster]]:
    """Factory: ``make_cluster(heartbeat_s=..)`` returns a Cluster killed at teardown."""
    made: list[Cluster] = []

    def factory(**kwargs: object) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield factory  # type: ignore[misc]
    failed = getattr(request.node, "rep_call", None)
    for c in made:
        if failed is not None and failed.failed:
            sys.stderr.write(c.dump_logs())
        c.close()


@pytest.fixture
def cluster(make_cluster: type[Cluster]) -> Cluster:
    """A master and two workers (2 cpu, 4 io slots each) running pf_testtasks."""
    c = make_cluster()
    c.start_master()
    c.start_worker(name="wa")
    c.start_worker(name="wb")
    return c


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
