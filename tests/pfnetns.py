"""Hosts of their own on one machine: network namespaces joined by a switch (a bridge in a
namespace of its own). Every address lives only in namespaces this module creates, so no
packet leaves them; ``destroy()`` ends what still runs in them and removes them all.

    [host a 10.x.0.1] --+
    [host b 10.x.0.2] --+-- br0 (the switch's namespace)
    ...
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest


def run_ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def require_netns() -> None:
    """Skip the calling test where namespaces cannot be made (CI runs as root with iproute2)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed (apt-get install iproute2)")


class Network:
    """``hosts`` (name -> address on a /24) and a switch, each a network namespace."""

    def __init__(self, hosts: dict[str, str]) -> None:
        tag = uuid.uuid4().hex[:6]
        self.hosts = dict(hosts)
        self.switch = f"pf{tag}-sw"
        self.ns = {host: f"pf{tag}-{host}" for host in hosts}
        self.created: list[str] = []

    def create(self) -> None:
        for name in (self.switch, *self.ns.values()):
            run_ip("netns", "add", name)
            self.created.append(name)
            run_ip("-n", name, "link", "set", "lo", "up")
        run_ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        run_ip("-n", self.switch, "link", "set", "br0", "up")
        for host, ns in self.ns.items():
            port = self.port(host)
            # Made inside the namespaces: the root namespace never sees these links.
            run_ip(
                "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns
            )
            run_ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            run_ip("-n", ns, "addr", "add", f"{self.hosts[host]}/24", "dev", "eth0")
            run_ip("-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def port(host: str) -> str:
        return f"p-{host}"

    def wrap(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def set_link(self, host: str, up: bool) -> None:
        """Plug or pull ``host``'s cable at the switch."""
        run_ip("-n", self.switch, "link", "set", self.port(host), "up" if up else "down")

    def destroy(self) -> None:
        for name in reversed(self.created):
            # Anything still running in a namespace of ours was started by this test.
            try:
                pids = run_ip("netns", "pids", name).split()
            except RuntimeError:
                pids = []
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            try:
                run_ip("netns", "del", name)
            except RuntimeError as exc:
                sys.stderr.write(f"cleanup: {exc}\n")
        self.created.clear()
