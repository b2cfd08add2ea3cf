"""kube-proxy's behaviour, with real traffic, for both nftables layouts and both IP families.

Every test runs four times: layout ``flat`` (our ``minikproxy`` table) and ``kube-proxy``
(kube-proxy's exact ``kube-proxy`` table), each for IPv4 and IPv6. The ruleset comes from
``render --proxy-mode nftables --nftables-layout <layout>``'s code path and is loaded with the
real ``nft -f`` into the node namespace of one topology shared by the module (traffic.py):
client 10.10.1.2 / fd00:10:1::2 -> node 10.10.1.1 / fd00:10:1::1 -> backends 10.10.2.2-4 /
fd00:10:2::2-4, "pods" unless a test widens the cluster CIDR to cover the client.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.netns import Probe, Topology
from minikproxy.testing.sctp import sctp_probe

from .traffic import NODE, TARGET_PORT, landings, service

pytestmark = pytest.mark.kernel

LAYOUTS = {"flat": "minikproxy", "kube-proxy": "kube-proxy"}
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:96::/112")
ZONE = "zone-a"
#: The node namespace's interface addresses (what ``run`` would read from the kernel).
NODE_ADDRESSES = ("10.10.1.1", "10.10.2.1", "10.10.9.1", "fd00:10:1::1", "fd00:10:2::1")


@dataclass(frozen=True)
class Net:
    """One IP family's addresses in the topology, and the layout under test."""

    layout: str
    family: IPFamily
    backends: tuple[str, ...]
    node_ip: str
    node_backend_side: str
    client_subnet: str
    pods: str  # the backends' subnet: the default cluster CIDR
    wide: str  # a cluster CIDR that also covers the client
    other: str  # a range holding neither client nor node

    @property
    def v6(self) -> bool:
        return self.family == IPV6

    @property
    def nft_family(self) -> str:
        return "ip6" if self.v6 else "ip"

    @property
    def table(self) -> str:
        return LAYOUTS[self.layout]

    def vip(self, n: int) -> str:
        """Cluster IP number ``n`` (in the service CIDR)."""
        return f"fd00:96::{n:x}" if self.v6 else f"10.96.0.{n}"

    def ext(self, n: int) -> str:
        """External or load-balancer IP number ``n`` (outside every topology subnet)."""
        return f"fd00:203::{n:x}" if self.v6 else f"203.0.113.{n}"

    def svc(self, name: str, n: int, **spec: Any) -> Any:
        return service(name, self.vip(n), ipFamilies=[self.family], **spec)

    def slice(self, name: str, *endpoints: Any, proto: str = "TCP") -> Any:
        """An EndpointSlice of ``name``: endpoints are backend indexes (ready, on node-2)
        or ``ep(...)`` dicts."""
        eps = [self.ep(e) if isinstance(e, int) else e for e in endpoints]
        for e in eps:
            e["addresses"] = [self.backends[e["addresses"][0]]]
        return {
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-{self.family.lower()}",
                "namespace": "t",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": self.family,
            "endpoints": eps,
            "ports": [{"name": "p", "port": TARGET_PORT, "protocol": proto}],
        }

    @staticmethod
    def ep(
        index: int, *, local: bool = False, zone: str = "", state: str = "ready"
    ) -> dict[str, Any]:
        """Endpoint ``index`` (into backends): ``state`` ready, terminating (still serving)
        or gone (terminating, not serving); ``zone`` adds a zone hint."""
        conditions = {
            "ready": {"ready": True},
            "terminating": {"ready": False, "serving": True, "terminating": True},
            "gone": {"ready": False, "serving": False, "terminating": True},
        }[state]
        out: dict[str, Any] = {
            "addresses": [index],
            "conditions": conditions,
            "nodeName": NODE if local else "node-2",
        }
        if zone:
            out["hints"] = {"forZones": [{"name": zone}]}
        return out

    def b(self, *indexes: int) -> set[str]:
        return {self.backends[i] for i in indexes}


