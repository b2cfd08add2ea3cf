"""Parsing of v1 Services and discovery.k8s.io/v1 EndpointSlices into the node-local model.

The expected values follow kube-proxy's ``newBaseServiceInfo`` (pkg/proxy/serviceport.go) and
``newEndpointSliceInfo``/``addEndpoints`` (pkg/proxy/endpointslicecache.go).
"""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import (
    HEADLESS_LABEL,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    ParsedSlice,
    parse_endpoint_slice,
    parse_service,
)
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.serviceport import DEFAULT_STICKY_SECONDS, ServicePort

Obj = dict[str, Any]


def service(
    *,
    name: str = "web",
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    status: Obj | None = None,
    **spec: Any,
) -> Obj:
    """A v1 Service; ``spec`` defaults to one named TCP port on cluster IP 10.96.0.5."""
    spec.setdefault("clusterIP", "10.96.0.5")
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP"}])
    meta: Obj = {"name": name, "namespace": namespace}
    if labels is not None:
        meta["labels"] = labels
    obj: Obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def parse(obj: Obj, family: IPFamily = IPV4) -> tuple[tuple[ServicePort, ...], list[ObjectProblem]]:
    """Parse ``obj`` in ``family``, collecting the problems."""
    problems: list[ObjectProblem] = []
    return parse_service(obj, family, problems.append), problems


def only_port(obj: Obj, family: IPFamily = IPV4) -> ServicePort:
    """The single service port of ``obj``, asserting no problems were reported."""
    ports, problems = parse(obj, family)
    assert problems == []
    assert len(ports) == 1, ports
    return ports[0]


def lb_status(*ingress: Obj) -> Obj:
    return {"loadBalancer": {"ingress": list(ingress)}}


# --- Service: keys and protocols ----------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "key", "protocol"),
    [
        pytest.param({"name": "http", "port": 80, "protocol": "TCP"}, "shop/web:http", "TCP",
                     id="named-port"),
        pytest.param({"port": 80, "protocol": "TCP"}, "shop/web", "TCP", id="unnamed-port"),
        pytest.param({"name": "", "port": 80}, "shop/web", "TCP", id="empty-name-default-tcp"),
        pytest.param({"name": "dns", "port": 53}, "shop/web:dns", "TCP", id="protocol-default-tcp"),
        pytest.param({"name": "dns", "port": 53, "protocol": "UDP"}, "shop/web:dns", "UDP",
                     id="udp"),
        pytest.param({"name": "sig", "port": 3868, "protocol": "SCTP"}, "shop/web:sig", "SCTP",
                     id="sctp"),
    ],
)  # fmt: skip
def test_service_port_key_and_protocol(port: Obj, key: str, protocol: str) -> None:
    sp = only_port(service(ports=[port]))
    assert str(sp.name) == key
    assert sp.protocol == protocol
    assert sp.name.service == NamespacedName("shop", "web")
    assert sp.port == port["port"]


def test_namespace_defaults_to_default() -> None:
    obj = service()
    del obj["metadata"]["namespace"]
    assert str(only_port(obj).name) == "default/web:http"


def test_several_ports_keep_spec_order() -> None:
    obj = service(
        ports=[
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "metrics", "port": 9153},
        ]
    )
    ports, problems = parse(obj)
    assert problems == []
    assert [p.name for p in ports] == [
        ServicePortName("shop", "web", "dns", "UDP"),
        ServicePortName("shop", "web", "dns-tcp", "TCP"),
        ServicePortName("shop", "web", "metrics", "TCP"),
    ]


