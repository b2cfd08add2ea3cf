"""Real traffic through the flat nftables layout: what only this layout has (the behaviour
both layouts share is tested in test_nftables_behaviour.py, for both families).

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
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.netns import Topology

from .traffic import BACKENDS, NODE, NODE_OBJ, landings, payload, service, slice_

pytestmark = pytest.mark.kernel

POD_CIDR = "10.10.2.0/24"
SERVICE_CIDRS = ("10.96.0.0/16", "fd00:96::/112")


def script(objs: list[Any], family: IPFamily = IPV4, **config: Any) -> str:
    config.setdefault("cluster_cidr", f"{POD_CIDR},fd00:10:2::/64")
    return payload(objs, family, mode="nftables", service_cidrs=SERVICE_CIDRS, **config)


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