def _net(layout: str, family: IPFamily) -> Net:
    if family == IPV4:
        return Net(
            layout, IPV4, ("10.10.2.2", "10.10.2.3", "10.10.2.4"), "10.10.1.1", "10.10.2.1",
            "10.10.1.0/24", "10.10.2.0/24", "10.10.0.0/16", "192.0.2.0/24",
        )  # fmt: skip
    return Net(
        layout, IPV6, ("fd00:10:2::2", "fd00:10:2::3", "fd00:10:2::4"), "fd00:10:1::1",
        "fd00:10:2::1", "fd00:10:1::/64", "fd00:10:2::/64", "fd00:10::/32", "2001:db8::/64",
    )  # fmt: skip


@pytest.fixture(
    params=[(lay, fam) for lay in LAYOUTS for fam in (IPV4, IPV6)],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def net(request: pytest.FixtureRequest) -> Net:
    layout, family = request.param
    return _net(layout, family)


def node_object(pod_cidrs: tuple[str, ...] = ("10.10.3.0/24", "fd00:10:3::/64")) -> Any:
    return {
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": ZONE}},
        "spec": {"podCIDRs": list(pod_cidrs)},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "10.10.1.1"},
                {"type": "InternalIP", "address": "fd00:10:1::1"},
            ]
        },
    }


def compiled(
    net: Net,
    objs: list[Any],
    *,
    cluster_cidr: str = "",
    pod_cidrs: tuple[str, ...] | None = None,
    **config: Any,
) -> Any:
    """The ruleset of ``objs`` for node-1 with ``net``'s layout and family."""
    cfg = ProxyConfig(
        hostname_override=NODE,
        mode="nftables",
        nftables_layout=net.layout,
        service_cidrs=SERVICE_CIDRS,
        cluster_cidr=cluster_cidr or "10.10.2.0/24,fd00:10:2::/64",
        **config,
    )
    node = node_object() if pod_cidrs is None else node_object(pod_cidrs)
    sourced = [SourcedObject(o, "test") for o in [node, *objs]]
    result = render_objects(sourced, cfg, families=[net.family], node_addresses=NODE_ADDRESSES)
    assert result.problems == []
    return result.rulesets[net.family]


def load(
    topo: Topology,
    net: Net,
    objs: list[Any],
    *,
    cluster_cidr: str = "",
    pod_cidrs: tuple[str, ...] | None = None,
    **config: Any,
) -> str:
    """Render ``objs`` for node-1 with ``net``'s layout and family, load it, return it."""
    script: str = compiled(
        net, objs, cluster_cidr=cluster_cidr, pod_cidrs=pod_cidrs, **config
    ).render()
    topo.load_nft(script)
    return script


def wide(net: Net) -> str:
    """A cluster CIDR (both families) under which the client is a pod."""
    return "10.10.0.0/16,fd00:10::/32"


# --- ClusterIP, protocols, masquerading --------------------------------------------------------


def test_cluster_ip_tcp_udp_and_every_masquerade_mode(topo: Topology, net: Net) -> None:
    objs = [
        net.svc("web", 10),
        net.slice("web", 0, 1, 2),
        net.svc("dns", 53, port=53, proto="UDP"),
        net.slice("dns", 0, 1, 2, proto="UDP"),
    ]
    vip, dns = net.vip(10), net.vip(53)
    load(topo, net, objs)
    assert set(landings(topo, vip, 80, 40)) == net.b(0, 1, 2)
    assert set(landings(topo, dns, 53, 40, "udp")) == net.b(0, 1, 2)

    def masqueraded(**config: Any) -> tuple[bool, bool]:
        load(topo, net, objs, **config)
        tcp, udp = topo.connect(vip, 80), topo.connect(dns, 53, "udp")
        assert tcp.ok and udp.ok, (config, tcp, udp)
        return topo.masqueraded(tcp), topo.masqueraded(udp)

    both, neither = (True, True), (False, False)
    # ClusterCIDR (the default mode): off-cluster sources are masqueraded, pods are not.
    assert masqueraded() == both
    assert masqueraded(cluster_cidr=wide(net)) == neither
    assert masqueraded(cluster_cidr=wide(net), masquerade_all=True) == both
    client_pods = ("10.10.1.0/24", "fd00:10:1::/64")
    assert masqueraded(detect_local_mode="NodeCIDR", pod_cidrs=client_pods) == neither
    assert masqueraded(detect_local_mode="NodeCIDR") == both
    assert masqueraded(detect_local_mode="BridgeInterface", bridge_interface="cl0") == neither
    assert masqueraded(detect_local_mode="BridgeInterface", bridge_interface="xx0") == both
    prefix = "InterfaceNamePrefix"
    assert masqueraded(detect_local_mode=prefix, interface_name_prefix="cl") == neither
    assert masqueraded(detect_local_mode=prefix, interface_name_prefix="xx") == both