# --- Service: addresses per family ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "family", "cluster_ip"),
    [
        pytest.param({"clusterIP": "10.96.0.5"}, IPV4, "10.96.0.5", id="v4-only-in-v4"),
        pytest.param({"clusterIP": "10.96.0.5"}, IPV6, None, id="v4-only-in-v6"),
        pytest.param({"clusterIP": "fd00::5", "clusterIPs": ["fd00::5"]}, IPV6, "fd00::5",
                     id="v6-only-in-v6"),
        pytest.param({"clusterIP": "fd00::5", "clusterIPs": ["fd00::5"]}, IPV4, None,
                     id="v6-only-in-v4"),
        pytest.param({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"]}, IPV4,
                     "10.96.0.5", id="dual-stack-v4"),
        pytest.param({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"]}, IPV6,
                     "fd00::5", id="dual-stack-v6"),
        pytest.param({"clusterIP": "fd00::5", "clusterIPs": ["fd00::5", "10.96.0.5"]}, IPV4,
                     "10.96.0.5", id="dual-stack-v6-primary"),
        pytest.param({"clusterIP": "fd00:0:0::5", "clusterIPs": ["FD00:0:0::5"]}, IPV6, "fd00::5",
                     id="v6-canonicalised"),
    ],
)  # fmt: skip
def test_cluster_ip_per_family(spec: Obj, family: IPFamily, cluster_ip: str | None) -> None:
    ports, problems = parse(service(**spec), family)
    assert problems == []
    if cluster_ip is None:
        assert ports == ()
    else:
        assert [(p.cluster_ip, p.family) for p in ports] == [(cluster_ip, family)]


@pytest.mark.parametrize(
    ("external_ips", "family", "expected"),
    [
        pytest.param(["203.0.113.1", "2001:db8::1", "203.0.113.2"], IPV4,
                     ("203.0.113.1", "203.0.113.2"), id="v4"),
        pytest.param(["203.0.113.1", "2001:db8:0::1"], IPV6, ("2001:db8::1",), id="v6"),
        pytest.param(["203.0.113.1", "203.0.113.1"], IPV4, ("203.0.113.1",), id="deduplicated"),
        pytest.param([], IPV4, (), id="none"),
    ],
)  # fmt: skip
def test_external_ips_filtered_per_family(
    external_ips: list[str], family: IPFamily, expected: tuple[str, ...]
) -> None:
    spec: Obj = {"clusterIPs": ["10.96.0.5", "fd00::5"], "externalIPs": external_ips}
    assert only_port(service(**spec), family).external_ips == expected


@pytest.mark.parametrize(
    ("ingress", "family", "expected"),
    [
        pytest.param([{"ip": "203.0.113.20"}], IPV4, ("203.0.113.20",), id="vip"),
        pytest.param([{"ip": "203.0.113.20", "ipMode": "VIP"}], IPV4, ("203.0.113.20",),
                     id="explicit-vip-mode"),
        pytest.param([{"ip": "203.0.113.20"}, {"ip": "203.0.113.21", "ipMode": "Proxy"}], IPV4,
                     ("203.0.113.20",), id="proxy-mode-skipped"),
        pytest.param([{"hostname": "lb.example.com"}], IPV4, (), id="hostname-only-skipped"),
        pytest.param([{"ip": "203.0.113.20"}, {"ip": "2001:db8::20"}], IPV6, ("2001:db8::20",),
                     id="per-family"),
    ],
)  # fmt: skip
def test_load_balancer_ingress(
    ingress: list[Obj], family: IPFamily, expected: tuple[str, ...]
) -> None:
    obj = service(
        type="LoadBalancer",
        clusterIPs=["10.96.0.5", "fd00::5"],
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
        status=lb_status(*ingress),
    )
    assert only_port(obj, family).load_balancer_vips == expected


@pytest.mark.parametrize(
    ("ranges", "family", "expected"),
    [
        pytest.param(["198.51.100.0/24 ", " 192.168.10.0/24"], IPV4,
                     ("198.51.100.0/24", "192.168.10.0/24"), id="whitespace-trimmed"),
        pytest.param(["10.1.2.3/24"], IPV4, ("10.1.2.0/24",), id="host-bits-canonicalised"),
        pytest.param(["10.0.0.0/8", "2001:db8::/32"], IPV6, ("2001:db8::/32",), id="per-family"),
        pytest.param(["2001:DB8:0::/32"], IPV6, ("2001:db8::/32",), id="v6-canonicalised"),
        pytest.param(["10.0.0.0/8", "10.0.0.1/8"], IPV4, ("10.0.0.0/8",), id="deduplicated"),
    ],
)  # fmt: skip
def test_load_balancer_source_ranges(
    ranges: list[str], family: IPFamily, expected: tuple[str, ...]
) -> None:
    obj = service(
        type="LoadBalancer",
        clusterIPs=["10.96.0.5", "fd00::5"],
        loadBalancerSourceRanges=ranges,
        ports=[{"name": "http", "port": 80, "nodePort": 30080}],
    )
    assert only_port(obj, family).load_balancer_source_ranges == expected


# --- Service: affinity, traffic policies, node ports ---------------------------------------


@pytest.mark.parametrize(
    ("spec", "affinity", "timeout"),
    [
        pytest.param({}, False, DEFAULT_STICKY_SECONDS, id="none"),
        pytest.param({"sessionAffinity": "None"}, False, DEFAULT_STICKY_SECONDS,
                     id="explicit-none"),
        pytest.param({"sessionAffinity": "ClientIP"}, True, 10800, id="client-ip-default-timeout"),
        pytest.param({"sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}, True, 600,
                     id="client-ip-custom-timeout"),
        pytest.param({"sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {}}}, True, 10800,
                     id="client-ip-empty-config"),
    ],
)  # fmt: skip
def test_session_affinity(spec: Obj, affinity: bool, timeout: int) -> None:
    sp = only_port(service(**spec))
    assert sp.session_affinity_client_ip is affinity
    assert sp.sticky_max_age_seconds == timeout


def test_session_affinity_bad_timeout_reports_and_uses_default() -> None:
    obj = service(
        sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}
    )
    ports, problems = parse(obj)
    assert [p.sticky_max_age_seconds for p in ports] == [DEFAULT_STICKY_SECONDS]
    assert [p.field for p in problems] == ["spec.sessionAffinityConfig.clientIP.timeoutSeconds"]


NODE_PORT = [{"name": "http", "port": 80, "nodePort": 30080}]


@pytest.mark.parametrize(
    ("spec", "etp_local", "itp_local", "node_port", "health_check"),
    [
        pytest.param({"type": "NodePort", "externalTrafficPolicy": "Local"}, True, False, 30080, 0,
                     id="nodeport-etp-local"),
        pytest.param({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                      "healthCheckNodePort": 32100}, True, False, 30080, 32100,
                     id="lb-etp-local-health-check"),
        pytest.param({"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                      "healthCheckNodePort": 32100}, False, False, 30080, 0,
                     id="lb-etp-cluster-no-health-check"),
        pytest.param({"type": "NodePort", "externalTrafficPolicy": "Local",
                      "healthCheckNodePort": 32100}, True, False, 30080, 0,
                     id="nodeport-no-health-check"),
        pytest.param({"type": "ClusterIP", "externalTrafficPolicy": "Local"}, False, False, 0, 0,
                     id="clusterip-etp-local-ignored"),
        pytest.param({"externalTrafficPolicy": "Local", "externalIPs": ["203.0.113.1"]}, False,
                     False, 0, 0, id="default-type-etp-local-ignored"),
        pytest.param({"type": "ClusterIP"}, False, False, 0, 0, id="clusterip-nodeport-ignored"),
        pytest.param({"internalTrafficPolicy": "Local"}, False, True, 0, 0, id="itp-local"),
        pytest.param({"internalTrafficPolicy": "Cluster"}, False, False, 0, 0, id="itp-cluster"),
        pytest.param({"type": "NodePort", "internalTrafficPolicy": "Local",
                      "externalTrafficPolicy": "Local"}, True, True, 30080, 0, id="both-local"),
    ],
)  # fmt: skip
def test_traffic_policies_and_node_ports(
    spec: Obj, etp_local: bool, itp_local: bool, node_port: int, health_check: int
) -> None:
    sp = only_port(service(ports=NODE_PORT, **spec))
    assert sp.external_policy_local is etp_local
    assert sp.internal_policy_local is itp_local
    assert sp.node_port == node_port
    assert sp.health_check_node_port == health_check


def test_traffic_distribution_is_kept() -> None:
    assert only_port(service(trafficDistribution="PreferClose")).traffic_distribution == (
        "PreferClose"
    )


# --- Services that produce no rules ---------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(service(clusterIP="None"), id="headless"),
        pytest.param(service(clusterIP="None", clusterIPs=["None"]), id="headless-cluster-ips"),
        pytest.param(service(clusterIP=""), id="no-cluster-ip"),
        pytest.param(
            service(type="ExternalName", clusterIP="", externalName="search.example.com"),
            id="external-name",
        ),
        pytest.param(
            service(type="ExternalName", externalName="search.example.com"),
            id="external-name-with-stale-ip",
        ),
        pytest.param(
            service(labels={SERVICE_PROXY_NAME_LABEL: "other-proxy"}), id="service-proxy-name"
        ),
        pytest.param(service(labels={SERVICE_PROXY_NAME_LABEL: ""}), id="service-proxy-name-empty"),
    ],
)
@pytest.mark.parametrize("family", [IPV4, IPV6])
def test_services_without_rules(obj: Obj, family: IPFamily) -> None:
    assert parse(obj, family) == ((), [])


def test_other_labels_do_not_hide_a_service() -> None:
    assert only_port(service(labels={"app": "web"})).cluster_ip == "10.96.0.5"


# --- Invalid Services: skipped and reported, never raising ---------------------------------


@pytest.mark.parametrize(
    ("spec", "kept_ports", "field"),
    [
        pytest.param({"clusterIP": "10.96.0.300"}, [], "spec.clusterIPs[0]", id="bad-cluster-ip"),
        pytest.param({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::zz"]}, [],
                     "spec.clusterIPs[1]", id="bad-secondary-cluster-ip"),
        pytest.param({"ports": [{"name": "a", "port": 0}, {"name": "b", "port": 81}]}, ["b"],
                     "spec.ports[0].port", id="port-0"),
        pytest.param({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 70000}]}, ["a"],
                     "spec.ports[1].port", id="port-70000"),
        pytest.param({"ports": [{"name": "a", "port": "80"}]}, [], "spec.ports[0].port",
                     id="port-string"),
        pytest.param({"ports": [{"name": "a", "port": 80, "protocol": "ICMP"},
                                {"name": "b", "port": 81}]}, ["b"], "spec.ports[0].protocol",
                     id="unknown-protocol"),
        pytest.param({"ports": [{"name": "a", "port": 80, "protocol": "tcp"}]}, [],
                     "spec.ports[0].protocol", id="lower-case-protocol"),
        pytest.param({"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 70000}]},
                     [], "spec.ports[0].nodePort", id="bad-node-port"),
        pytest.param({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, ["a"],
                     "spec.ports[1].name", id="duplicate-port"),
    ],
)  # fmt: skip
def test_invalid_service_fields_skip_and_report(
    spec: Obj, kept_ports: list[str], field: str
) -> None:
    ports, problems = parse(service(name="bad", namespace="ns1", **spec))
    assert [p.name.port for p in ports] == kept_ports
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.kind, problem.namespace, problem.name, problem.field) == (
        "Service",
        "ns1",
        "bad",
        field,
    )
    assert "ns1/bad" in str(problem)
    assert field in str(problem)


@pytest.mark.parametrize(
    ("spec", "status", "field", "attr", "kept"),
    [
        pytest.param({"externalIPs": ["203.0.113.1", "203.0.113.999"]}, None,
                     "spec.externalIPs[1]", "external_ips", ("203.0.113.1",), id="bad-external-ip"),
        pytest.param({"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/33",
                                                                           "10.0.0.0/8"]},
                     None, "spec.loadBalancerSourceRanges[0]", "load_balancer_source_ranges",
                     ("10.0.0.0/8",), id="bad-source-range"),
        pytest.param({"type": "LoadBalancer"},
                     lb_status({"ip": "not-an-ip"}, {"ip": "203.0.113.9"}),
                     "status.loadBalancer.ingress[0].ip", "load_balancer_vips", ("203.0.113.9",),
                     id="bad-ingress-ip"),
    ],
)  # fmt: skip
def test_invalid_addresses_skip_only_that_address(
    spec: Obj, status: Obj | None, field: str, attr: str, kept: tuple[str, ...]
) -> None:
    ports, problems = parse(service(name="bad", namespace="ns1", status=status, **spec))
    assert len(ports) == 1
    assert getattr(ports[0], attr) == kept
    assert [(p.namespace, p.name, p.field) for p in problems] == [("ns1", "bad", field)]


