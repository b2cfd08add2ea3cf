"""Options shared by the nftables compilers (the flat layout and kube-proxy's layout).

Everything here is resolved before compiling (see :func:`minikproxy.nodeopts.nftables_options`):
the compilers do no lookups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minikproxy.model.names import IPV4, IPFamily

LocalMatchKind = Literal["saddr", "iifname"]


@dataclass(frozen=True, slots=True)
class LocalMatch:
    """How to tell traffic from this node's pods (kube-proxy's ``--detect-local-mode``).

    ``kind`` is ``saddr`` (``value`` is a CIDR: ClusterCIDR, NodeCIDR) or ``iifname``
    (``value`` is an interface name, or a prefix ending in ``*`` for InterfaceNamePrefix).
    """

    kind: LocalMatchKind
    value: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class NftablesOptions:
    """Node options that shape an nftables ruleset for one IP family.

    ``nodeport_addresses`` None means NodePorts answer on every local address (``fib daddr
    type local``); otherwise on the listed node IPs only (kube-proxy's nftables mode defaults
    to the node's primary IP). ``local`` None means local traffic cannot be detected.
    ``service_cidrs`` are this family's service CIDRs (``--service-cidr`` or the API's
    ServiceCIDR objects); empty disables the service-CIDR checks.
    """

    family: IPFamily = IPV4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local: LocalMatch | None = None
    node_ip: str = ""
    nodeport_addresses: tuple[str, ...] | None = None
    service_cidrs: tuple[str, ...] = ()
    conntrack_tcp_be_liberal: bool = False

    @property
    def masquerade_mark(self) -> str:
        """The mark bit as kube-proxy writes it, e.g. ``0x4000`` for bit 14."""
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def localhost_nodeports_active(self) -> bool:
        """Always False: NodePorts on 127.0.0.1 do not exist in nftables mode (kube-proxy's)."""
        return False

    @property
    def nft_family(self) -> str:
        """The nftables table family: ``ip`` or ``ip6``."""
        return "ip" if self.family == IPV4 else "ip6"
