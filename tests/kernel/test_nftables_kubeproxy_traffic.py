"""Real traffic through kube-proxy's nftables layout (``compile_nftables_kubeproxy``).

Same topology and objects (traffic.py) as test_iptables_traffic.py: client netns -> node netns (the
``kube-proxy`` table loaded with ``nft -f``) -> backend netns. The service CIDR is
10.96.0.0/16 (fd00:96::/112 for IPv6), routed to the node by the harness.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables_kubeproxy import KubeProxyNftRuleset, compile_nftables_kubeproxy
from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.nodeopts import nftables_options
from minikproxy.testing.netns import Topology
from tests.kernel.traffic import (
    BACKENDS,
    NODE,
    NODE_IP,
    NODE_OBJ,
    SHARED_SCENARIOS,
    Load,
    check_ipv6_cluster_ip,
    landings,
    scenario_id,
    service,
    slice_,
)

pytestmark = pytest.mark.kernel

SERVICE_CIDRS = ("10.96.0.0/16", "fd00:96::/112")


def kubeproxy_ruleset(
    objs: list[Any], family: IPFamily = IPV4, **config: Any
) -> KubeProxyNftRuleset:
    """The kube-proxy layout compiled for node-1."""
    cfg = ProxyConfig(hostname_override=NODE, **config)
    tracker = ClusterTracker(NODE)
    tracker.add_objects([NODE_OBJ, *objs])
    options = nftables_options(cfg, tracker.node, family, service_cidrs=SERVICE_CIDRS)
    return compile_nftables_kubeproxy(tracker.snapshot(family).state, options)


def nft_script(objs: list[Any], family: IPFamily = IPV4, **config: Any) -> str:
    """The ``nft -f`` script of the kube-proxy layout for node-1."""
    return kubeproxy_ruleset(objs, family, **config).render()


def load_kubeproxy_nft(topo: Topology, script: str) -> None:
    """Load a kube-proxy-layout script into the node namespace with ``nft -f``."""
    topo.node_exec(["nft", "-f", "-"], input=script)


def loader(topo: Topology) -> Load:
    """Loads the kube-proxy-layout script with ``nft -f``."""

    def load(objs: list[Any], family: IPFamily, cluster_cidr: str) -> None:
        load_kubeproxy_nft(topo, nft_script(objs, family, cluster_cidr=cluster_cidr))

    return load


def test_cluster_ip_balances_and_masquerades_off_cluster_clients(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    assert set(landings(topo, "10.96.0.10", 80, count=40)) == set(BACKENDS)
    off_cluster = topo.connect("10.96.0.10", 80)
    assert off_cluster.ok and topo.masqueraded(off_cluster)

    # Reloading replaces the table atomically (no duplicate objects, no error).
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.0.0/16"))
    topo.conntrack_flush()
    in_cluster = topo.connect("10.96.0.10", 80)
    assert in_cluster.ok and not topo.masqueraded(in_cluster)

    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.0.0/16", masquerade_all=True))
    topo.conntrack_flush()
    forced = topo.connect("10.96.0.10", 80)
    assert forced.ok and topo.masqueraded(forced)


@pytest.mark.parametrize("scenario", SHARED_SCENARIOS, ids=scenario_id)
def test_shared_scenario(topo: Topology, scenario: Callable[[Topology, Load], None]) -> None:
    """The scenarios every dataplane passes (traffic.py), with this module's loader."""
    scenario(topo, loader(topo))


def test_no_endpoints_rejects_and_service_cidr_checks(topo: Topology) -> None:
    svc = service("empty", "10.96.0.30", type="NodePort", port_extra={"nodePort": 30030})
    web = service("web", "10.96.0.31")
    objs = [svc, web, slice_("web", BACKENDS)]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    assert topo.connect("10.96.0.30", 80).outcome == "refused"
    assert topo.connect(NODE_IP, 30030).outcome == "refused"
    assert topo.connect("10.96.0.31", 81).outcome == "refused"  # unknown port, active IP
    assert topo.connect("10.96.0.99", 80, timeout=0.5).outcome == "timeout"  # unallocated
    assert topo.connect("10.96.0.31", 80).ok


def test_local_policies_without_local_endpoints_drop(topo: Topology) -> None:
    etp = service(
        "remote", "10.96.0.41", type="NodePort", externalTrafficPolicy="Local",
        port_extra={"nodePort": 30041},
    )  # fmt: skip
    itp = service("itp", "10.96.0.42", internalTrafficPolicy="Local")
    objs = [etp, slice_("remote", BACKENDS), itp, slice_("itp", BACKENDS)]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    assert topo.connect(NODE_IP, 30041, timeout=0.5).outcome == "timeout"
    assert topo.connect("10.96.0.41", 80).ok  # internal traffic is unaffected
    assert topo.connect("10.96.0.42", 80, timeout=0.5).outcome == "timeout"