def test_missing_name_is_reported() -> None:
    obj = service()
    del obj["metadata"]["name"]
    ports, problems = parse(obj)
    assert ports == ()
    assert [p.field for p in problems] == ["metadata.name"]


# --- EndpointSlices -------------------------------------------------------------------------


def endpoint_slice(
    *endpoints: Obj,
    name: str = "web-abc",
    namespace: str = "shop",
    service_name: str | None = "web",
    address_type: str = "IPv4",
    ports: list[Obj] | None = None,
    extra_labels: dict[str, str] | None = None,
) -> Obj:
    labels: dict[str, str] = dict(extra_labels or {})
    if service_name is not None:
        labels[SERVICE_NAME_LABEL] = service_name
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
    }


def parse_slice(obj: Obj) -> tuple[ParsedSlice | None, list[ObjectProblem]]:
    problems: list[ObjectProblem] = []
    return parse_endpoint_slice(obj, problems.append), problems


@pytest.mark.parametrize(
    ("conditions", "ready", "serving", "terminating"),
    [
        pytest.param(None, True, True, False, id="no-conditions"),
        pytest.param({}, True, True, False, id="empty-conditions"),
        pytest.param({"ready": None}, True, True, False, id="ready-nil-is-true"),
        pytest.param({"ready": True}, True, True, False, id="ready"),
        pytest.param({"ready": False}, False, True, False, id="not-ready-serving-nil-is-true"),
        pytest.param({"ready": True, "serving": False}, True, False, False, id="serving-false"),
        pytest.param({"ready": False, "serving": True, "terminating": True}, False, True, True,
                     id="serving-terminating"),
        pytest.param({"ready": False, "serving": False, "terminating": True}, False, False, True,
                     id="terminating-not-serving"),
        pytest.param({"terminating": False}, True, True, False, id="terminating-false"),
    ],
)  # fmt: skip
def test_endpoint_conditions(
    conditions: Obj | None, ready: bool, serving: bool, terminating: bool
) -> None:
    ep: Obj = {"addresses": ["10.244.1.10"]}
    if conditions is not None:
        ep["conditions"] = conditions
    parsed, problems = parse_slice(endpoint_slice(ep))
    assert problems == []
    assert parsed is not None
    (se,) = parsed.endpoints
    assert (se.ready, se.serving, se.terminating) == (ready, serving, terminating)


