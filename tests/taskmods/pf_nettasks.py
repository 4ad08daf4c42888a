"""Task functions for the several-hosts test: which host (address) ran a task."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from poolfleet.worker import task


@task(kind="io")
def locate(peer: str, seconds: float = 0.0) -> dict[str, Any]:
    """Sleep, then return the address this host uses to reach ``peer``.

    Connecting a UDP socket sends nothing: the kernel only picks the route and
    the source address, which tells the network namespace the task ran in.
    """
    time.sleep(seconds)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        address = s.getsockname()[0]
    return {"address": address, "pid": os.getpid()}
