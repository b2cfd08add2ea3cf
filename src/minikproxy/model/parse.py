"""Parse raw API objects (JSON dicts) into the immutable model, once.

Invalid fields never reach a compiler: they skip the object, port or endpoint that carries
them and are reported to a :data:`ProblemSink` naming namespace/name and the field.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

from minikproxy.model.endpoint import NO_HINTS
from minikproxy.model.names import (
    IPV4,
    IPV6,
    PROTOCOLS,
    IPFamily,
    NamespacedName,
    Protocol,
    ServicePortName,
)
from minikproxy.model.problems import ObjectProblem, ProblemSink
from minikproxy.model.serviceport import DEFAULT_STICKY_SECONDS, ServicePort

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"

Obj = Mapping[str, Any]


_AF = {IPV4: socket.AF_INET, IPV6: socket.AF_INET6}
_NO_CONDITIONS: Mapping[str, Any] = {}


def canonical_ip(text: Any) -> tuple[str, IPFamily] | None:
    """Return the canonical form and family of an IP address string, or None if invalid.

    Uses the C ``inet_pton``/``inet_ntop`` (``ipaddress`` is ~10x slower, and this runs for
    every endpoint). IPv4 with leading zeros is rejected, as by ``ipaddress``.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)), IPV4
    except OSError:
        pass
    if "%" in text:  # zone ids are not valid in Kubernetes addresses
        return None
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text)), IPV6
    except OSError:
        return None


def canonical_cidr(text: Any) -> tuple[str, IPFamily] | None:
    """Return the canonical form and family of a CIDR (host bits allowed), or None."""
    if not isinstance(text, str):
        return None
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    return (str(net), IPV4) if net.version == 4 else (str(net), IPV6)


def strict_cidr(text: Any) -> tuple[str, IPFamily] | None:
    """Like :func:`canonical_cidr`, but only ``address/prefix-length`` as Go's
    ``net.ParseCIDR`` (the API server's and kube-proxy's validation) accepts it: the prefix
    length is required and decimal (no netmask form), no surrounding blanks, no zone."""
    if not isinstance(text, str):
        return None
    address, sep, bits = text.partition("/")
    if not sep or not (bits.isascii() and bits.isdigit()) or address != address.strip():
        return None
    parsed = canonical_ip(address)
    if parsed is None or int(bits) > (32 if parsed[1] == IPV4 else 128):
        return None
    net = ipaddress.ip_network(f"{parsed[0]}/{int(bits)}", strict=False)
    return str(net), parsed[1]