def test_slice_fields() -> None:
    obj = endpoint_slice(
        {
            "addresses": ["10.244.1.10", "10.244.9.9"],
            "nodeName": "node-a",
            "zone": "zone-a",
            "hints": {"forZones": [{"name": "zone-a"}, {"name": "zone-b"}],
                      "forNodes": [{"name": "node-a"}]},
        },
        {"addresses": []},
        ports=[{"name": "http", "port": 8080}, {"port": 53, "protocol": "UDP"}, {"name": "x"}],
    )  # fmt: skip
    obj["metadata"]["annotations"] = {
        "endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05Z"
    }
    parsed, problems = parse_slice(obj)
    assert problems == []
    assert parsed is not None
    assert parsed.service == NamespacedName("shop", "web")
    assert parsed.name == "web-abc"
    assert parsed.family == IPV4
    assert parsed.trigger_time == "2026-01-02T03:04:05Z"
    assert [(p.name, p.protocol, p.port) for p in parsed.ports] == [
        ("http", "TCP", 8080),
        ("", "UDP", 53),
    ]
    (se,) = parsed.endpoints  # first address only; an endpoint without addresses is skipped
    assert se.ip == "10.244.1.10"
    assert (se.node_name, se.zone) == ("node-a", "zone-a")
    assert se.zone_hints == frozenset({"zone-a", "zone-b"})
    assert se.node_hints == frozenset({"node-a"})