def test_client_ip_affinity(topo: Topology) -> None:
    svc = service(
        "sticky", "10.96.0.50", sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
    )  # fmt: skip
    objs = [svc, slice_("sticky", BACKENDS)]
    script = nft_script(objs, cluster_cidr="10.10.2.0/24")
    assert "timeout 600s" in script
    load_kubeproxy_nft(topo, script)
    assert len(landings(topo, "10.96.0.50", 80, count=20)) == 1


def test_load_balancer_source_ranges(topo: Topology) -> None:
    svc = service(
        "fw", "10.96.0.60", type="LoadBalancer", loadBalancerSourceRanges=["192.0.2.0/24"],
        port_extra={"nodePort": 30060},
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.60"}]}},
    )  # fmt: skip
    objs = [svc, slice_("fw", BACKENDS)]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    assert topo.connect("203.0.113.60", 80, timeout=0.5).outcome == "timeout"
    assert topo.connect(NODE_IP, 30060).ok  # NodePorts are not subject to source ranges

    svc["spec"]["loadBalancerSourceRanges"] = ["10.10.1.0/24"]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    assert topo.connect("203.0.113.60", 80).ok


def test_ipv6_unknown_port_rejected(topo: Topology) -> None:
    """Beyond the shared IPv6 scenario: an unknown port on an active cluster IP is rejected."""
    check_ipv6_cluster_ip(topo, loader(topo))
    assert topo.connect("fd00:96::80", 81).outcome == "refused"


def _normalized_table(topo: Topology, family: str = "ip") -> list[str]:
    """The node's kube-proxy table as comparable JSON: handles dropped, set elements sorted,
    rules keyed by their chain and position."""
    out = topo.node_exec(["nft", "-j", "list", "table", family, "kube-proxy"]).stdout
    items: list[str] = []
    position: dict[str, int] = {}
    for entry in json.loads(out)["nftables"]:
        for kind, body in entry.items():
            if kind == "metainfo":
                continue
            body = {k: v for k, v in body.items() if k != "handle"}
            if kind == "rule":
                index = position[body["chain"]] = position.get(body["chain"], -1) + 1
                body["index"] = index
            if "elem" in body:
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
            items.append(json.dumps([kind, body], sort_keys=True))
    return sorted(items)


def test_update_script_reaches_the_same_table_as_a_fresh_load(topo: Topology) -> None:
    cfg = {"cluster_cidr": "10.10.2.0/24"}
    before = [
        service("web", "10.96.0.10"),
        slice_("web", BACKENDS),
        service("gone", "10.96.0.11", type="NodePort", port_extra={"nodePort": 30011}),
        slice_("gone", BACKENDS[:1]),
        service("empty", "10.96.0.12"),
    ]
    after = [
        service("web", "10.96.0.10"),
        slice_("web", BACKENDS[1:]),
        service("empty", "10.96.0.12"),
        slice_("empty", BACKENDS[:1]),
        service("sticky", "10.96.0.13", sessionAffinity="ClientIP"),
        slice_("sticky", BACKENDS),
    ]
    old = kubeproxy_ruleset(before, **cfg)
    new = kubeproxy_ruleset(after, **cfg)
    load_kubeproxy_nft(topo, new.render())
    fresh = _normalized_table(topo)

    load_kubeproxy_nft(topo, old.render())
    assert topo.connect("10.96.0.12", 80).outcome == "refused"
    assert _normalized_table(topo) != fresh
    update = new.render_update(old)
    assert "delete chain" in update and "add table" not in update
    load_kubeproxy_nft(topo, update)
    assert _normalized_table(topo) == fresh
    assert set(landings(topo, "10.96.0.10", 80, count=30)) == set(BACKENDS[1:])
    assert set(landings(topo, "10.96.0.12", 80, count=5)) == {BACKENDS[0]}
    assert len(landings(topo, "10.96.0.13", 80, count=10)) == 1
    assert new.render_update(new) == ""


def test_tcp_udp_and_sctp_ports_load(topo: Topology) -> None:
    objs = []
    for proto in ("TCP", "UDP", "SCTP"):
        name = f"p-{proto.lower()}"
        objs += [
            service(name, f"10.96.1.{len(objs) + 1}", proto=proto),
            slice_(name, BACKENDS, proto=proto),
        ]
    load_kubeproxy_nft(topo, nft_script(objs, cluster_cidr="10.10.2.0/24"))
    listed = topo.node_exec(["nft", "list", "map", "ip", "kube-proxy", "service-ips"]).stdout
    for proto in ("tcp", "udp", "sctp"):
        assert f". {proto} . 80 : goto service-" in listed
    rules = topo.node_exec(["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert "meta l4proto sctp dnat to 10.10.2.2:8080" in rules
    assert set(landings(topo, "10.96.1.3", 80, proto="udp")) <= set(BACKENDS)
