"""Kubernetes causes for what the rules do: read from the model, never used for the verdict."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from minikproxy.compile.cidr import cidr_contains
from minikproxy.explain.packet import Packet
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState


@dataclass(frozen=True, slots=True)
class Target:
    """The service port a packet is addressed to, and through which frontend (``ClusterIP``,
    ``externalIP``, ``LoadBalancer IP`` or ``NodePort``)."""

    port: ServicePort
    frontend: str


@dataclass(frozen=True, slots=True)
class FrontendIndex:
    """Service ports by frontend: ``(ip, port, PROTO)`` and ``(nodePort, PROTO)``, and by IP."""

    by_address: dict[tuple[str, int, str], list[Target]]
    by_node_port: dict[tuple[int, str], list[ServicePort]]
    by_ip: dict[str, list[ServicePort]]

    @classmethod
    def build(cls, state: ProxyState) -> FrontendIndex:
        """Index every service port of ``state`` (one pass), in port name order: the
        tracker's order follows set iteration, which varies with the hash seed."""
        by_address: dict[tuple[str, int, str], list[Target]] = {}
        by_node_port: dict[tuple[int, str], list[ServicePort]] = {}
        by_ip: dict[str, list[ServicePort]] = {}
        for _, port in sorted(state.services.items()):
            proto = port.protocol
            for frontend, ips in (
                ("ClusterIP", (port.cluster_ip,)),
                ("externalIP", port.external_ips),
                ("LoadBalancer IP", port.load_balancer_vips),
            ):
                for ip in ips:
                    by_address.setdefault((ip, port.port, proto), []).append(Target(port, frontend))
                    by_ip.setdefault(ip, []).append(port)
            if port.node_port:
                by_node_port.setdefault((port.node_port, proto), []).append(port)
        return cls(by_address, by_node_port, by_ip)


def find_targets(
    index: FrontendIndex,
    packet: Packet,
    nodeport_addresses: tuple[str, ...] | None,
    local: frozenset[str],
) -> list[Target]:
    """Every service port whose frontend is ``packet``'s destination (usually one)."""
    proto = packet.proto.upper()
    out = list(index.by_address.get((packet.dst, packet.dport, proto), ()))
    ports = index.by_node_port.get((packet.dport, proto), ())
    if ports:
        addresses = local if nodeport_addresses is None else set(nodeport_addresses)
        if packet.dst in addresses or (nodeport_addresses is None and _loopback(packet.dst)):
            out.extend(Target(port, "NodePort") for port in ports)
    return out


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


def service_reasons(
    state: ProxyState,
    target: Target,
    packet: Packet,
    *,
    pod_source: bool,
    local_detection: str,
    masquerade_all: bool,
    dnat: bool = True,
) -> Iterator[str]:
    """The Kubernetes facts behind the rules for ``target``, in the order they apply
    (without ``dnat``, the packet is not forwarded: nothing about masquerading)."""
    port = target.port
    cat = state.categorize(port)
    name = f"{port.name} ({port.protocol})"
    yield f"{packet.dst} port {packet.dport} is the {target.frontend} of {name}"
    external = target.frontend != "ClusterIP"
    if target.frontend == "LoadBalancer IP" and port.load_balancer_source_ranges and cat.has_any:
        ranges = ", ".join(port.load_balancer_source_ranges)
        if any(cidr_contains(c, packet.src) for c in port.load_balancer_source_ranges):
            yield f"source {packet.src} is in loadBalancerSourceRanges ({ranges})"
        else:
            yield f"source {packet.src} not in loadBalancerSourceRanges ({ranges})"
    endpoints = state.endpoints_of(port.name)
    if not cat.has_any:
        if endpoints:
            yield (
                f"{name} has no usable endpoint: none of its {len(endpoints)} endpoint(s) is "
                "ready, or serving and terminating"
            )
        else:
            yield f"{name} has no endpoints (no EndpointSlice lists one for this port)"
        return
    local_policy = port.external_policy_local if external else port.internal_policy_local
    short_circuit = (
        external and port.external_policy_local and (pod_source or packet.locally_generated)
    )
    if local_policy and not short_circuit:
        which = "externalTrafficPolicy" if external else "internalTrafficPolicy"
        if not cat.local:
            yield f"{which}: Local and this node has no ready endpoint"
        else:
            yield f"{which}: Local: only this node's {len(cat.local)} endpoint(s) are used"
            if all(ep.terminating for ep in cat.local):
                yield "all local endpoints terminating: falling back to serving-terminating"
            return
    elif short_circuit:
        who = "the node itself" if packet.locally_generated else "a pod"
        yield (
            f"externalTrafficPolicy: Local, but traffic from {who} is short-circuited to every "
            "endpoint of the cluster"
        )
    used = cat.cluster
    if used and all(ep.terminating for ep in used):
        yield "all endpoints terminating: falling back to serving-terminating"
    if cat.topology_mode:
        kind = "zone" if cat.topology_mode == "PreferSameZone" else "node"
        ready = sum(1 for ep in endpoints if ep.ready)
        yield f"topology: {kind} hints select {len(used)} of {ready} endpoints"
    elif (
        cat.topology_reason
        and cat.topology_reason != "no ready endpoints"
        and any(ep.zone_hints or ep.node_hints for ep in endpoints)
    ):
        yield f"topology: {cat.topology_reason}"
    if port.session_affinity_client_ip:
        yield f"sessionAffinity: ClientIP (timeout {port.sticky_max_age_seconds} s)"
    if not dnat:
        return
    if masquerade_all:
        yield "--masquerade-all: every Service connection is masqueraded"
    elif external and not port.external_policy_local:
        yield "externalTrafficPolicy: Cluster: traffic to an external frontend is masqueraded"
    elif not external and local_detection:
        verdict = "kept" if pod_source else "masqueraded (off-cluster source)"
        yield f"ClusterIP traffic from {packet.src}: {local_detection}; the source is {verdict}"


def no_target_reasons(index: FrontendIndex, packet: Packet) -> Iterator[str]:
    """Why no Service answers ``packet``'s destination."""
    others = sorted({f"{p.port}/{p.protocol}" for p in index.by_ip.get(packet.dst, ())})
    if others:
        yield (
            f"{packet.dst} is a Service IP, but no port {packet.dport}/{packet.proto.upper()} "
            f"(it has {', '.join(others)})"
        )
    else:
        yield f"no Service frontend is {packet.dst} port {packet.dport}/{packet.proto.upper()}"
