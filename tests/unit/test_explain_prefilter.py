"""explain's prefilter: explaining with only the Services a packet can meet gives exactly the
answer (verdict, endpoints, masquerading, reasons, path) of explaining with every Service,
in every mode, over random clusters built to collide (shared frontends and node ports,
endpoints that are other Services' frontends or the node) and random packets."""

from __future__ import annotations

import dataclasses
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minikproxy.changes import ClusterTracker
from minikproxy.config import ProxyConfig
from minikproxy.explain import driver
from minikproxy.explain.diff import diff_objects
from minikproxy.explain.driver import MODES, explain_objects, with_mode
from minikproxy.explain.engine import ExplainError
from minikproxy.explain.packet import make_packet
from minikproxy.explain.prefilter import select
from minikproxy.sources.manifests import SourcedObject

NODE = "node-1"
POOLS = {
    "IPv4": {
        "node": "10.10.1.1",
        "cluster": ["10.96.0.1", "10.96.0.2", "10.96.0.3"],
        "external": ["203.0.113.1", "203.0.113.2", "10.10.1.1"],
        # pods, a ClusterIP, the node itself (host network), an external IP
        "endpoints": ["10.10.2.2", "10.10.2.3", "10.96.0.2", "10.10.1.1", "203.0.113.1"],
        "sources": ["10.10.2.9", "10.10.1.1", "192.0.2.7", "203.0.113.9", "127.0.0.1"],
        "other": ["10.96.0.9", "127.0.0.1", "198.51.100.1"],
        "range": ["192.0.2.0/24", "10.10.2.0/24"],
        "cidr": "10.10.2.0/24",
        "far": "10.96.1.",
    },
    "IPv6": {
        "node": "fd00:10:1::1",
        "cluster": ["fd00:96::1", "fd00:96::2", "fd00:96::3"],
        "external": ["2001:db8:1::1", "2001:db8:1::2", "fd00:10:1::1"],
        "endpoints": ["fd00:10:2::2", "fd00:10:2::3", "fd00:96::2", "fd00:10:1::1"],
        "sources": ["fd00:10:2::9", "fd00:10:1::1", "2001:db8:7::7", "::1"],
        "other": ["fd00:96::9", "::1", "2001:db8:9::9"],
        "range": ["2001:db8:7::/64", "fd00:10:2::/64"],
        "cidr": "fd00:10:2::/64",
        "far": "fd00:96:1::",
    },
}
PORTS = [80, 81, 8080, 30080]
NODE_PORTS = [30080, 30081, 8080]


@st.composite
def clusters(draw: Any, family: str) -> list[Any]:
    """A Node and a few colliding Services with their EndpointSlices (some Services twice,
    as in two files; some slices of Services that do not exist)."""
    pool = POOLS[family]
    objs: list[Any] = [
        {
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "a"}},
            "status": {"addresses": [{"type": "InternalIP", "address": pool["node"]}]},
        }
    ]
    names = [f"s{i}" for i in range(draw(st.integers(1, 6)))]
    for name in names + draw(st.lists(st.sampled_from(names), max_size=2)):
        kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        ports = []
        for n, pname in enumerate(
            draw(st.lists(st.sampled_from(["p", "q"]), min_size=1, max_size=2, unique=True))
        ):
            port: dict[str, Any] = {
                "name": pname,
                "port": draw(st.sampled_from(PORTS)),
                "protocol": draw(st.sampled_from(["TCP", "TCP", "UDP"])),
                "targetPort": 8080,
            }
            if kind != "ClusterIP":
                port["nodePort"] = draw(st.sampled_from(NODE_PORTS)) + n
            ports.append(port)
        cip = draw(st.sampled_from(pool["cluster"]))
        spec: dict[str, Any] = {"type": kind, "clusterIP": cip, "clusterIPs": [cip], "ports": ports}
        spec["externalIPs"] = draw(st.lists(st.sampled_from(pool["external"]), max_size=2))
        if kind != "ClusterIP" and draw(st.booleans()):
            spec["externalTrafficPolicy"] = "Local"
            if kind == "LoadBalancer":
                spec["healthCheckNodePort"] = draw(st.sampled_from(NODE_PORTS))
        if draw(st.booleans()):
            spec["internalTrafficPolicy"] = draw(st.sampled_from(["Local", "Cluster"]))
        if draw(st.booleans()):
            spec["sessionAffinity"] = "ClientIP"
        status: dict[str, Any] = {}
        if kind == "LoadBalancer":
            vip = draw(st.sampled_from(pool["external"]))
            status = {"loadBalancer": {"ingress": [{"ip": vip}]}}
            spec["loadBalancerSourceRanges"] = draw(
                st.lists(st.sampled_from(pool["range"]), max_size=1)
            )
        objs.append(
            {
                "kind": "Service",
                "metadata": {"name": name, "namespace": "t"},
                "spec": spec,
                "status": status,
            }
        )
    # Services no packet here is addressed to, with endpoints: they count towards iptables'
    # large-cluster threshold only.
    for n in range(draw(st.integers(0, 2))):
        far = pool["far"] + str(n + 1)
        objs.append(
            {
                "kind": "Service",
                "metadata": {"name": f"far-{n}", "namespace": "t"},
                "spec": {"clusterIP": far, "ports": [{"name": "p", "port": 80}]},
            }
        )
        names.append(f"far-{n}")
    # Mostly one slice per Service; some Services two, some none, some slices of no Service.
    owners = names + draw(st.lists(st.sampled_from([*names, "ghost"]), max_size=3))
    for n, owner in enumerate(owners):
        if not draw(st.integers(0, 4)):
            continue
        endpoints = []
        for ip in draw(st.lists(st.sampled_from(pool["endpoints"]), max_size=4, unique=True)):
            endpoints.append(
                {
                    "addresses": [ip],
                    "conditions": {
                        "ready": draw(st.sampled_from([True, True, True, False])),
                        "serving": draw(st.sampled_from([True, True, False])),
                        "terminating": draw(st.sampled_from([False, False, True])),
                    },
                    "nodeName": draw(st.sampled_from([NODE, "node-2"])),
                }
            )
        objs.append(
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"slice-{n}",
                    "namespace": "t",
                    "labels": {"kubernetes.io/service-name": owner},
                },
                "addressType": family,
                "endpoints": endpoints,
                "ports": [
                    {"name": pname, "port": draw(st.sampled_from([8080, 80, 30080])),
                     "protocol": proto}
                    for pname in ("p", "q")
                    for proto in ("TCP", "UDP")
                ],
            }
        )  # fmt: skip
    return objs


