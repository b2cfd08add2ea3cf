"""Objects and probes for the real-traffic tests (iptables, flat nftables, kube-proxy nftables).

The node is ``node-1`` at 10.10.1.1 (fd00:10:1::1); backends 10.10.2.2-4 are "pods" serving
port 8080 (the ``topo`` fixture of conftest.py). Objects live in namespace ``t``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.netns import Probe, Proto, Topology

NODE = "node-1"
BACKENDS = ["10.10.2.2", "10.10.2.3", "10.10.2.4"]
NODE_IP = "10.10.1.1"
TARGET_PORT = 8080


def service(name: str, cluster_ip: str, port: int = 80, proto: str = "TCP", **spec: Any) -> Any:
    """A Service with one port named ``p`` (``port_extra`` adds fields to the port, ``status``
    is the status, ``clusterIPs`` defaults to ``[cluster_ip]``, other keywords go into spec)."""
    status = spec.pop("status", {})
    cluster_ips = spec.pop("clusterIPs", [cluster_ip])
    ports = [{"name": "p", "port": port, "protocol": proto, **spec.pop("port_extra", {})}]
    body = {"clusterIP": cluster_ip, "clusterIPs": cluster_ips, "ports": ports, **spec}
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "t"},
        "spec": body,
        "status": status,
    }


def slice_(
    name: str,
    ips: list[str],
    *,
    proto: str = "TCP",
    local: tuple[str, ...] = (),
    family: str = "IPv4",
    **conditions: bool,
) -> Any:
    """The ``family`` EndpointSlice of ``name``: ready endpoints (``conditions`` added) on
    TARGET_PORT; those in ``local`` run on this node, the others on ``node-2``."""
    endpoints = []
    for ip in ips:
        ep: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": True, **conditions}}
        ep["nodeName"] = NODE if ip in local else "node-2"
        endpoints.append(ep)
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-{family.lower()}",
            "namespace": "t",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": [{"name": "p", "port": TARGET_PORT, "protocol": proto}],
    }


NODE_OBJ = {
    "kind": "Node",
    "metadata": {"name": NODE},
    "status": {
        "addresses": [
            {"type": "InternalIP", "address": NODE_IP},
            {"type": "InternalIP", "address": "fd00:10:1::1"},
        ]
    },
}


def payload(objs: list[Any], family: IPFamily = IPV4, **config: Any) -> str:
    """What ``render`` writes for node-1 and ``objs`` (config keywords go to ProxyConfig)."""
    cfg = ProxyConfig(hostname_override=NODE, **config)
    sourced = [SourcedObject(o, "test") for o in [NODE_OBJ, *objs]]
    result = render_objects(sourced, cfg, families=[family])
    assert result.problems == []
    return result.payloads[family]


def landings(
    topo: Topology, dst: str, port: int, count: int = 30, proto: Proto = "tcp"
) -> Counter[str]:
    """How many of ``count`` concurrent connections landed on each backend (all must work)."""
    results = topo.connect_many([Probe(dst, port, proto)] * count, timeout=2.0)
    assert all(r.ok for r in results), [r.outcome for r in results if not r.ok]
    return Counter(r.server_ip for r in results)


# --- scenarios shared by the dataplanes -------------------------------------------------------

Load = Callable[[list[Any], IPFamily, str], None]
"""Programs the node for ``(objects, family, cluster_cidr)`` with one dataplane."""


def check_udp_cluster_ip(topo: Topology, load: Load) -> None:
    objs = [
        service("dns", "10.96.0.53", port=53, proto="UDP"),
        slice_("dns", BACKENDS, proto="UDP"),
    ]
    load(objs, IPV4, "10.10.2.0/24")
    assert set(landings(topo, "10.96.0.53", 53, proto="udp")) <= set(BACKENDS)


def check_nodeport_external_ip_and_load_balancer_ip(topo: Topology, load: Load) -> None:
    svc = service(
        "shop",
        "10.96.0.20",
        type="LoadBalancer",
        externalIPs=["203.0.113.10"],
        port_extra={"nodePort": 30080},
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}},
    )
    load([svc, slice_("shop", BACKENDS)], IPV4, "10.10.2.0/24")
    for dst, port in (
        ("10.96.0.20", 80),
        (NODE_IP, 30080),
        ("203.0.113.10", 80),
        ("203.0.113.20", 80),
    ):
        result = topo.connect(dst, port)
        assert result.ok, (dst, port, result)
        assert result.server_ip in BACKENDS
        assert topo.masqueraded(result), "external traffic with ETP=Cluster is masqueraded"


def check_external_policy_local(topo: Topology, load: Load) -> None:
    svc = service(
        "local",
        "10.96.0.40",
        type="NodePort",
        externalTrafficPolicy="Local",
        port_extra={"nodePort": 30040},
    )
    # Only 10.10.2.3 runs on this node: NodePort traffic lands there, source preserved.
    load([svc, slice_("local", BACKENDS, local=("10.10.2.3",))], IPV4, "10.10.2.0/24")
    assert set(landings(topo, NODE_IP, 30040, count=15)) == {"10.10.2.3"}
    assert not topo.masqueraded(topo.connect(NODE_IP, 30040))
    # ClusterIP traffic still uses every endpoint.
    assert set(landings(topo, "10.96.0.40", 80, count=40)) == set(BACKENDS)


def check_ipv6_cluster_ip(topo: Topology, load: Load) -> None:
    """A dual-stack Service's IPv6 cluster IP reaches the IPv6 endpoints only."""
    v6 = ["fd00:10:2::2", "fd00:10:2::3"]
    svc = service("dual", "10.96.0.80", clusterIPs=["10.96.0.80", "fd00:96::80"])
    objs = [svc, slice_("dual", v6, family="IPv6"), slice_("dual", BACKENDS)]
    load(objs, IPV6, "fd00:10:2::/64")
    assert set(landings(topo, "fd00:96::80", 80, count=20)) == set(v6)


SHARED_SCENARIOS: tuple[Callable[[Topology, Load], None], ...] = (
    check_udp_cluster_ip,
    check_nodeport_external_ip_and_load_balancer_ip,
    check_external_policy_local,
    check_ipv6_cluster_ip,
)
"""The scenarios every dataplane's traffic test runs (parametrize with :func:`scenario_id`)."""


def scenario_id(scenario: Callable[[Topology, Load], None]) -> str:
    return scenario.__name__.removeprefix("check_")