def test_endpoint_without_hints_has_empty_hint_sets() -> None:
    parsed, _ = parse_slice(endpoint_slice({"addresses": ["10.244.1.10"], "hints": {}}))
    assert parsed is not None
    assert parsed.endpoints[0].zone_hints == frozenset()
    assert parsed.endpoints[0].node_hints == frozenset()
    assert (parsed.endpoints[0].node_name, parsed.endpoints[0].zone) == ("", "")


def test_ipv6_slice_addresses_are_canonical() -> None:
    parsed, problems = parse_slice(
        endpoint_slice({"addresses": ["FD00:10:244:1:0::70"]}, address_type="IPv6")
    )
    assert problems == []
    assert parsed is not None
    assert parsed.family == IPV6
    assert parsed.endpoints[0].ip == "fd00:10:244:1::70"


@pytest.mark.parametrize(
    ("address_type", "addresses", "message_part"),
    [
        pytest.param("IPv4", ["fd00::1"], "is not IPv4", id="v6-in-v4-slice"),
        pytest.param("IPv6", ["10.244.1.10"], "is not IPv6", id="v4-in-v6-slice"),
        pytest.param("IPv4", ["10.244.1.300"], "invalid IP", id="invalid-ip"),
        pytest.param("IPv4", ["010.244.1.1"], "invalid IP", id="leading-zero"),
        pytest.param("IPv6", ["fe80::1%eth0"], "invalid IP", id="zone-id"),
    ],
)
def test_bad_endpoint_addresses_are_skipped(
    address_type: str, addresses: list[str], message_part: str
) -> None:
    good = "10.244.1.1" if address_type == "IPv4" else "fd00::1"
    obj = endpoint_slice(
        {"addresses": addresses}, {"addresses": [good]}, name="s1", address_type=address_type
    )
    parsed, problems = parse_slice(obj)
    assert parsed is not None
    assert [se.ip for se in parsed.endpoints] == [good]
    assert [(p.kind, p.namespace, p.name, p.field) for p in problems] == [
        ("EndpointSlice", "shop", "s1", "endpoints[0].addresses[0]")
    ]
    assert message_part in problems[0].message