def _frontends(objs: list[Any], node_ip: str) -> list[tuple[str, int, str]]:
    """Every (address, port, proto) the Services in ``objs`` answer on."""
    out = []
    for obj in objs:
        if obj["kind"] != "Service":
            continue
        spec = obj["spec"]
        ingress = (obj.get("status") or {}).get("loadBalancer", {}).get("ingress", [])
        ips = [spec["clusterIP"], *spec.get("externalIPs", ()), *(i["ip"] for i in ingress)]
        for port in spec["ports"]:
            proto = port.get("protocol", "TCP").lower()
            out += [(ip, port["port"], proto) for ip in ips]
            if port.get("nodePort"):
                out.append((node_ip, port["nodePort"], proto))
    return out


@st.composite
def packets(draw: Any, family: str, objs: list[Any]) -> tuple[str, str, int, str, str]:
    """(src, dst, dport, proto, origin): mostly to a frontend of ``objs``, else anywhere near."""
    pool = POOLS[family]
    frontends = _frontends(objs, pool["node"])
    if frontends and draw(st.integers(0, 3)):
        dst, dport, proto = draw(st.sampled_from(frontends))
    else:
        dst = draw(
            st.sampled_from(
                [*pool["cluster"], *pool["external"], pool["node"], *pool["endpoints"],
                 *pool["other"]]
            )
        )  # fmt: skip
        dport = draw(st.sampled_from([*PORTS, *NODE_PORTS, 30081, 30082, 9]))
        proto = draw(st.sampled_from(["tcp", "udp"]))
    origin = draw(st.sampled_from(["pod", "node", "external", "localhost"]))
    src = draw(st.sampled_from(pool["sources"]))
    if origin == "localhost":
        src = dst = "127.0.0.1" if family == "IPv4" else "::1"
    return src, dst, dport, proto, origin


