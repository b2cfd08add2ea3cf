"""An in-memory :class:`~minikproxy.dataplane.conntrack.Conntrack` recording what was cleared.

Like kube-proxy's ``conntrack.FakeInterface`` it records cleared IPs, ports and NAT pairs; it
also holds a list of flows (seed it with :func:`make_flow`) from which each clear removes the
matching ones, so tests can check both what was asked and what it did. Arguments are validated
as the real implementation does (ValueError for a bad protocol, address or port).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from minikproxy.dataplane.conntrack import (
    Conntrack,
    ConntrackFlow,
    check_port,
    check_protocol,
    ip_family_of,
)
from minikproxy.model.names import IPFamily


def make_flow(
    protocol: str,
    orig_src: str,
    orig_dst: str,
    orig_sport: int | None = None,
    orig_dport: int | None = None,
    *,
    reply_src: str | None = None,
    reply_sport: int | None = None,
    flags: Iterable[str] = (),
) -> ConntrackFlow:
    """A flow from ``orig_src`` to ``orig_dst``; ``reply_src``/``reply_sport`` name the DNAT
    target (default: no DNAT). The reply goes back to the original source."""
    return ConntrackFlow(
        family=ip_family_of(orig_src),
        protocol=check_protocol(protocol),
        timeout=30,
        state=None,
        orig_src=orig_src,
        orig_dst=orig_dst,
        orig_sport=orig_sport,
        orig_dport=orig_dport,
        reply_src=reply_src or orig_dst,
        reply_dst=orig_src,
        reply_sport=reply_sport if reply_sport is not None else orig_dport,
        reply_dport=orig_sport,
        flags=list(flags),
        mark=0,
    )


def _same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


class FakeConntrack:
    """Records clears in ``cleared_ips`` ``{(ip, protocol)}``, ``cleared_ports``
    ``{(port, protocol, family)}`` and ``cleared_nats`` ``{(orig_ip, dest_ip, protocol)}``, and
    removes matching flows from ``flows``."""

    def __init__(self, flows: Iterable[ConntrackFlow] = ()) -> None:
        self.flows: list[ConntrackFlow] = list(flows)
        self.cleared_ips: set[tuple[str, str]] = set()
        self.cleared_ports: set[tuple[int, str, IPFamily]] = set()
        self.cleared_nats: set[tuple[str, str, str]] = set()
        self.cleared_port_nats: set[tuple[int, str, str]] = set()

    def reset(self) -> None:
        """Forget what was cleared (the flows stay)."""
        self.cleared_ips.clear()
        self.cleared_ports.clear()
        self.cleared_nats.clear()
        self.cleared_port_nats.clear()

    def _remove(self, matches: Callable[[ConntrackFlow], bool]) -> int:
        kept = [flow for flow in self.flows if not matches(flow)]
        removed = len(self.flows) - len(kept)
        self.flows = kept
        return removed

    def clear_entries_for_ip(self, ip: str, protocol: str) -> int:
        """Record ``(ip, protocol)``; remove flows with original destination ``ip``."""
        protocol = check_protocol(protocol)
        ip_family_of(ip)
        self.cleared_ips.add((ip, protocol))
        return self._remove(lambda f: f["protocol"] == protocol and _same_ip(f["orig_dst"], ip))

    def clear_entries_for_port(self, port: int, protocol: str, family: IPFamily) -> int:
        """Record ``(port, protocol, family)``; remove flows to original destination port."""
        protocol = check_protocol(protocol)
        self.cleared_ports.add((check_port(port), protocol, family))
        return self._remove(
            lambda f: (
                f["protocol"] == protocol and f["family"] == family and f["orig_dport"] == port
            )
        )

    def clear_entries_for_port_nat(self, port: int, dest_ip: str, protocol: str) -> int:
        """Record ``(port, dest_ip, protocol)``; remove flows to ``port`` DNATed to
        ``dest_ip``."""
        protocol = check_protocol(protocol)
        self.cleared_port_nats.add((check_port(port), dest_ip, protocol))
        return self._remove(
            lambda f: (
                f["protocol"] == protocol
                and f["orig_dport"] == port
                and _same_ip(f["reply_src"], dest_ip)
            )
        )

    def clear_entries_for_nat(self, orig_ip: str, dest_ip: str, protocol: str) -> int:
        """Record ``(orig_ip, dest_ip, protocol)``; remove flows to ``orig_ip`` DNATed to
        ``dest_ip``."""
        protocol = check_protocol(protocol)
        if ip_family_of(orig_ip) != ip_family_of(dest_ip):
            raise ValueError(f"{orig_ip} and {dest_ip} are not of the same IP family")
        self.cleared_nats.add((orig_ip, dest_ip, protocol))
        return self._remove(
            lambda f: (
                f["protocol"] == protocol
                and _same_ip(f["orig_dst"], orig_ip)
                and _same_ip(f["reply_src"], dest_ip)
            )
        )

    def list_entries(
        self, protocol: str | None = None, family: IPFamily | None = None
    ) -> list[ConntrackFlow]:
        """The held flows of ``protocol`` and ``family`` (None: any)."""
        wanted = None if protocol is None else check_protocol(protocol)
        return [
            flow
            for flow in self.flows
            if wanted in (None, flow["protocol"]) and family in (None, flow["family"])
        ]


if TYPE_CHECKING:
    _: Conntrack = FakeConntrack()

__all__ = ["FakeConntrack", "make_flow"]