@pytest.mark.parametrize(
    ("obj", "problem_field"),
    [
        pytest.param(endpoint_slice(address_type="FQDN"), None, id="fqdn-ignored"),
        pytest.param(endpoint_slice(extra_labels={HEADLESS_LABEL: ""}), None,
                     id="headless-ignored"),
        pytest.param(endpoint_slice(service_name=None), f"metadata.labels[{SERVICE_NAME_LABEL}]",
                     id="missing-service-name"),
        pytest.param(endpoint_slice(service_name=""), f"metadata.labels[{SERVICE_NAME_LABEL}]",
                     id="empty-service-name"),
        pytest.param(endpoint_slice(address_type="IPv5"), "addressType",
                     id="unknown-address-type"),
    ],
)  # fmt: skip
def test_ignored_and_unusable_slices(obj: Obj, problem_field: str | None) -> None:
    parsed, problems = parse_slice(obj)
    assert parsed is None
    assert [p.field for p in problems] == ([] if problem_field is None else [problem_field])
    for problem in problems:
        assert (problem.kind, problem.namespace, problem.name) == (
            "EndpointSlice",
            "shop",
            "web-abc",
        )


@pytest.mark.parametrize(
    ("port", "field"),
    [
        pytest.param({"name": "http", "port": 0}, "ports[0].port", id="port-0"),
        pytest.param({"name": "http", "port": 70000}, "ports[0].port", id="port-70000"),
        pytest.param({"name": "http", "port": 80, "protocol": "ICMP"}, "ports[0].protocol",
                     id="unknown-protocol"),
    ],
)  # fmt: skip
def test_bad_slice_ports_are_skipped(port: Obj, field: str) -> None:
    parsed, problems = parse_slice(endpoint_slice({"addresses": ["10.0.0.1"]}, ports=[port]))
    assert parsed is not None
    assert parsed.ports == ()
    assert [p.field for p in problems] == [field]