def _meta(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name") or "")


def _labels(obj: Obj) -> Mapping[str, str]:
    return cast("Mapping[str, str]", (obj.get("metadata") or {}).get("labels") or {})


def _port_number(value: Any, *, allow_zero: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    low = 0 if allow_zero else 1
    return value if low <= value <= 65535 else None


def _protocol(value: Any) -> Protocol | None:
    proto = "TCP" if value is None else value
    return cast("Protocol", proto) if proto in PROTOCOLS else None


# --- Services -----------------------------------------------------------------------------


def service_is_proxied(obj: Obj) -> bool:
    """False for Services kube-proxy never programs: headless, ExternalName, or labelled
    ``service.kubernetes.io/service-proxy-name``."""
    spec = obj.get("spec") or {}
    if SERVICE_PROXY_NAME_LABEL in _labels(obj):
        return False
    if spec.get("type") == "ExternalName":
        return False
    cluster_ip = spec.get("clusterIP")
    return cluster_ip not in (None, "", "None")


def parse_service(obj: Obj, family: IPFamily, report: ProblemSink) -> tuple[ServicePort, ...]:
    """The service ports of a v1 Service in ``family`` (empty if it yields no rules there)."""
    namespace, name = _meta(obj)

    def problem(field_path: str, message: str) -> None:
        report(ObjectProblem("Service", namespace, name, field_path, message))

    if not name:
        problem("metadata.name", "missing")
        return ()
    if not service_is_proxied(obj):
        return ()
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}

    cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    cluster_ip = None
    for i, text in enumerate(cluster_ips):
        parsed = canonical_ip(text)
        if parsed is None:
            problem(f"spec.clusterIPs[{i}]", f"invalid IP address {text!r}")
            return ()
        if parsed[1] == family and cluster_ip is None:
            cluster_ip = parsed[0]
    if cluster_ip is None:
        return ()

    external_ips = _ips_of_family(spec.get("externalIPs"), "spec.externalIPs", family, problem)
    lb_vips: list[str] = []
    for i, ingress in enumerate((status.get("loadBalancer") or {}).get("ingress") or []):
        if not ingress.get("ip"):
            continue
        if ingress.get("ipMode") == "Proxy":
            continue  # the load balancer proxies: traffic arrives for the node, not the VIP
        parsed = canonical_ip(ingress["ip"])
        if parsed is None:
            problem(f"status.loadBalancer.ingress[{i}].ip", f"invalid IP {ingress['ip']!r}")
        elif parsed[1] == family and parsed[0] not in lb_vips:
            lb_vips.append(parsed[0])
    source_ranges: list[str] = []
    for i, text in enumerate(spec.get("loadBalancerSourceRanges") or []):
        parsed = canonical_cidr(text)
        if parsed is None:
            problem(f"spec.loadBalancerSourceRanges[{i}]", f"invalid CIDR {text!r}")
        elif parsed[1] == family and parsed[0] not in source_ranges:
            source_ranges.append(parsed[0])

    svc_type = spec.get("type") or "ClusterIP"
    affinity = spec.get("sessionAffinity") == "ClientIP"
    sticky = DEFAULT_STICKY_SECONDS
    if affinity:
        timeout = (((spec.get("sessionAffinityConfig") or {}).get("clientIP")) or {}).get(
            "timeoutSeconds"
        )
        if timeout is not None:
            if isinstance(timeout, int) and not isinstance(timeout, bool) and 0 < timeout <= 86400:
                sticky = timeout
            else:
                problem(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    f"{timeout!r} is not in 1..86400; using {DEFAULT_STICKY_SECONDS}",
                )
    external_local = (
        svc_type in ("NodePort", "LoadBalancer") and spec.get("externalTrafficPolicy") == "Local"
    )
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    health_check_node_port = 0
    if svc_type == "LoadBalancer" and external_local:
        hc = spec.get("healthCheckNodePort")
        if hc is not None:
            parsed_hc = _port_number(hc)
            if parsed_hc is None:
                problem("spec.healthCheckNodePort", f"{hc!r} is not a port number")
            else:
                health_check_node_port = parsed_hc

    ports: list[ServicePort] = []
    seen: set[ServicePortName] = set()
    for i, p in enumerate(spec.get("ports") or []):
        proto = _protocol(p.get("protocol"))
        if proto is None:
            problem(f"spec.ports[{i}].protocol", f"unknown protocol {p.get('protocol')!r}")
            continue
        port = _port_number(p.get("port"))
        if port is None:
            problem(f"spec.ports[{i}].port", f"{p.get('port')!r} is not in 1..65535")
            continue
        node_port = _port_number(p.get("nodePort") or 0, allow_zero=True)
        if node_port is None:
            problem(f"spec.ports[{i}].nodePort", f"{p.get('nodePort')!r} is not in 1..65535")
            continue
        spn = ServicePortName(namespace, name, str(p.get("name") or ""), proto)
        if spn in seen:
            problem(f"spec.ports[{i}].name", f"duplicate port {spn} {proto}")
            continue
        seen.add(spn)
        ports.append(
            ServicePort(
                name=spn,
                family=family,
                cluster_ip=cluster_ip,
                port=port,
                node_port=node_port if svc_type in ("NodePort", "LoadBalancer") else 0,
                external_ips=external_ips,
                load_balancer_vips=tuple(lb_vips),
                load_balancer_source_ranges=tuple(source_ranges),
                session_affinity_client_ip=affinity,
                sticky_max_age_seconds=sticky,
                external_policy_local=external_local,
                internal_policy_local=internal_local,
                health_check_node_port=health_check_node_port,
                traffic_distribution=str(spec.get("trafficDistribution") or ""),
            )
        )
    return tuple(ports)


def _ips_of_family(values: Any, field_path: str, family: IPFamily, problem: Any) -> tuple[str, ...]:
    out: list[str] = []
    for i, text in enumerate(values or []):
        parsed = canonical_ip(text)
        if parsed is None:
            problem(f"{field_path}[{i}]", f"invalid IP address {text!r}")
        elif parsed[1] == family and parsed[0] not in out:
            out.append(parsed[0])
    return tuple(out)


# --- EndpointSlices and Endpoints ------------------------------------------------------------


class SliceEndpoint(NamedTuple):
    """One endpoint address of an EndpointSlice with its conditions, before port resolution.

    A NamedTuple: a large cluster has ~10^5 of these, and tuple creation runs in C.
    """

    ip: str
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""
    zone_hints: frozenset[str] = NO_HINTS
    node_hints: frozenset[str] = NO_HINTS


@dataclass(frozen=True, slots=True)
class SlicePort:
    """A named port of an EndpointSlice: the service's targetPort, resolved."""

    name: str
    protocol: Protocol
    port: int


@dataclass(frozen=True, slots=True)
class ParsedSlice:
    """The parts of a discovery.k8s.io/v1 EndpointSlice (or legacy Endpoints) the model uses."""

    service: NamespacedName
    name: str
    family: IPFamily
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]
    trigger_time: str = ""


