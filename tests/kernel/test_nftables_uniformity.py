"""Endpoint-share uniformity, exactly: for n = 1..100 endpoints, each endpoint's share of new
connections is 1/n (within 2^-32; the requirement is 1 percentage point), in both layouts.

The selection is read back from the kernel (``nft -j list table`` of a namespace holding one
Service per n) and evaluated for every possible random value: both layouts select with
``numgen random mod M``, which the kernel computes as ``reciprocal_scale(r, M) = (r * M) >> 32``
of a uniform 32-bit ``r`` (net/netfilter/nft_numgen.c), so bucket ``i`` receives exactly the
``r`` in ``[ceil(i * 2^32 / M), ceil((i + 1) * 2^32 / M))``. The flat layout maps
``VIP . port . i`` to an endpoint through ``cluster-endpoints-<proto>`` (modulus from the
``pick-<n>`` chain the Service dispatches to); kube-proxy's layout jumps to
``endpoint-*`` chains through an anonymous verdict map. Each endpoint's share is the sum of
its buckets' sizes over 2^32. A layout with a fixed bucket count (16 buckets, 10 endpoints:
6 endpoints get 2 buckets) fails this by 3.75 percentage points.

The real-traffic check of the same property (new UDP flows, the chosen endpoint read from
conntrack) is ``test_nftables_traffic.py::test_endpoint_shares_are_uniform``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from fractions import Fraction
from typing import Any

import pytest

from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.testing.netns import Topology

from .test_nftables_behaviour import Net, _net, load

pytestmark = pytest.mark.kernel

COUNTS = range(1, 101)
SPACE = 1 << 32


def bucket_sizes(modulus: int) -> list[int]:
    """How many 32-bit values ``reciprocal_scale`` sends to each of ``modulus`` buckets."""
    bounds = [-(-i * SPACE // modulus) for i in range(modulus + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(modulus)]


def objects(net: Net) -> list[Any]:
    """One Service per endpoint count n (cluster IP number n), endpoints that need not exist."""
    out: list[Any] = []
    for n in COUNTS:
        ips = [
            f"fd00:10:2::{n:x}:{k + 1:x}" if net.v6 else f"10.{100 + n // 100}.{n % 100}.{k + 1}"
            for k in range(n)
        ]
        slice_ = net.slice(f"u{n}")
        slice_["endpoints"] = [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]
        out += [net.svc(f"u{n}", n), slice_]
    return out


def _flat_selection(items: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    """Per cluster IP: bucket index -> endpoint, over ``0..M-1`` of its pick chain's modulus."""
    modulus: dict[str, int] = {}
    for item in items:
        rule = item.get("rule")
        if rule and rule["chain"].startswith("pick-"):
            key = rule["expr"][-1]["dnat"]["addr"]["map"]["key"]["concat"]
            if key[1]["payload"]["protocol"] == "tcp":
                modulus[rule["chain"]] = key[2]["numgen"]["mod"]
    sets = {i["map"]["name"]: i["map"].get("elem", []) for i in items if "map" in i}
    chain_of = {k["concat"][0]: v["goto"]["target"] for k, v in sets["service-dispatch"]}
    endpoints: dict[str, dict[int, str]] = defaultdict(dict)
    for key, value in sets["cluster-endpoints-tcp"]:
        vip, _, index = key["concat"]
        endpoints[vip][index] = value["concat"][0]
    return {
        vip: {i: endpoints[vip].get(i, "") for i in range(modulus[chain_of[vip]])}
        for vip in chain_of
    }


def _kube_proxy_selection(items: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    rules = [i["rule"] for i in items if "rule" in i]
    dnat_of = {r["chain"]: e["dnat"]["addr"] for r in rules for e in r["expr"] if "dnat" in e}
    service_ips = next(i["map"] for i in items if i.get("map", {}).get("name") == "service-ips")
    out: dict[str, dict[int, str]] = {}
    for key, verdict in service_ips["elem"]:
        chain = verdict["goto"]["target"]
        vmaps = [e["vmap"] for r in rules if r["chain"] == chain for e in r["expr"] if "vmap" in e]
        assert len(vmaps) == 1, chain
        modulus = vmaps[0]["key"]["numgen"]["mod"]
        targets = {i: v["goto"]["target"] for i, v in vmaps[0]["data"]["set"]}
        out[key["concat"][0]] = {i: dnat_of.get(targets.get(i, ""), "") for i in range(modulus)}
    return out


@pytest.mark.parametrize("family", [IPV4, IPV6])
@pytest.mark.parametrize("layout", ["flat", "kube-proxy"])
def test_every_endpoint_gets_exactly_one_nth(
    shared_topology: Topology, layout: str, family: IPFamily
) -> None:
    net = _net(layout, family)
    objs = objects(net)
    load(shared_topology, net, objs)
    listing = shared_topology.node_exec(["nft", "-j", "list", "table", net.nft_family, net.table])
    items = [i for i in json.loads(listing.stdout)["nftables"] if "metainfo" not in i]
    selection = (_flat_selection if layout == "flat" else _kube_proxy_selection)(items)
    worst = Fraction(0)
    for n in COUNTS:
        buckets = selection[net.vip(n)]
        expected = {ep["addresses"][0] for ep in objs[2 * n - 1]["endpoints"]}
        assert set(buckets.values()) == expected, n  # every bucket DNATs to an endpoint
        share: dict[str, int] = defaultdict(int)
        for index, size in enumerate(bucket_sizes(len(buckets))):
            share[buckets[index]] += size
        worst = max(worst, *(abs(Fraction(s, SPACE) - Fraction(1, n)) for s in share.values()))
    assert worst < Fraction(1, SPACE)  # far inside the required 1 percentage point


def test_bucket_sizes_skew_with_a_fixed_bucket_count() -> None:
    """The check catches the classic mistake: 16 fixed buckets over 10 endpoints."""
    sizes = bucket_sizes(16)
    share = [sum(sizes[i] for i in range(16) if i % 10 == e) for e in range(10)]
    assert max(abs(Fraction(s, SPACE) - Fraction(1, 10)) for s in share) == Fraction(3, 80)
    assert sum(bucket_sizes(7)) == SPACE and max(bucket_sizes(7)) - min(bucket_sizes(7)) == 1