def test_hairpin_is_masqueraded(topo: Topology, net: Net) -> None:
    load(topo, net, [net.svc("web", 10), net.slice("web", 0)])
    own = net.backends[0]
    result = topo.connect(net.vip(10), 80, from_ns="backend", src_ip=own)
    assert result.ok and result.server_ip == own
    assert result.peer_ip != own  # the endpoint's own address would not route back


# --- NodePort, LoadBalancer, externalIPs -------------------------------------------------------


def test_nodeport_load_balancer_and_external_ips(topo: Topology, net: Net) -> None:
    proxy_ingress = {"ip": net.ext(10), "ipMode": "Proxy"}
    objs = [
        net.svc(
            "shop", 20, type="LoadBalancer", externalIPs=[net.ext(7)],
            port_extra={"nodePort": 30080},
            status={"loadBalancer": {"ingress": [{"ip": net.ext(9)}]}},
        ),
        net.slice("shop", 0, 1, 2),
        net.svc(
            "proxied", 21, type="LoadBalancer", port_extra={"nodePort": 30081},
            status={"loadBalancer": {"ingress": [proxy_ingress]}},
        ),
        net.slice("proxied", 0, 1, 2),
    ]  # fmt: skip
    load(topo, net, objs)  # NodePorts on the node's primary IP only (this mode's default)
    for dst, port in ((net.node_ip, 30080), (net.ext(7), 80), (net.ext(9), 80)):
        assert set(landings(topo, dst, port, 30)) == net.b(0, 1, 2), dst
        result = topo.connect(dst, port)
        assert result.ok and topo.masqueraded(result), dst  # externalTrafficPolicy Cluster
    assert not topo.connect(net.node_backend_side, 30080).ok
    # ipMode Proxy: the load balancer proxies, so its IP is not programmed (as kube-proxy).
    assert topo.connect(net.ext(10), 80).outcome == "unreachable"
    assert topo.connect(net.node_ip, 30081).ok

    load(topo, net, objs, nodeport_addresses=(net.pods,))  # explicit CIDRs
    assert topo.connect(net.node_backend_side, 30080).ok
    assert not topo.connect(net.node_ip, 30080).ok


# --- traffic policies, terminating endpoints, topology -----------------------------------------


def test_traffic_policy_local(topo: Topology, net: Net) -> None:
    ingress = {"loadBalancer": {"ingress": [{"ip": net.ext(9)}]}}
    objs = [
        net.svc(
            "etp", 40, type="LoadBalancer", externalTrafficPolicy="Local",
            port_extra={"nodePort": 30040}, status=ingress,
        ),
        net.slice("etp", net.ep(0), net.ep(1, local=True), net.ep(2)),
        net.svc("itp", 41, internalTrafficPolicy="Local"),
        net.slice("itp", net.ep(0), net.ep(1), net.ep(2, local=True)),
    ]  # fmt: skip
    load(topo, net, objs)
    for dst, port in ((net.ext(9), 80), (net.node_ip, 30040)):
        assert landings(topo, dst, port, 20) == Counter({net.backends[1]: 20}), dst
        result = topo.connect(dst, port)
        assert result.ok and not topo.masqueraded(result)  # the client's address is kept
    assert set(landings(topo, net.vip(40), 80, 40)) == net.b(0, 1, 2)  # internal: Cluster
    assert landings(topo, net.vip(41), 80, 20) == Counter({net.backends[2]: 20})
    # A pod source reaching an external frontend is short-circuited to every endpoint, even
    # when this node has no endpoint for it.
    no_local = [
        net.svc(
            "remote", 42, type="LoadBalancer", externalTrafficPolicy="Local",
            port_extra={"nodePort": 30042},
            status={"loadBalancer": {"ingress": [{"ip": net.ext(8)}]}},
        ),
        net.slice("remote", 0, 1, 2),
    ]  # fmt: skip
    load(topo, net, objs + no_local, cluster_cidr=wide(net))
    assert set(landings(topo, net.ext(9), 80, 40)) == net.b(0, 1, 2)
    assert set(landings(topo, net.ext(8), 80, 40)) == net.b(0, 1, 2)
    assert set(landings(topo, net.node_ip, 30042, 40)) == net.b(0, 1, 2)


