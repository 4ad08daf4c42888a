"""Who may ship code to this master (the shell's half; codestore.py checks what is shipped).

With CurveZMQ keys, a client may ship code only if its public key (the ZAP user id ZeroMQ
puts on each of its messages) is in ``--trusted-client-keys``. Without keys, only a master
whose two sockets are bound to loopback accepts shipped code: every peer is on this host.
Each refusal says what to configure.
"""

from __future__ import annotations

from poolfleet.common.curve import KeyDir
from poolfleet.common.net import parse_endpoint
from poolfleet.common.protocol import Role
from poolfleet.master.codestore import Trust
from poolfleet.master.settings import MasterSettings

_KEYS_HINT = (
    "configure CurveZMQ keys (--curve-secret-key, --curve-workers-dir, --curve-clients-dir) and "
    "--trusted-client-keys DIR holding the public keys of the clients allowed to ship code"
)


class ShippingGate:
    """Decides, per client request, whether it may ship code."""

    def __init__(self, settings: MasterSettings) -> None:
        self.keys: KeyDir | None = None
        self.fixed: Trust
        if settings.has_curve:
            if settings.trusted_client_keys is not None:
                self.keys = KeyDir(settings.trusted_client_keys, Role.CLIENT, "trusted clients")
            self.fixed = Trust(
                None,
                "this master trusts no client to ship code: start pmaster with --trusted-client-keys DIR "
                "holding the public keys of the clients allowed to (or move the function into a module "
                "the workers load with --tasks)",
            )
        elif all(parse_endpoint(u).is_loopback for u in (settings.clients, settings.workers)):
            self.fixed = Trust("loopback")
        else:
            self.fixed = Trust(
                None,
                "shipped code without CurveZMQ keys is accepted only by a master bound to loopback "
                f"(this one listens on {settings.clients} and {settings.workers}); {_KEYS_HINT}",
            )

    @property
    def needs_peer_key(self) -> bool:
        """Whether the shell must read each client message's ZAP user id (the client's key)."""
        return self.keys is not None

    def trust(self, peer_key: str | None) -> Trust:
        if self.keys is None:
            return self.fixed
        name = self.keys.lookup(peer_key.encode("ascii", "replace")) if peer_key else None
        if name is None:
            return Trust(
                None,
                f"this client's key is not among the trusted client keys in {self.keys.path}: copy its "
                "public key file there to let it ship code (or move the function into a module the "
                "workers load with --tasks)",
            )
        return Trust(name)