def parse_endpoint_slice(obj: Obj, report: ProblemSink) -> ParsedSlice | None:
    """Parse an EndpointSlice; None if it is ignored (headless, FQDN) or unusable."""
    namespace, name = _meta(obj)

    def problem(field_path: str, message: str) -> None:
        report(ObjectProblem("EndpointSlice", namespace, name, field_path, message))

    labels = _labels(obj)
    if HEADLESS_LABEL in labels:
        return None
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name:
        problem(f"metadata.labels[{SERVICE_NAME_LABEL}]", "missing: slice belongs to no Service")
        return None
    address_type = obj.get("addressType")
    if address_type == "FQDN":
        return None
    if address_type not in (IPV4, IPV6):
        problem("addressType", f"unknown address type {address_type!r}")
        return None
    family = cast("IPFamily", address_type)

    ports: list[SlicePort] = []
    for i, p in enumerate(obj.get("ports") or []):
        if p.get("port") is None:
            continue  # kube-proxy ignores ports without a number
        proto = _protocol(p.get("protocol"))
        if proto is None:
            problem(f"ports[{i}].protocol", f"unknown protocol {p.get('protocol')!r}")
            continue
        number = _port_number(p.get("port"))
        if number is None:
            problem(f"ports[{i}].port", f"{p.get('port')!r} is not in 1..65535")
            continue
        ports.append(SlicePort(str(p.get("name") or ""), proto, number))

    endpoints: list[SliceEndpoint] = []
    pton, ntop, af, new = socket.inet_pton, socket.inet_ntop, _AF[family], tuple.__new__
    for i, ep in enumerate(obj.get("endpoints") or []):
        addresses = ep.get("addresses") or []
        if not addresses:
            continue
        text = addresses[0]  # kube-proxy uses the first address only
        try:  # fast path: a canonical address of the slice's family (nearly always)
            ip = ntop(af, pton(af, text))
        except (OSError, TypeError):
            parsed = canonical_ip(text)
            if parsed is None:
                problem(f"endpoints[{i}].addresses[0]", f"invalid IP address {text!r}")
                continue
            if parsed[1] != family:
                problem(f"endpoints[{i}].addresses[0]", f"{text!r} is not {family}")
                continue
            ip = parsed[0]
        cond = ep.get("conditions") or _NO_CONDITIONS
        hints = ep.get("hints")
        zone_hints = node_hints = NO_HINTS
        if hints:
            zone_hints = frozenset(
                str(h.get("name")) for h in hints.get("forZones") or [] if h.get("name")
            )
            node_hints = frozenset(
                str(h.get("name")) for h in hints.get("forNodes") or [] if h.get("name")
            )
        # tuple.__new__ rather than SliceEndpoint(...): no Python frame per endpoint.
        # Conditions: ready and serving default to true (nil), as in kube-proxy.
        endpoints.append(
            new(
                SliceEndpoint,
                (
                    ip,
                    cond.get("ready") is not False,
                    cond.get("serving") is not False,
                    cond.get("terminating") is True,
                    str(ep.get("nodeName") or ""),
                    str(ep.get("zone") or ""),
                    zone_hints,
                    node_hints,
                ),
            )
        )
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return ParsedSlice(
        service=NamespacedName(namespace, service_name),
        name=name,
        family=family,
        ports=tuple(ports),
        endpoints=tuple(endpoints),
        trigger_time=str(annotations.get(TRIGGER_TIME_ANNOTATION) or ""),
    )


