"""Real traffic through the flat nftables layout: client netns -> node netns -> backends.

Each test renders manifests with ``render --proxy-mode nftables``'s code path and loads the
script with the real ``nft -f`` into the node namespace. The node is ``node-1`` at 10.10.1.1;
backends 10.10.2.2-4 are "pods" (the cluster CIDR is 10.10.2.0/24 unless a test says
otherwise), so the client 10.10.1.2 is an off-cluster source.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.netns import Proto, Topology

from .traffic import BACKENDS, NODE, NODE_IP, NODE_OBJ, landings, payload, service, slice_

pytestmark = pytest.mark.kernel

BACKENDS6 = ["fd00:10:2::2", "fd00:10:2::3", "fd00:10:2::4"]
POD_CIDR = "10.10.2.0/24"
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:96::/112")


def script(objs: list[Any], family: IPFamily = IPV4, **config: Any) -> str:
    config.setdefault("cluster_cidr", f"{POD_CIDR},fd00:10:2::/64")
    return payload(objs, family, mode="nftables", service_cidrs=SERVICE_CIDRS, **config)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_cluster_ip_balances_and_masquerades_off_cluster_clients(
    topo: Topology, proto: Proto
) -> None:
    objs = [
        service("web", "10.96.0.10", proto=proto.upper()),
        slice_("web", BACKENDS, proto=proto.upper()),
    ]
    topo.load_nft(script(objs))
    assert set(landings(topo, "10.96.0.10", 80, 40, proto)) == set(BACKENDS)
    result = topo.connect("10.96.0.10", 80, proto)
    assert result.ok and topo.masqueraded(result)

    topo.load_nft(script(objs, cluster_cidr="10.10.0.0/16"))  # the client is now a "pod"
    result = topo.connect("10.96.0.10", 80, proto)
    assert result.ok and not topo.masqueraded(result)


def test_masquerade_all(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    topo.load_nft(script(objs, cluster_cidr="10.10.0.0/16", masquerade_all=True))
    result = topo.connect("10.96.0.10", 80)
    assert result.ok and topo.masqueraded(result)


def test_ipv6_cluster_ip_and_nodeport(topo: Topology) -> None:
    objs = [
        service(
            "web",
            "fd00:96::10",
            type="NodePort",
            ipFamilies=["IPv6"],
            port_extra={"nodePort": 30080},
        ),
        slice_("web", BACKENDS6, family="IPv6"),
    ]
    topo.load_nft(script(objs, IPV6))
    assert set(landings(topo, "fd00:96::10", 80)) == set(BACKENDS6)
    result = topo.connect("fd00:10:1::1", 30080)
    assert result.ok and result.server_ip in BACKENDS6 and topo.masqueraded(result)


def test_nodeport_loadbalancer_and_external_ip(topo: Topology) -> None:
    objs = [
        service(
            "web",
            "10.96.0.10",
            type="LoadBalancer",
            externalIPs=["203.0.113.7"],
            port_extra={"nodePort": 30080},
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}},
        ),
        slice_("web", BACKENDS),
    ]
    topo.load_nft(script(objs))
    for dst, port in (("203.0.113.7", 80), ("203.0.113.9", 80), (NODE_IP, 30080)):
        assert set(landings(topo, dst, port, 30)) == set(BACKENDS), dst
        result = topo.connect(dst, port)
        assert result.ok and topo.masqueraded(result), dst  # externalTrafficPolicy Cluster


def test_load_balancer_ip_mode_proxy_is_not_programmed(topo: Topology) -> None:
    ingress = {"ip": "203.0.113.9", "ipMode": "Proxy"}
    objs = [
        service(
            "web",
            "10.96.0.10",
            type="LoadBalancer",
            port_extra={"nodePort": 30080},
            status={"loadBalancer": {"ingress": [ingress]}},
        ),
        slice_("web", BACKENDS),
    ]
    topo.load_nft(script(objs))
    assert topo.connect("203.0.113.9", 80).outcome == "unreachable"
    assert topo.connect(NODE_IP, 30080).ok


def test_external_traffic_policy_local(topo: Topology) -> None:
    objs = [
        service(
            "web",
            "10.96.0.10",
            type="LoadBalancer",
            externalTrafficPolicy="Local",
            port_extra={"nodePort": 30080},
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}},
        ),
        slice_("web", BACKENDS, local=("10.10.2.3",)),
    ]
    topo.load_nft(script(objs))
    for dst, port in (("203.0.113.9", 80), (NODE_IP, 30080)):
        assert landings(topo, dst, port, 20) == Counter({"10.10.2.3": 20})
        result = topo.connect(dst, port)
        assert result.ok and not topo.masqueraded(result)  # the source IP is kept
    # A "pod" source is short-circuited to every endpoint.
    topo.load_nft(script(objs, cluster_cidr="10.10.0.0/16"))
    assert set(landings(topo, "203.0.113.9", 80, 40)) == set(BACKENDS)


def test_internal_traffic_policy_local(topo: Topology) -> None:
    objs = [
        service("web", "10.96.0.10", internalTrafficPolicy="Local"),
        slice_("web", BACKENDS, local=("10.10.2.4",)),
    ]
    topo.load_nft(script(objs))
    assert landings(topo, "10.96.0.10", 80, 20) == Counter({"10.10.2.4": 20})
    topo.load_nft(script([objs[0], slice_("web", BACKENDS)]))  # no local endpoint: DROP
    assert topo.connect("10.96.0.10", 80, timeout=0.5).outcome == "timeout"


def test_no_endpoints_reject_and_local_policy_drop(topo: Topology) -> None:
    objs = [
        service("empty", "10.96.0.20", type="NodePort", port_extra={"nodePort": 30020}),
        service(
            "remote",
            "10.96.0.21",
            type="NodePort",
            externalTrafficPolicy="Local",
            port_extra={"nodePort": 30021},
        ),
        slice_("remote", BACKENDS),
    ]
    topo.load_nft(script(objs))
    for dst, port, proto in (
        ("10.96.0.20", 80, "tcp"),
        ("10.96.0.20", 80, "udp"),
        (NODE_IP, 30020, "tcp"),
    ):
        assert topo.connect(dst, port, proto).outcome == "refused", (dst, proto)  # type: ignore[arg-type]
    assert topo.connect(NODE_IP, 30021, timeout=0.5).outcome == "timeout"
    assert topo.connect("10.96.0.21", 80).ok  # the cluster IP keeps Cluster policy


def test_client_ip_affinity_sticks(topo: Topology) -> None:
    objs = [
        service(
            "web",
            "10.96.0.10",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
        ),
        slice_("web", BACKENDS),
    ]
    topo.load_nft(script(objs))
    first = topo.connect("10.96.0.10", 80)
    assert first.ok
    # Sequential connects: each must find the entry the previous one recorded.
    for _ in range(15):
        result = topo.connect("10.96.0.10", 80)
        assert result.ok and result.server_ip == first.server_ip
    listing = topo.node_exec(["nft", "list", "map", "ip", "minikproxy", "affinity-tcp"]).stdout
    assert "10.10.1.2 . 10.96.0.10 . 80 timeout 10m expires" in listing


def test_load_balancer_source_ranges(topo: Topology) -> None:
    def objs(ranges: list[str]) -> list[Any]:
        return [
            service(
                "web",
                "10.96.0.10",
                type="LoadBalancer",
                loadBalancerSourceRanges=ranges,
                port_extra={"nodePort": 30080},
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}},
            ),
            slice_("web", BACKENDS),
        ]

    topo.load_nft(script(objs(["10.10.1.0/24"])))
    assert topo.connect("203.0.113.9", 80).ok
    topo.load_nft(script(objs(["192.0.2.0/24"])))
    assert topo.connect("203.0.113.9", 80, timeout=0.5).outcome == "timeout"
    assert topo.connect(NODE_IP, 30080).ok  # the NodePort is not firewalled


@pytest.mark.parametrize("family", [IPV4, IPV6])
def test_service_cidr_checks(topo: Topology, family: IPFamily) -> None:
    if family == IPV4:
        cip, unallocated = "10.96.0.10", "10.96.0.99"
        objs = [service("web", cip), slice_("web", BACKENDS)]
    else:
        cip, unallocated = "fd00:96::10", "fd00:96::99"
        objs = [
            service("web", cip, ipFamilies=["IPv6"]),
            slice_("web", BACKENDS6, family="IPv6"),
        ]
    topo.load_nft(script(objs, family))
    assert topo.connect(cip, 80).ok
    assert topo.connect(cip, 81).outcome == "refused"  # unknown port on an active cluster IP
    assert topo.connect(unallocated, 80, timeout=0.5).outcome == "timeout"


def test_sctp_loads_and_matches(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10", proto="SCTP"), slice_("web", BACKENDS, proto="SCTP")]
    topo.load_nft(script(objs))
    listing = topo.node_exec(["nft", "list", "map", "ip", "minikproxy", "cluster-endpoints-sctp"])
    assert "10.96.0.10 . 80 . 2 : 10.10.2.4 . 8080" in listing.stdout


def test_script_replaces_the_loaded_table(topo: Topology) -> None:
    topo.load_nft(script([service("web", "10.96.0.10"), slice_("web", BACKENDS)]))
    topo.load_nft(script([service("web", "10.96.0.10"), slice_("web", BACKENDS[:1])]))
    assert landings(topo, "10.96.0.10", 80, 10) == Counter({BACKENDS[0]: 10})


# --- endpoint-share uniformity ----------------------------------------------------------------

COUNTS = (1, 2, 3, 7, 10, 33, 100)
SHARE_CHECKED = (10, 33, 100)
"""Counts whose every share is also checked against 1/n +- 1 percentage point, with enough
flows that 1 pp is 4.5 standard deviations (for smaller n that needs 10^4-10^5 flows: their
exactness rests on the structure, checked in the unit tests, and on the chi-square test)."""


def _flows(n: int) -> int:
    if n in SHARE_CHECKED:
        p = 1 / n
        return math.ceil(4.5**2 * p * (1 - p) / 0.01**2)
    return max(300, 60 * n)


def test_endpoint_shares_are_uniform(shared_topology: Topology) -> None:
    """New UDP flows spread evenly over n endpoints (the chosen one read from conntrack).

    A chi-square test at p < 1e-4 for every n, and each share within 1 pp of 1/n where the
    sample makes that sound. A fixed bucket count not dividing n (16 buckets over 10
    endpoints: 6 endpoints get twice the share of the others) fails both.
    """
    topo = shared_topology
    objs: list[Any] = []
    for i, n in enumerate(COUNTS):
        # Endpoints need not exist: the DNAT decision is recorded in conntrack either way.
        eps = [f"10.10.2.{100 + k}" for k in range(n)]
        objs += [
            service(f"u{n}", f"10.96.1.{i + 1}", proto="UDP"),
            slice_(f"u{n}", eps, proto="UDP"),
        ]
    topo.load_nft(script(objs))
    for i, n in enumerate(COUNTS):
        flows = _flows(n)
        vip = f"10.96.1.{i + 1}"
        topo.conntrack_flush()
        topo.send_udp_flows(vip, 80, flows)
        entries = [e for e in topo.conntrack_list() if e.orig_dst == vip]
        assert len(entries) == flows
        counts = Counter(e.reply_src for e in entries)
        endpoints = [f"10.10.2.{100 + k}" for k in range(n)]
        assert set(counts) <= set(endpoints)
        expected = flows / n
        chi2 = sum((counts.get(ep, 0) - expected) ** 2 for ep in endpoints) / expected
        assert chi2 <= _chi2_limit(n - 1), (n, chi2, counts)
        if n in SHARE_CHECKED:
            worst = max(abs(counts.get(ep, 0) / flows - 1 / n) for ep in endpoints)
            assert worst <= 0.01, (n, worst, counts)


def _chi2_limit(df: int) -> float:
    """The chi-square quantile at p = 1e-4 (Wilson-Hilferty approximation)."""
    if df == 0:
        return 0.0
    z = 3.72  # the standard normal's 1 - 1e-4 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_endpoint_change_applies_as_elements_only(topo: Topology) -> None:
    """The applier's path: the element diff of one Service loads onto the live table."""

    def ruleset(ips: list[str]) -> Any:
        cfg = ProxyConfig(hostname_override=NODE, mode="nftables", cluster_cidr=POD_CIDR)
        objs = [NODE_OBJ, service("web", "10.96.0.10"), slice_("web", ips)]
        result = render_objects([SourcedObject(o, "t") for o in objs], cfg, families=[IPV4])
        return result.rulesets[IPV4]

    before = ruleset(BACKENDS[:2])
    after = ruleset([BACKENDS[0], BACKENDS[2]])
    topo.load_nft(before.render())
    chains = topo.node_exec(["nft", "list", "chains", "ip"]).stdout
    assert set(landings(topo, "10.96.0.10", 80)) == set(BACKENDS[:2])
    update = after.update_script(before, list(after.services))
    assert update is not None and "chain" not in update and "rule" not in update
    topo.load_nft(update)
    assert set(landings(topo, "10.96.0.10", 80)) == {BACKENDS[0], BACKENDS[2]}
    assert topo.node_exec(["nft", "list", "chains", "ip"]).stdout == chains