CONFIGS: list[dict[str, Any]] = [
    {},
    {"masquerade_all": True},
    {"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "veth"},
]


def _endpoint_totals(objs: list[Any], packet: Any) -> tuple[int, int]:
    """The endpoints of the objects the prefilter keeps for ``packet``, and of all."""
    sourced = [SourcedObject(o, "t") for o in objs]
    (selection,) = select([sourced], {packet.dst}, {packet.dport})
    totals = []
    for chosen in (selection.kept, sourced):
        tracker = ClusterTracker(NODE)
        tracker.add_objects(o.obj for o in chosen)
        totals.append(tracker.snapshot(packet.family).state.total_endpoints)
    return totals[0], totals[1]


def _answer(objs: list[Any], cfg: ProxyConfig, packet: Any, prefilter: bool) -> Any:
    sourced = [SourcedObject(o, "t") for o in objs]
    try:
        exp, _ = explain_objects(sourced, cfg, packet, prefilter=prefilter)
    except ExplainError as err:
        return f"error: {err}"
    return exp.as_json()


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
@pytest.mark.parametrize("mode", MODES)  # IPVS: not prefiltered (see explain_objects)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_prefiltered_explanation_equals_the_full_one(mode: str, family: str, data: Any) -> None:
    objs = data.draw(clusters(family))
    src, dst, dport, proto, origin = data.draw(packets(family, objs))
    config = data.draw(st.sampled_from(CONFIGS))
    cidr = POOLS[family]["cidr"]
    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr=cidr, **config), mode)
    packet = make_packet(src, dst, dport, proto, origin, "")  # type: ignore[arg-type]
    # Large-cluster thresholds (iptables drops its per-endpoint comments above it) that the
    # whole input passes and the packet's Services alone do not, when they differ.
    kept, total = _endpoint_totals(objs, packet)
    threshold = data.draw(st.sampled_from([0, kept, max(total - 1, 0), 1000]))
    real = driver.iptables_options

    def options(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(real(*args, **kwargs), large_cluster_threshold=threshold)

    with mock.patch.object(driver, "iptables_options", options):
        full = _answer(objs, cfg, packet, prefilter=False)
        focused = _answer(objs, cfg, packet, prefilter=True)
    if focused != full:  # only what differs, for a readable failure
        if isinstance(full, dict) and isinstance(focused, dict):
            diff = {k: (full[k], focused.get(k)) for k in full if full[k] != focused.get(k)}
            pytest.fail(f"prefilter changed the answer (full, prefiltered): {diff}")
        pytest.fail(f"prefilter changed the answer: {full!r} != {focused!r}")


def test_prefilter_keeps_only_what_the_packet_can_meet() -> None:
    """The Services with the destination as a frontend or the port as a node port, their
    slices, the Services whose frontend is one of those endpoints, and every Node."""

    def svc(name: str, cip: str, node_port: int = 0, **spec: Any) -> Any:
        port: dict[str, Any] = {"name": "p", "port": 80}
        if node_port:
            port["nodePort"] = node_port
        return {
            "kind": "Service",
            "metadata": {"name": name, "namespace": "t"},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": cip,
                     "ports": [port], **spec},
        }  # fmt: skip

    def eps(name: str, owner: str, ip: str) -> Any:
        return {
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "t",
                         "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"name": "p", "port": 8080}],
        }  # fmt: skip

    node = {"kind": "Node", "metadata": {"name": NODE}}
    objs = [
        node,
        svc("a", "10.96.0.1"),
        eps("a-1", "a", "10.96.0.7"),  # an endpoint that is b's ClusterIP
        svc("b", "10.96.0.7"),
        svc("c", "10.96.0.3", node_port=30080),
        svc("d", "10.96.0.4", externalIPs=["203.0.113.1"]),
        eps("d-1", "d", "10.10.2.2"),
        svc("e", "10.96.0.5"),
        eps("e-1", "e", "10.10.2.3"),
        {**svc("e", "10.96.0.1"), "status": {}},  # a second copy of e, on a's ClusterIP
    ]
    sourced = [SourcedObject(o, "t") for o in objs]
    (sel,) = select([sourced], {"10.96.0.1"}, {30080})
    kept = [(o.obj["kind"], o.obj["metadata"]["name"]) for o in sel.kept]
    assert kept == [
        ("Node", NODE), ("Service", "a"), ("EndpointSlice", "a-1"), ("Service", "b"),
        ("Service", "c"), ("Service", "e"), ("EndpointSlice", "e-1"), ("Service", "e"),
    ]  # fmt: skip
    assert [[o.obj["metadata"]["name"] for o in g] for g in sel.rest_slices] == [["d-1"]]
    assert sel.endpoints_above(NODE, "IPv4", 2, 2) is True
    assert sel.endpoints_above(NODE, "IPv4", 2, 3) is False
    assert sel.endpoints_above(NODE, "IPv4", 4, 3) is True


@pytest.mark.parametrize("mode", MODES)  # IPVS: no filter rule there rejects
def test_an_endpoint_that_is_another_services_frontend(mode: str) -> None:
    """After DNAT to an endpoint that is the ClusterIP of a Service without endpoints, that
    Service's rules reject in the filter hooks: the prefilter keeps it, though the packet was
    not addressed to it."""

    def svc(name: str, cip: str, port: int) -> Any:
        spec = {"clusterIP": cip, "ports": [{"name": "p", "port": port}]}
        return {"kind": "Service", "metadata": {"name": name, "namespace": "t"}, "spec": spec}

    objs = [
        {"kind": "Node", "metadata": {"name": NODE}},
        svc("a", "10.96.0.1", 80),
        {
            "kind": "EndpointSlice",
            "metadata": {
                "name": "a-1",
                "namespace": "t",
                "labels": {"kubernetes.io/service-name": "a"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.96.0.2"]}, {"addresses": ["10.10.2.2"]}],
            "ports": [{"name": "p", "port": 8080}],
        },
        svc("b", "10.96.0.2", 8080),
    ]
    sourced = [SourcedObject(o, "t") for o in objs]
    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr="10.10.2.0/24"), mode)
    packet = make_packet("10.10.2.9", "10.96.0.1", 80, "tcp", "pod", "")
    full, _ = explain_objects(sourced, cfg, packet, prefilter=False)
    without_b, _ = explain_objects(sourced[:3], cfg, packet, prefilter=False)
    assert full.as_json() != without_b.as_json()
    focused, _ = explain_objects(sourced, cfg, packet, prefilter=True)
    assert focused.as_json() == full.as_json()


