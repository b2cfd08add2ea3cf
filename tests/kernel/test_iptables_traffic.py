"""Real traffic through compiled rules: client netns -> node netns (rules) -> backend netns.

The node is ``node-1`` at 10.10.1.1 (client side) and 10.10.2.1 (backend side); backends
are 10.10.2.2-4 ("pods"). Services are routed to the node by the harness (10.96.0.0/16,
203.0.113.0/24). Each test compiles manifests with the real compiler and loads the payload
with the real iptables-restore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from minikproxy.model.names import IPFamily
from minikproxy.testing.netns import Topology

from .traffic import (
    BACKENDS,
    NODE_IP,
    SHARED_SCENARIOS,
    Load,
    landings,
    payload,
    scenario_id,
    service,
    slice_,
)

pytestmark = pytest.mark.kernel

CLIENT = "10.10.1.2"


def loader(topo: Topology) -> Load:
    """Loads the rendered iptables payload with iptables-nft-restore."""

    def load(objs: list[Any], family: IPFamily, cluster_cidr: str) -> None:
        topo.load_iptables(payload(objs, family, cluster_cidr=cluster_cidr), family=family)

    return load


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_cluster_ip_balances_over_every_backend(topo: Topology, backend: str) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    topo.load_iptables(payload(objs, cluster_cidr="10.10.2.0/24"), backend=backend)  # type: ignore[arg-type]
    seen = landings(topo, "10.96.0.10", 80, count=40)
    assert set(seen) == set(BACKENDS)


def test_cluster_ip_masquerades_only_off_cluster_clients(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    topo.load_iptables(payload(objs, cluster_cidr="10.10.2.0/24"))
    off_cluster = topo.connect("10.96.0.10", 80)
    assert off_cluster.ok and topo.masqueraded(off_cluster)

    topo.reset_rules()
    topo.load_iptables(payload(objs, cluster_cidr="10.10.0.0/16"))  # the client is a "pod"
    in_cluster = topo.connect("10.96.0.10", 80)
    assert in_cluster.ok and not topo.masqueraded(in_cluster)

    topo.reset_rules()
    topo.load_iptables(payload(objs, cluster_cidr="10.10.0.0/16", masquerade_all=True))
    forced = topo.connect("10.96.0.10", 80)
    assert forced.ok and topo.masqueraded(forced)


@pytest.mark.parametrize("scenario", SHARED_SCENARIOS, ids=scenario_id)
def test_shared_scenario(topo: Topology, scenario: Callable[[Topology, Load], None]) -> None:
    """The scenarios every dataplane passes (traffic.py), with this module's loader."""
    scenario(topo, loader(topo))


def test_no_endpoints_rejects(topo: Topology) -> None:
    svc = service("empty", "10.96.0.30", type="NodePort", port_extra={"nodePort": 30030})
    topo.load_iptables(payload([svc], cluster_cidr="10.10.2.0/24"))
    assert topo.connect("10.96.0.30", 80).outcome == "refused"
    assert topo.connect(NODE_IP, 30030).outcome == "refused"


def test_external_policy_local_without_local_endpoints_drops(topo: Topology) -> None:
    svc = service(
        "remote", "10.96.0.41", type="NodePort", externalTrafficPolicy="Local",
        port_extra={"nodePort": 30041},
    )  # fmt: skip
    topo.load_iptables(payload([svc, slice_("remote", BACKENDS)], cluster_cidr="10.10.2.0/24"))
    assert topo.connect(NODE_IP, 30041, timeout=0.5).outcome == "timeout"
    assert topo.connect("10.96.0.41", 80).ok  # internal traffic is unaffected


def test_internal_policy_local_without_local_endpoints_drops(topo: Topology) -> None:
    svc = service("itp", "10.96.0.42", internalTrafficPolicy="Local")
    topo.load_iptables(payload([svc, slice_("itp", BACKENDS)], cluster_cidr="10.10.2.0/24"))
    assert topo.connect("10.96.0.42", 80, timeout=0.5).outcome == "timeout"


def test_session_affinity_sticks(topo: Topology) -> None:
    svc = service("sticky", "10.96.0.50", sessionAffinity="ClientIP")
    topo.load_iptables(payload([svc, slice_("sticky", BACKENDS)], cluster_cidr="10.10.2.0/24"))
    first = topo.connect("10.96.0.50", 80)
    assert first.ok
    # Sequential connections (affinity is recorded when the first one is DNATed).
    for _ in range(10):
        assert topo.connect("10.96.0.50", 80).server_ip == first.server_ip


def test_load_balancer_source_ranges(topo: Topology) -> None:
    def lb(name: str, vip: str, ranges: list[str]) -> Any:
        return service(
            name, f"10.96.0.{60 + int(vip[-1])}", type="LoadBalancer",
            loadBalancerSourceRanges=ranges, port_extra={"nodePort": 30060 + int(vip[-1])},
            status={"loadBalancer": {"ingress": [{"ip": vip}]}},
        )  # fmt: skip

    objs = [
        lb("allowed", "203.0.113.61", ["10.10.1.0/24"]),
        lb("denied", "203.0.113.62", ["192.0.2.0/24"]),
        slice_("allowed", BACKENDS),
        slice_("denied", BACKENDS),
    ]
    topo.load_iptables(payload(objs, cluster_cidr="10.10.2.0/24"))
    assert topo.connect("203.0.113.61", 80).ok
    assert topo.connect("203.0.113.62", 80, timeout=0.5).outcome == "timeout"


def test_terminating_endpoints_are_a_fallback(topo: Topology) -> None:
    svc = service("drain", "10.96.0.70")
    draining = slice_("drain", ["10.10.2.4"], ready=False, serving=True, terminating=True)
    topo.load_iptables(payload([svc, draining], cluster_cidr="10.10.2.0/24"))
    assert set(landings(topo, "10.96.0.70", 80, count=5)) == {"10.10.2.4"}


def test_localhost_nodeports(topo: Topology) -> None:
    svc = service("lh", "10.96.0.90", type="NodePort", port_extra={"nodePort": 30090})
    objs = [svc, slice_("lh", BACKENDS)]
    topo.node_exec(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
    topo.load_iptables(payload(objs, cluster_cidr="10.10.2.0/24"))
    on = topo.connect("127.0.0.1", 30090, from_ns="node")
    assert on.ok and on.server_ip in BACKENDS
    assert topo.masqueraded(on, "127.0.0.1")

    topo.reset_rules()
    topo.load_iptables(payload(objs, cluster_cidr="10.10.2.0/24", localhost_nodeports=False))
    assert topo.connect("127.0.0.1", 30090, from_ns="node").outcome == "refused"
    assert topo.connect(NODE_IP, 30090).ok  # other addresses still work