def test_ipv6_no_endpoints_rejected_and_udp(topo: Topology) -> None:
    objs = [
        service("empty", "fd00:96::20", ipFamilies=["IPv6"]),
        service("dns", "fd00:96::53", proto="UDP", ipFamilies=["IPv6"]),
        slice_("dns", BACKENDS6, proto="UDP", family="IPv6"),
    ]
    topo.load_nft(script(objs, IPV6))
    assert topo.connect("fd00:96::20", 80).outcome == "refused"
    assert set(landings(topo, "fd00:96::53", 80, 30, "udp")) == set(BACKENDS6)


def test_interface_local_detection(topo: Topology) -> None:
    """Traffic entering via the node's client-side interface (cl0) counts as pod traffic."""
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    topo.load_nft(script(objs, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="cl"))
    result = topo.connect("10.96.0.10", 80)
    assert result.ok and not topo.masqueraded(result)
    topo.load_nft(script(objs, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="xx"))
    result = topo.connect("10.96.0.10", 80)
    assert result.ok and topo.masqueraded(result)


def test_hairpin_is_masqueraded(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS[:1])]
    topo.load_nft(script(objs))
    result = topo.connect("10.96.0.10", 80, from_ns="backend", src_ip=BACKENDS[0])
    assert result.ok and result.server_ip == BACKENDS[0]
    assert result.peer_ip != BACKENDS[0]  # the endpoint's own address would not route back