def test_no_endpoints_reject_and_local_policy_without_local_endpoints_drop(
    topo: Topology, net: Net
) -> None:
    objs = [
        net.svc(
            "empty", 30, type="LoadBalancer", externalIPs=[net.ext(7)],
            port_extra={"nodePort": 30030},
            status={"loadBalancer": {"ingress": [{"ip": net.ext(9)}]}},
        ),
        net.svc("empty-udp", 31, proto="UDP"),
        net.svc(
            "remote", 32, type="NodePort", externalTrafficPolicy="Local",
            port_extra={"nodePort": 30032},
        ),
        net.slice("remote", 0, 1, 2),
        net.svc("itp", 33, internalTrafficPolicy="Local"),
        net.slice("itp", 0, 1, 2),
    ]  # fmt: skip
    load(topo, net, objs)
    for dst, port in ((net.vip(30), 80), (net.node_ip, 30030), (net.ext(7), 80), (net.ext(9), 80)):
        assert topo.connect(dst, port).outcome == "refused", dst
    assert topo.connect(net.vip(31), 80, "udp").outcome == "refused"
    assert topo.connect(net.node_ip, 30032, timeout=0.5).outcome == "timeout"
    assert topo.connect(net.vip(32), 80).ok  # the cluster IP keeps the Cluster policy
    assert topo.connect(net.vip(33), 80, timeout=0.5).outcome == "timeout"


def test_terminating_fallback(topo: Topology, net: Net) -> None:
    objs = [
        net.svc("draining", 50),
        net.slice(
            "draining", net.ep(0, state="terminating"), net.ep(1, state="terminating"),
            net.ep(2, state="gone"),
        ),
        net.svc(
            "etp", 51, type="NodePort", externalTrafficPolicy="Local",
            port_extra={"nodePort": 30051},
        ),
        net.slice("etp", net.ep(0, local=True, state="terminating"), net.ep(1), net.ep(2)),
    ]  # fmt: skip
    load(topo, net, objs)
    assert set(landings(topo, net.vip(50), 80, 30)) == net.b(0, 1)
    # No ready local endpoint: the local serving-terminating one takes external traffic...
    assert landings(topo, net.node_ip, 30051, 10) == Counter({net.backends[0]: 10})
    # ...while the cluster IP uses the ready endpoints only.
    assert set(landings(topo, net.vip(51), 80, 30)) == net.b(1, 2)


def test_topology_hints_and_traffic_distribution(topo: Topology, net: Net) -> None:
    objs = [
        net.svc("close", 60, trafficDistribution="PreferClose"),
        net.slice("close", net.ep(0, zone="zone-b"), net.ep(1, zone=ZONE), net.ep(2, zone=ZONE)),
        net.svc("partial", 61, trafficDistribution="PreferClose"),
        net.slice("partial", net.ep(0, zone="zone-b"), net.ep(1, zone=ZONE), net.ep(2)),
    ]
    load(topo, net, objs)
    assert set(landings(topo, net.vip(60), 80, 30)) == net.b(1, 2)  # this node's zone
    assert set(landings(topo, net.vip(61), 80, 40)) == net.b(0, 1, 2)  # a hint missing


# --- affinity, source ranges, service CIDRs ----------------------------------------------------


def _affinity_expiries(topo: Topology, net: Net) -> list[float]:
    """Seconds left of every affinity element (the only elements with a timeout)."""
    listing = topo.node_exec(["nft", "list", "table", net.nft_family, net.table]).stdout
    return [_seconds(m) for m in re.findall(r" expires ((?:\d+[hms]+)+)", listing)]