def parse_legacy_endpoints(obj: Obj, report: ProblemSink) -> tuple[ParsedSlice, ...]:
    """Turn a v1 Endpoints object into one pseudo-slice per (subset, family).

    Used only for Services that have no EndpointSlice. ``addresses`` are ready;
    ``notReadyAddresses`` are neither ready nor serving.
    """
    namespace, name = _meta(obj)

    def problem(field_path: str, message: str) -> None:
        report(ObjectProblem("Endpoints", namespace, name, field_path, message))

    if not name:
        problem("metadata.name", "missing")
        return ()
    out: list[ParsedSlice] = []
    for s, subset in enumerate(obj.get("subsets") or []):
        ports: list[SlicePort] = []
        for i, p in enumerate(subset.get("ports") or []):
            proto = _protocol(p.get("protocol"))
            number = _port_number(p.get("port"))
            if proto is None or number is None:
                problem(f"subsets[{s}].ports[{i}]", f"invalid port {p!r}")
                continue
            ports.append(SlicePort(str(p.get("name") or ""), proto, number))
        by_family: dict[IPFamily, list[SliceEndpoint]] = {IPV4: [], IPV6: []}
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for i, addr in enumerate(subset.get(key) or []):
                parsed = canonical_ip(addr.get("ip"))
                if parsed is None:
                    problem(f"subsets[{s}].{key}[{i}].ip", f"invalid IP {addr.get('ip')!r}")
                    continue
                by_family[parsed[1]].append(
                    SliceEndpoint(
                        ip=parsed[0],
                        ready=ready,
                        serving=ready,
                        terminating=False,
                        node_name=str(addr.get("nodeName") or ""),
                    )
                )
        for fam, eps in by_family.items():
            if eps:
                out.append(
                    ParsedSlice(
                        NamespacedName(namespace, name),
                        f"{name}~endpoints-{s}",
                        fam,
                        tuple(ports),
                        tuple(eps),
                    )
                )
    return tuple(out)


# --- Node ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the proxy reads from this node's v1 Node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()

    @property
    def zone(self) -> str:
        """The node's ``topology.kubernetes.io/zone`` label, or ""."""
        return self.labels.get(ZONE_LABEL, "")

    def addresses_of(self, family: IPFamily) -> tuple[str, ...]:
        """The node's addresses in ``family``, InternalIP first."""
        return tuple(a for a in self.addresses if (":" in a) == (family == IPV6))


def parse_node(obj: Obj, report: ProblemSink) -> NodeInfo | None:
    """Parse a v1 Node."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not name:
        report(ObjectProblem("Node", "", "", "metadata.name", "missing"))
        return None
    status = obj.get("status") or {}
    spec = obj.get("spec") or {}
    ordered: list[str] = []
    for kind in ("InternalIP", "ExternalIP"):
        for i, addr in enumerate(status.get("addresses") or []):
            if addr.get("type") != kind:
                continue
            parsed = canonical_ip(addr.get("address"))
            if parsed is None:
                report(
                    ObjectProblem(
                        "Node", "", name, f"status.addresses[{i}].address", "invalid IP address"
                    )
                )
            elif parsed[0] not in ordered:
                ordered.append(parsed[0])
    pod_cidrs: list[str] = []
    for i, text in enumerate(
        spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    ):
        parsed_cidr = canonical_cidr(text)
        if parsed_cidr is None:
            report(ObjectProblem("Node", "", name, f"spec.podCIDRs[{i}]", "invalid CIDR"))
        else:
            pod_cidrs.append(parsed_cidr[0])
    return NodeInfo(
        name=name,
        labels=dict(meta.get("labels") or {}),
        addresses=tuple(ordered),
        pod_cidrs=tuple(pod_cidrs),
    )
