"""The packet ``explain`` follows, and where it comes from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from minikproxy.model.endpoint import join_host_port
from minikproxy.model.names import IPV4, IPV6, IPFamily

Origin = Literal["pod", "node", "external", "localhost"]
ORIGINS: tuple[Origin, ...] = ("pod", "node", "external", "localhost")
PROTOS = ("tcp", "udp", "sctp")
_WHERE = {"pod": "a pod", "node": "the node", "external": "outside", "localhost": "localhost"}
_WHERE = {"pod": "a pod", "node": "the node", "external": "outside", "localhost": "localhost"}


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a new connection: ``src`` -> ``dst:dport`` over ``proto``.

    ``origin`` picks the netfilter path: ``pod`` and ``external`` packets arrive on an
    interface (PREROUTING; a pod's interface is the one local-traffic detection names),
    ``node`` and ``localhost`` packets are sent by the node itself (OUTPUT).
    ``in_interface`` names the interface an arriving packet comes in by (default: the pod
    interface local-traffic detection names for a pod, another one for outside traffic).
    """

    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    origin: Origin = "external"
    in_interface: str = ""

    @property
    def family(self) -> IPFamily:
        """The packet's IP family."""
        return IPV6 if ":" in self.dst else IPV4

    @property
    def locally_generated(self) -> bool:
        """True when the node itself sends the packet (the OUTPUT path)."""
        return self.origin in ("node", "localhost")

    def describe(self) -> str:
        """``tcp 10.1.2.3 -> 10.96.0.10:80 (from a pod)``."""
        where = _WHERE[self.origin]
        return f"{self.proto} {self.src} -> {join_host_port(self.dst, self.dport)} (from {where})"


def make_packet(
    src: str, dst: str, dport: int, proto: str, origin: Origin, in_interface: str = ""
) -> Packet:
    """A validated :class:`Packet` (canonical addresses); ValueError names the bad field."""
    try:
        src_ip = ipaddress.ip_address(src)
    except ValueError:
        raise ValueError(f"--src: invalid IP address {src!r}") from None
    try:
        dst_ip = ipaddress.ip_address(dst)
    except ValueError:
        raise ValueError(f"--dst: invalid IP address {dst!r}") from None
    if src_ip.version != dst_ip.version:
        raise ValueError(f"--src {src} and --dst {dst} are of different IP families")
    if not 1 <= dport <= 65535:
        raise ValueError(f"--dport: {dport} is not in 1..65535")
    proto = proto.lower()
    if proto not in PROTOS:
        raise ValueError(f"--proto: unknown protocol {proto!r} (tcp, udp or sctp)")
    if origin not in ORIGINS:
        raise ValueError(f"--from: unknown origin {origin!r}")
    if origin == "localhost" and not src_ip.is_loopback:
        raise ValueError(f"--from localhost needs a loopback --src, not {src}")
    if in_interface and origin in ("node", "localhost"):
        raise ValueError(f"--in-interface: a packet from {origin} is sent, it comes in by none")
    return Packet(str(src_ip), str(dst_ip), dport, proto, origin, in_interface)