def _seconds(duration: str) -> float:
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[unit] for n, unit in re.findall(r"(\d+)(ms|h|m|s)", duration))


def test_client_ip_affinity_sticks_and_expires(topo: Topology, net: Net) -> None:
    def sticky(name: str, n: int, seconds: int, proto: str = "TCP") -> list[Any]:
        config = {"clientIP": {"timeoutSeconds": seconds}}
        return [
            net.svc(name, n, proto=proto, sessionAffinity="ClientIP", sessionAffinityConfig=config),
            net.slice(name, 0, 1, 2, proto=proto),
        ]

    load(topo, net, [*sticky("tcp", 70, 600), *sticky("udp", 71, 600, "UDP")])
    for vip, proto in ((net.vip(70), "tcp"), (net.vip(71), "udp")):
        first = topo.connect(vip, 80, proto)  # type: ignore[arg-type]
        assert first.ok
        for _ in range(12):  # sequential: each finds what the previous one recorded
            result = topo.connect(vip, 80, proto)  # type: ignore[arg-type]
            assert result.ok and result.server_ip == first.server_ip, proto
    expiries = _affinity_expiries(topo, net)
    assert len(expiries) == 2 and all(590 < e <= 600 for e in expiries), expiries

    load(topo, net, sticky("short", 72, 1))
    first = topo.connect(net.vip(72), 80)
    assert first.ok and topo.connect(net.vip(72), 80).server_ip == first.server_ip
    expiries = _affinity_expiries(topo, net)
    assert len(expiries) == 1 and 0 < expiries[0] <= 1, expiries
    deadline = time.monotonic() + 5
    while _affinity_expiries(topo, net):  # the kernel expires the element after 1 s
        assert time.monotonic() < deadline, "affinity element did not expire"
        time.sleep(0.1)


def test_load_balancer_source_ranges(topo: Topology, net: Net) -> None:
    def objs(ranges: list[str]) -> list[Any]:
        return [
            net.svc(
                "fw", 80, type="LoadBalancer", loadBalancerSourceRanges=ranges,
                port_extra={"nodePort": 30090},
                status={"loadBalancer": {"ingress": [{"ip": net.ext(9)}]}},
            ),
            net.slice("fw", 0, 1, 2),
        ]  # fmt: skip

    load(topo, net, objs([net.client_subnet]))
    assert topo.connect(net.ext(9), 80).ok
    load(topo, net, objs([net.other]))
    assert topo.connect(net.ext(9), 80, timeout=0.5).outcome == "timeout"
    assert topo.connect(net.node_ip, 30090).ok  # NodePorts are not subject to source ranges
    assert topo.connect(net.vip(80), 80).ok  # nor is the cluster IP
    # Without endpoints the ranges still apply: dropped outside them, rejected inside.
    load(topo, net, objs([net.other])[:1])
    assert topo.connect(net.ext(9), 80, timeout=0.5).outcome == "timeout"
    load(topo, net, objs([net.client_subnet])[:1])
    assert topo.connect(net.ext(9), 80).outcome == "refused"


def test_service_cidr_checks(topo: Topology, net: Net) -> None:
    load(topo, net, [net.svc("web", 90), net.slice("web", 0, 1, 2)])
    assert topo.connect(net.vip(90), 80).ok
    assert topo.connect(net.vip(90), 81).outcome == "refused"  # unknown port, active IP
    assert topo.connect(net.vip(250), 80, timeout=0.5).outcome == "timeout"  # unallocated


def test_sctp(topo: Topology, net: Net) -> None:
    """SCTP frontends are DNATed like TCP and UDP. This kernel has no SCTP sockets: a raw
    INIT is sent and caught on the backends' interface (minikproxy.testing.sctp)."""
    objs = [
        net.svc("s", 95, proto="SCTP", type="NodePort", port_extra={"nodePort": 30095}),
        net.slice("s", 0, 1, 2, proto="SCTP"),
        net.svc("none", 96, proto="SCTP"),
    ]
    load(topo, net, objs)
    client, backend = topo.namespaces["client"], topo.namespaces["backend"]

    def landed(dst: str, port: int, count: int) -> set[tuple[str, int] | None]:
        return set(sctp_probe(client, backend, dst, port, count=count, timeout=0.5))

    expected = {(ip, TARGET_PORT) for ip in net.backends}
    assert landed(net.vip(95), 80, 30) == expected
    assert landed(net.node_ip, 30095, 30) == expected
    assert landed(net.vip(96), 80, 1) == {None}  # no endpoints: rejected


