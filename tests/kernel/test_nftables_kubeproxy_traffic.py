"""Real traffic through kube-proxy's nftables layout (``compile_nftables_kubeproxy``): its
update script (the behaviour both layouts share is in test_nftables_behaviour.py).

Same topology and objects (traffic.py) as test_iptables_traffic.py: client netns -> node netns (the
``kube-proxy`` table loaded with ``nft -f``) -> backend netns. The service CIDR is
10.96.0.0/16 (fd00:96::/112 for IPv6), routed to the node by the harness.
"""

from __future__ import annotations

import json
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
    NODE_OBJ,
    landings,
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