@st.composite
def changed(draw: Any, family: str, old: list[Any]) -> list[Any]:
    """``old`` with some objects kept, some replaced by others of their kind (another Service
    on the same name, other endpoints), some dropped, and some added."""
    other = draw(clusters(family))
    by_kind: dict[str, list[Any]] = {}
    for obj in other[1:]:
        by_kind.setdefault(obj["kind"], []).append(obj)
    new = [old[0]]  # the Node
    for obj in old[1:]:
        action = draw(st.sampled_from(["keep", "keep", "keep", "replace", "drop"]))
        if action == "replace" and by_kind.get(obj["kind"]):
            swap = dict(draw(st.sampled_from(by_kind[obj["kind"]])))
            new.append({**swap, "metadata": obj["metadata"]})
        elif action != "drop":
            new.append(obj)
    return new + draw(st.lists(st.sampled_from(other[1:]), max_size=2))


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
@pytest.mark.parametrize("mode", MODES)  # IPVS: diff does not prefilter (see diff_objects)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_prefiltered_diff_equals_the_full_one(mode: str, family: str, data: Any) -> None:
    old = data.draw(clusters(family))
    new = data.draw(changed(family, old))
    config = data.draw(st.sampled_from(CONFIGS))
    cidr = POOLS[family]["cidr"]
    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr=cidr, **config), mode)
    threshold = data.draw(st.sampled_from([0, 3, 10, 1000]))
    real = driver.iptables_options

    def options(*args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(real(*args, **kwargs), large_cluster_threshold=threshold)

    answers: list[Any] = []
    for prefilter in (False, True):
        with mock.patch.object(driver, "iptables_options", options):
            try:
                changes, _ = diff_objects(
                    [SourcedObject(o, "old") for o in old],
                    [SourcedObject(o, "new") for o in new],
                    cfg,
                    [family],  # type: ignore[list-item]
                    prefilter=prefilter,
                )
            except ExplainError as err:  # the same rule not understood on both
                answers.append(f"error: {err}")
                continue
        answers.append([c.as_json() for c in changes])
    assert answers[1] == answers[0]


def _svc(name: str, cip: str, **spec: Any) -> Any:
    port = {"name": "p", "port": spec.pop("port", 80), **spec.pop("port_extra", {})}
    body = {"clusterIP": cip, "ports": [port], **spec}
    return {"kind": "Service", "metadata": {"name": name, "namespace": "t"}, "spec": body}


def _slice(owner: str, *ips: str) -> Any:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{owner}-1",
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": owner},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip]} for ip in ips],
        "ports": [{"name": "p", "port": 8080}],
    }


SHADOWS = {
    # An unchanged NodePort Service on the same node port, whose rule comes first.
    "node port": _svc("a", "10.96.0.1", type="NodePort", port_extra={"nodePort": 30080}),
    # An unchanged Service whose external IP is the node's, on the changed node port.
    "node address": _svc("a", "10.96.0.1", externalIPs=["10.10.1.1"], port=30080),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shadow", sorted(SHADOWS))
def test_diff_keeps_the_services_a_probe_can_meet(mode: str, shadow: str) -> None:
    """The NodePort probes of a changed Service meet an unchanged Service that answers on
    the same node port, or on the node's address: the prefilter keeps it."""
    node = {
        "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.10.1.1"}]},
    }
    b = _svc("b", "10.96.0.2", type="NodePort", port_extra={"nodePort": 30080})
    common = [node, SHADOWS[shadow], _slice("a", "10.10.2.2"), b]
    old = [*common, _slice("b", "10.10.2.3")]
    new = [*common, _slice("b", "10.10.2.4")]
    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr="10.10.2.0/24"), mode)
    answers = []
    for prefilter in (False, True):
        changes, _ = diff_objects(
            [SourcedObject(o, "old") for o in old],
            [SourcedObject(o, "new") for o in new],
            cfg,
            ["IPv4"],
            prefilter=prefilter,
        )
        answers.append([c.as_json() for c in changes])
    assert answers[0]  # the ClusterIP of b changes at least
    assert answers[1] == answers[0]