def test_node_originated_traffic(topo: Topology, net: Net) -> None:
    """The node's own connections: masqueraded to cluster IPs (the node is not a pod);
    NodePorts on its own address work; an ETP Local frontend serves it from every endpoint."""
    ingress = {"loadBalancer": {"ingress": [{"ip": net.ext(9)}]}}
    objs = [
        net.svc("web", 10, type="NodePort", port_extra={"nodePort": 30010}),
        net.slice("web", 0, 1, 2),
        net.svc(
            "etp", 11, type="LoadBalancer", externalTrafficPolicy="Local",
            port_extra={"nodePort": 30011}, status=ingress,
        ),
        net.slice("etp", net.ep(0), net.ep(1, local=True), net.ep(2)),
    ]  # fmt: skip
    load(topo, net, objs)
    result = topo.connect(net.vip(10), 80, from_ns="node")
    assert result.ok and result.peer_ip == net.node_backend_side  # masqueraded
    assert topo.connect(net.node_ip, 30010, from_ns="node").ok
    probes = [Probe(net.ext(9), 80)] * 40
    results = topo.connect_many(probes, from_ns="node", timeout=2.0)
    assert all(r.ok for r in results)
    assert {r.server_ip for r in results} == net.b(0, 1, 2)


def test_affinity_to_a_removed_endpoint_is_forgotten(topo: Topology, net: Net) -> None:
    """Through the applier, as a running proxy: when a client's affinity endpoint goes away,
    its next connection is balanced over the endpoints left, and clients of endpoints that
    stay keep their affinity (as kube-proxy, whose per-endpoint affinity sets go with the
    endpoint); a full sync keeps every client's affinity."""
    config = {"clientIP": {"timeoutSeconds": 600}}
    sticky = net.svc("sticky", 75, sessionAffinity="ClientIP", sessionAffinityConfig=config)
    plan = topo.v6 if net.v6 else topo.v4
    base = plan.clients[0].rsplit("." if not net.v6 else ":", 1)[0]
    sep = ":" if net.v6 else "."
    clients = [f"{base}{sep}{k}" for k in range(20, 32)]  # 12 clients
    topo.exec_in("client", ["ip", "-batch", "-"], input="".join(
        f"addr add {c}/{plan.prefixlen} dev eth0{' nodad' if net.v6 else ''}\n" for c in clients
    ))  # fmt: skip
    try:
        before = compiled(net, [sticky, net.slice("sticky", 0, 1, 2)])
        with NftablesApplier(netns=topo.namespaces["node"]) as applier:
            applier.apply_full(before)
            chosen = {c: topo.connect(net.vip(75), 80, src_ip=c).server_ip for c in clients}
            gone = chosen[clients[0]]
            staying = {c: ip for c, ip in chosen.items() if ip != gone}
            assert staying  # 11 clients all on the same endpoint: p = 3^-11
            left = [i for i, ip in enumerate(net.backends) if ip != gone]
            after = compiled(net, [sticky, net.slice("sticky", *left)])
            applier.apply_changes(before, after, list(after.services))
            moved = {c: topo.connect(net.vip(75), 80, src_ip=c).server_ip for c in clients}
            assert gone not in moved.values()
            assert {c: moved[c] for c in staying} == staying
            again = {c: topo.connect(net.vip(75), 80, src_ip=c).server_ip for c in clients}
            assert again == moved  # the moved clients stick to their new endpoints
            # A full sync (the table replaced) keeps what clients learned, as kube-proxy's.
            applier.apply_full(after)
            assert {c: topo.connect(net.vip(75), 80, src_ip=c).server_ip for c in clients} == moved
    finally:
        topo.exec_in("client", ["ip", "-batch", "-"], input="".join(
            f"addr del {c}/{plan.prefixlen} dev eth0\n" for c in clients
        ))  # fmt: skip
