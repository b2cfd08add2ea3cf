"""``minikproxy diff``: what changes for each service port and kind of traffic, between two
snapshots in one mode or one snapshot in two modes, judged by explaining packets with the
compiled rules of each side (not by comparing rule text)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from minikproxy.compile.iptables import same_rules
from minikproxy.explain.driver import ModeView, explain_packet
from minikproxy.explain.packet import Origin, Packet
from minikproxy.explain.result import Explanation
from minikproxy.model.names import IPV6, ServicePortName
from minikproxy.model.serviceport import ServicePort

EXTERNAL_SOURCE = {"IPv4": "192.0.2.200", "IPv6": "2001:db8::200"}
"""The outside client diff sends from (TEST-NET-1 / documentation prefix)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """One kind of traffic to one frontend of a service port."""

    port: ServicePortName
    frontend: str  # "ClusterIP", "externalIP", "LoadBalancer IP", "NodePort"
    packet: Packet

    @property
    def key(self) -> tuple[ServicePortName, str, str, str, int]:
        """What identifies the probe on both sides."""
        return (self.port, self.frontend, self.packet.origin, self.packet.dst, self.packet.dport)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What matters of an explanation for a diff."""

    verdict: str
    endpoints: tuple[tuple[str, float], ...]
    masquerade: bool
    affinity: bool

    @classmethod
    def of(cls, exp: Explanation) -> Outcome:
        """The outcome of ``exp``."""
        eps = tuple((e.address, round(e.probability, 4)) for e in exp.endpoints)
        return cls(exp.verdict, eps, exp.masquerade, bool(exp.affinity))

    def describe(self) -> str:
        """``dnat to 3 endpoints (masqueraded)``."""
        if self.verdict != "dnat":
            return self.verdict
        eps = ", ".join(f"{a} {p * 100:.1f}%" for a, p in self.endpoints)
        extra = " masqueraded" if self.masquerade else ""
        extra += " affinity" if self.affinity else ""
        return f"dnat [{eps}]{extra}"


@dataclass(frozen=True, slots=True)
class Change:
    """One probe whose outcome differs; ``known`` names an intended mode difference."""

    probe: Probe
    old: Outcome
    new: Outcome
    what: tuple[str, ...]
    known: str = ""

    def as_json(self) -> dict[str, Any]:
        """The change as a JSON object."""
        p = self.probe.packet
        return {
            "service_port": f"{self.probe.port} ({self.probe.port.protocol})",
            "frontend": self.probe.frontend,
            "from": p.origin,
            "packet": {"src": p.src, "dst": p.dst, "dport": p.dport, "proto": p.proto},
            "changed": list(self.what),
            "old": self.old.describe(),
            "new": self.new.describe(),
            "known_mode_difference": self.known or None,
        }


def probes(view: ModeView, port: ServicePort) -> Iterator[Probe]:
    """The traffic diff checks for ``port``: pods, the node and outside clients to each of its
    frontends (an allowed source too when it has loadBalancerSourceRanges)."""
    family = view.family
    proto = port.protocol.lower()
    pod_src = _pod_source(view)
    node_src = sorted(view.local)[0] if view.local else ("::1" if family == IPV6 else "127.0.0.1")
    ext = EXTERNAL_SOURCE[family]
    frontends: list[tuple[str, str, int]] = [("ClusterIP", port.cluster_ip, port.port)]
    frontends += [("externalIP", ip, port.port) for ip in port.external_ips]
    frontends += [("LoadBalancer IP", ip, port.port) for ip in port.load_balancer_vips]
    if port.node_port:
        addresses = view.nodeport_addresses
        if addresses is None:
            addresses = tuple(sorted(view.local))
        frontends += [("NodePort", ip, port.node_port) for ip in addresses]
    for frontend, dst, dport in frontends:
        origins: list[tuple[Origin, str]] = [("pod", pod_src), ("node", node_src)]
        if frontend == "NodePort" and dst == frontends[-1][1] and family != IPV6:
            yield Probe(
                port.name, frontend, Packet("127.0.0.1", "127.0.0.1", dport, proto, "localhost")
            )
        if frontend != "ClusterIP":
            origins.append(("external", ext))
            if frontend == "LoadBalancer IP" and port.load_balancer_source_ranges:
                allowed = str(ipaddress.ip_network(port.load_balancer_source_ranges[0])[1])
                origins.append(("external", allowed))
        for origin, src in origins:
            yield Probe(port.name, frontend, Packet(src, dst, dport, proto, origin))


def _pod_source(view: ModeView) -> str:
    if view.local_cidr:
        net = ipaddress.ip_network(view.local_cidr)
        return str(net[max(net.num_addresses - 2, 0)])  # the last address: rarely an endpoint
    return "10.244.99.99" if view.family != IPV6 else "fd00:244::99"


def compare(a: Outcome, b: Outcome) -> tuple[str, ...]:
    """What differs between two outcomes, in words."""
    what: list[str] = []
    if a.verdict != b.verdict:
        what.append(f"verdict {a.verdict} -> {b.verdict}")
        if "dnat" in (a.verdict, b.verdict):
            what.append("reachability")
    if a.verdict == b.verdict == "dnat":
        old_eps, new_eps = dict(a.endpoints), dict(b.endpoints)
        if set(old_eps) != set(new_eps):
            what.append("endpoint set")
        elif old_eps != new_eps:
            what.append("endpoint weights")
        if a.masquerade != b.masquerade:
            what.append("masquerading")
        if a.affinity != b.affinity:
            what.append("affinity")
    return tuple(what)


def unchanged_ports(old: ModeView, new: ModeView) -> set[ServicePortName]:
    """Ports whose compiled rules are identical on both sides (same mode and node options),
    which need no evaluation: a packet to them crosses the same rules."""
    if old.ruleset is None or new.ruleset is None:
        return set()
    if old.mode != new.mode or old.ruleset.options != new.ruleset.options:
        return set()
    if old.mode == "ipvs" and old.ruleset.render_iptables() != new.ruleset.render_iptables():
        return set()  # set-based rules shared by every port: any port may behave differently
    out: set[ServicePortName] = set()
    olds, news = old.ruleset.services, new.ruleset.services
    for name, frag in news.items():
        prev = olds.get(name)
        if prev is None or old.state.services.get(name) != new.state.services.get(name):
            continue
        if old.mode == "iptables":
            same = same_rules(prev, frag)
        elif old.mode == "ipvs":
            same = _same_ipvs(prev, frag)
        else:
            same = _same_nft(prev, frag)
        if same:
            out.add(name)
    return out


def _same_nft(a: Any, b: Any) -> bool:
    if hasattr(a, "elements") and hasattr(a, "pick_counts"):
        return bool(a.elements == b.elements)
    return bool(a == b)


def _same_ipvs(a: Any, b: Any) -> bool:
    return bool(
        a.virtual_servers == b.virtual_servers
        and a.entries == b.entries
        and a.bind_addresses == b.bind_addresses
        and a.out_filter == b.out_filter
    )


def diff_views(old: ModeView, new: ModeView) -> list[Change]:
    """Every probe whose outcome differs between ``old`` and ``new`` (same family)."""
    skip = unchanged_ports(old, new)
    names = sorted((set(old.state.services) | set(new.state.services)) - skip)
    changes: list[Change] = []
    for name in names:
        sides: list[dict[tuple[Any, ...], tuple[Probe, Outcome]]] = []
        for view in (old, new):
            found: dict[tuple[Any, ...], tuple[Probe, Outcome]] = {}
            port = view.state.services.get(name)
            if port is not None:
                found.update(
                    (probe.key, (probe, _outcome(view, probe))) for probe in probes(view, port)
                )
            sides.append(found)
        before, after = sides
        for key in sorted(set(before) | set(after), key=_sort_key):
            probe = (before.get(key) or after[key])[0]
            # A frontend only one side has: what the other side's rules do to that packet.
            a = before[key][1] if key in before else _outcome(old, probe)
            b = after[key][1] if key in after else _outcome(new, probe)
            what = compare(a, b)
            if what:
                changes.append(Change(probe, a, b, what, known_difference(old, new, probe)))
    return changes


def _outcome(view: ModeView, probe: Probe) -> Outcome:
    return Outcome.of(explain_packet(view, probe.packet, detail=False))


def _sort_key(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(k) for k in key)


def known_difference(old: ModeView, new: ModeView, probe: Probe) -> str:
    """The documented, intended difference between two modes a change comes from, or ""."""
    if old.mode == new.mode:
        return ""
    modes = {old.mode.split("/")[0], new.mode.split("/")[0]}
    if "ipvs" in modes:
        return _ipvs_difference(old, new, probe, modes)
    if probe.frontend == "NodePort" and modes == {"iptables", "nftables"}:
        p = probe.packet
        if p.dst in ("127.0.0.1", "::1"):
            return "localhost NodePorts are not supported in nftables mode (kube-proxy too)"
        return (
            "nftables mode answers NodePorts on the node's primary IP only by default "
            "(--nodeport-addresses primary); iptables mode on every local address"
        )
    return ""


def _ipvs_difference(old: ModeView, new: ModeView, probe: Probe, modes: set[str]) -> str:
    """The intended difference between IPVS mode and the other one behind a change."""
    other = next(iter(modes - {"ipvs"}))
    p = probe.packet
    if probe.frontend == "NodePort" and p.dst in ("127.0.0.1", "::1"):
        return f"IPVS mode has no localhost NodePorts; {other} mode " + (
            "has them (kube-proxy too)" if other == "iptables" else "neither"
        )
    view, other_view = (old, new) if old.mode == "ipvs" else (new, old)
    port = view.state.services.get(probe.port)
    if port is not None:
        external = probe.frontend != "ClusterIP"
        local = port.external_policy_local if external else port.internal_policy_local
        cat = view.state.categorize(port)
        if local and cat.has_any and not cat.local:
            if not cat.cluster:
                return (
                    "a Local traffic policy with no endpoint on this node: IPVS mode's virtual "
                    f"server has no real server (ICMP port unreachable), {other} mode drops"
                )
            return (
                "a Local traffic policy with no endpoint on this node: IPVS mode falls back to "
                f"the cluster's endpoints (kube-proxy #97081), {other} mode drops"
            )
        if local and external and p.origin in ("pod", "node"):
            return (
                "externalTrafficPolicy: Local from a pod or the node: IPVS mode uses this "
                f"node's endpoints only (one virtual server per frontend), {other} mode "
                "short-circuits to every endpoint"
            )
    addresses = other_view.nodeport_addresses
    if probe.frontend == "NodePort" and addresses is not None and p.dst not in addresses:
        return (
            f"IPVS mode answers NodePorts on every node address, {other} mode on "
            + ("the primary IP only by default" if other == "nftables" else "those selected")
            + " (--nodeport-addresses)"
        )
    return ""


_IPVS_NOTES = (
    "IPVS binds every Service IP to the kube-ipvs0 dummy interface: the node owns them, "
    "answers ARP for them unless strictARP, and KUBE-IPVS-FILTER rejects new connections to "
    "other ports of them",
    "IPVS mode answers NodePorts on every node address, and has no localhost NodePorts",
    "IPVS mode falls back to the cluster's endpoints when a Local traffic policy finds none on "
    "this node (kube-proxy #97081; with internalTrafficPolicy: Local alone there are none to "
    "fall back to: reject); the other modes drop",
    "with externalTrafficPolicy: Local, IPVS mode sends pods and the node to this node's "
    "endpoints only; the other modes short-circuit them to every endpoint",
    "IPVS schedules round robin (--ipvs-scheduler) and keeps ClientIP affinity as persistence; "
    "the other modes pick at random and track affinity per client",
    "IPVS keeps removed TCP endpoints at weight 0 while they have connections (graceful "
    "termination); the other modes remove them at once (conntrack keeps existing connections)",
)

MODE_NOTES: dict[frozenset[str], tuple[str, ...]] = {
    frozenset({"iptables", "nftables"}): (
        "nftables mode does not support localhost NodePorts (127.0.0.1:<nodePort>)",
        "nftables mode answers NodePorts on the node's primary IP only by default "
        "(--nodeport-addresses primary), iptables mode on every local address",
        "nftables mode rejects traffic to a cluster IP on a port no Service defines, and drops "
        "traffic to unallocated addresses of the service CIDR; iptables mode leaves it alone",
    ),
    frozenset({"ipvs", "nftables"}): (
        *_IPVS_NOTES,
        "nftables mode answers NodePorts on the node's primary IP only by default "
        "(--nodeport-addresses primary)",
    ),
    frozenset({"ipvs", "iptables"}): (
        *_IPVS_NOTES,
        "iptables mode also answers NodePorts on 127.0.0.1 (localhost NodePorts)",
    ),
}


def mode_notes(old_mode: str, new_mode: str) -> tuple[str, ...]:
    """kube-proxy's documented, intended differences between two proxy modes."""
    return MODE_NOTES.get(frozenset({old_mode.split("/")[0], new_mode.split("/")[0]}), ())
