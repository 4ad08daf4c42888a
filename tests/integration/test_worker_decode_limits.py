"""A worker decodes task arguments within the codec's limits, off its main loop: a
hostile argument fails its task with an error naming the limit, the worker's memory
stays bounded, its heartbeats go on (the master never expires it), and it keeps working.

The argument is submitted raw (a client's own encoder would build it in memory first):
20 MB of nested empty arrays, which without limits decode to about 1.5 GB of lists.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from pfharness import Cluster, process_tree
from pfpeers import RawPeer

from poolfleet.client import Client, TaskError
from poolfleet.common.ids import format_id
from poolfleet.common.protocol import CMD_TASK_NAME, PROTOCOL_VERSION, MsgKind

#: Peak resident memory allowed to the worker and to each of its processes (about 120 MiB
#: are seen: the 20 MB message itself passes through the worker); without limits a pool
#: child or the worker itself peaks at 1.4-1.6 GiB.
MAX_PEAK_MIB = 400


def nested_empty_arrays(chunks: int, per: int = 1_000_000) -> bytes:
    """The payload ``[[[[], [], ...] * chunks], {}]``: ``chunks`` MB, ``chunks`` million lists."""
    inner = b"\xdd" + struct.pack(">I", per) + b"\x90" * per
    return b"\x92\x91\xdd" + struct.pack(">I", chunks) + inner * chunks + b"\x80"


def peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.mark.parametrize("kind", ["cpu", "io", "cmd"])
def test_hostile_arguments_fail_the_task_and_the_worker_goes_on(
    make_cluster: type[Cluster], ctx: Any, kind: str
) -> None:
    c = make_cluster()
    master = c.start_master()
    w = c.start_worker("--allow-cmd", "echo", name=f"wd-{kind}", cpu=1, io=2)
    peer = RawPeer(ctx, c.client_endpoint)
    try:
        peer.send(MsgKind.HELLO, {"version": PROTOCOL_VERSION, "role": "client"})
        assert peer.recv_until(MsgKind.WELCOME) is not None
        tid = os.urandom(16)
        name = CMD_TASK_NAME if kind == "cmd" else "pf_testtasks:square"
        task = {"id": tid, "name": name, "payload": nested_empty_arrays(20), "kind": kind}
        peer.send(MsgKind.SUBMIT, {"req": 1, "tasks": [task]})
        ack = peer.recv_until(MsgKind.SUBMITTED, timeout=30, where=lambda b: b.get("req") == 1)
        assert ack is not None and ack["accepted"] == [tid]
    finally:
        peer.close()
    with Client(c.client_endpoint) as cl:
        f = cl.future(format_id(tid))
        with pytest.raises(TaskError) as info:
            f.result(60)
        err = info.value
        assert err.state == "FAILED" and err.type.endswith("DecodeError")
        assert "decoding limits" in err.message
        assert "more than 1000000 array items and map entries" in err.message
        assert f.info["attempt"] == 1  # run once: the worker was never expired for it
        assert not master.events("worker_expired")
        peaks = {pid: peak_mib(pid) for pid in [w.pid] + [p for p, _ in process_tree(w.pid)]}
        assert max(peaks.values()) < MAX_PEAK_MIB, f"peak resident MiB by pid: {peaks}"
        # the same worker, same slots, goes on
        assert cl.submit("pf_testtasks:add", 2, 3).result(30) == 5
        assert cl.with_options(kind="io").submit("pf_testtasks:add", 1, 1).result(30) == 2
    assert w.alive()
