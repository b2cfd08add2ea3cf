"""Golden tests of kube-proxy's nftables layout (``compile_nftables_kubeproxy``).

``tests/data/overall-cluster.yaml`` holds the objects of kube-proxy's ``TestOverallNFTablesRules``
(the same as ``TestOverallIPTablesRules``) and ``overall-cluster.nftables.ipv4.golden`` its
expected text, verbatim (source and commit in the file's header). Both are compared after the
canonicalisation kube-proxy's test applies (``sortNFTablesTransaction``): blank and ``#`` lines
dropped; lines ordered by object type (table, chain, rule, set, map, element), then object
name; rules keep their order within a chain; other lines of one object sort as whole lines.

Deliberate differences, all outside that comparison (stripped before it):
- ``render()`` starts with ``add table`` + ``delete table`` so one ``nft -f`` replaces an
  existing table atomically (kube-proxy instead flushes each object in its transaction);
  :meth:`KubeProxyNftRuleset.lines` is the table without that preamble.
- Element lines are written one per element and once per element (kube-proxy's
  ``nftElementStorage`` also deduplicates).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables_kubeproxy import (
    KubeProxyNftRuleset,
    compile_nftables_kubeproxy,
    endpoint_chain_base,
    hash_and_truncate,
    service_chain_base,
)
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.config import ProxyConfig
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, IPV6, NamespacedName, ServicePortName
from minikproxy.nodeopts import nftables_options
from minikproxy.sources.manifests import load_manifests

DATA = Path(__file__).parent.parent / "data"

OBJECT_ORDER = {"table": 10, "chain": 9, "rule": 8, "set": 7, "map": 6, "element": 5}


def sort_nftables_transaction(text: str) -> list[str]:
    """kube-proxy's ``sortNFTablesTransaction`` (helpers_test.go), as a stable sort."""
    lines = [line for line in text.split("\n") if line and not line.startswith("#")]

    def less(a: str, b: str) -> bool:
        wa, wb = a.split(" "), b.split(" ")
        if len(wa) < 5 or len(wb) < 5:
            return False
        if wa[1] != wb[1]:
            return OBJECT_ORDER.get(wa[1], 0) >= OBJECT_ORDER.get(wb[1], 0)
        if wa[4] != wb[4]:
            return wa[4] < wb[4]
        if wa[1] == "rule":
            return False
        return a < b

    def cmp(a: str, b: str) -> int:
        return -1 if less(a, b) else (1 if less(b, a) else 0)

    return sorted(lines, key=functools.cmp_to_key(cmp))


def overall_state_and_options(family: str = IPV4) -> tuple[object, NftablesOptions]:
    config = ProxyConfig(
        hostname_override="test-node", cluster_cidr="10.0.0.0/8", node_ips=("192.168.0.2",)
    )
    objects = load_manifests([str(DATA / "overall-cluster.yaml")], [])
    tracker = ClusterTracker("test-node")
    tracker.add_objects(item.obj for item in objects)
    options = nftables_options(config, tracker.node, IPV4, service_cidrs=["172.30.0.0/16"])
    return tracker.snapshot(IPV4).state, options


def overall_ruleset() -> KubeProxyNftRuleset:
    state, options = overall_state_and_options()
    return compile_nftables_kubeproxy(state, options)  # type: ignore[arg-type]


def test_overall_cluster_matches_kube_proxy() -> None:
    got = sort_nftables_transaction("\n".join(overall_ruleset().lines()))
    want = sort_nftables_transaction((DATA / "overall-cluster.nftables.ipv4.golden").read_text())
    assert got == want


def test_the_comparison_can_fail() -> None:
    golden = (DATA / "overall-cluster.nftables.ipv4.golden").read_text()
    lines = overall_ruleset().lines()
    assert sort_nftables_transaction("\n".join(lines[:-1])) != sort_nftables_transaction(golden)
    # Swapping two rules of one chain is a difference; moving a whole object is not.
    i = next(n for n, line in enumerate(lines) if "masquerading mark and" in line)
    swapped = [*lines[:i], lines[i + 1], lines[i], *lines[i + 2 :]]
    assert sort_nftables_transaction("\n".join(swapped)) != sort_nftables_transaction(golden)
    moved = lines[1:] + lines[:1]
    assert sort_nftables_transaction("\n".join(moved)) == sort_nftables_transaction(golden)


def test_chain_name_hashes_are_kube_proxys() -> None:
    name = ServicePortName("ns1", "svc1", "p80", "TCP")
    assert service_chain_base(name) == "ULMVA6XW-ns1/svc1/tcp/p80"
    ep = make_endpoint("10.180.0.1", 80)
    assert endpoint_chain_base(name, ep) == "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    ep6 = make_endpoint("fd00:10::1", 80)
    assert "__fd00.10..1/80" in endpoint_chain_base(name, ep6)
    long = hash_and_truncate("x" * 300)
    assert len(long) == 240 and long.endswith("...")


def test_output_is_deterministic_and_replaces_the_table() -> None:
    text = overall_ruleset().render()
    assert text == overall_ruleset().render()
    first = text.splitlines()[:3]
    assert first[0] == "add table ip kube-proxy"
    assert first[1] == "delete table ip kube-proxy"


def test_render_service_prints_only_that_service() -> None:
    text = overall_ruleset().render_service(NamespacedName("ns5", "svc5"))
    assert "firewall-HVFWP5L3-ns5/svc5/tcp/p80" in text
    assert "affinity-GTK6MW7G" in text
    assert "ns1/svc1" not in text and "masquerading" not in text


def test_per_service_fragments_hold_their_elements() -> None:
    frag = overall_ruleset().services[ServicePortName("ns6", "svc6", "p80", "TCP")]
    assert frag.chains == ()
    assert ("cluster-ips", "172.30.0.46") in frag.elements
    assert (
        "no-endpoint-services",
        '172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain',
    ) in frag.elements


def test_nodeport_addresses_all_use_fib_and_drop_the_nodeport_set() -> None:
    state, options = overall_state_and_options()
    options = NftablesOptions(
        family=IPV4, local=options.local, nodeport_addresses=None, node_ip="192.168.0.2"
    )
    lines = compile_nftables_kubeproxy(state, options).lines()  # type: ignore[arg-type]
    assert not any("nodeport-ips" in line for line in lines)
    assert (
        "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @service-nodeports"
    ) in lines
    assert not any("Drop traffic to unallocated" in line for line in lines)


def test_masquerade_all_and_interface_detection() -> None:
    state, _ = overall_state_and_options()
    opts = NftablesOptions(family=IPV4, masquerade_all=True, nodeport_addresses=None)
    lines = compile_nftables_kubeproxy(state, opts).lines()  # type: ignore[arg-type]
    assert (
        "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 "
        "jump mark-for-masquerade"
    ) in lines
    opts = NftablesOptions(family=IPV4, local=LocalMatch("iifname", "veth*"))
    lines = compile_nftables_kubeproxy(state, opts).lines()  # type: ignore[arg-type]
    assert any('iifname != "veth*" jump mark-for-masquerade' in line for line in lines)
    assert any('iifname "veth*" goto service-42NFTM6N' in line for line in lines)


def test_ipv6_table() -> None:
    from minikproxy.model.parse import NodeInfo
    from minikproxy.model.serviceport import ServicePort
    from minikproxy.model.state import ProxyState

    name = ServicePortName("ns", "s", "http", "UDP")
    port = ServicePort(name, IPV6, "fd00:10:96::1", 53)
    ep = make_endpoint("fd00:10::5", 5353)
    state = ProxyState(IPV6, NodeInfo("n"), {name: port}, {name: (ep,)})
    opts = NftablesOptions(family=IPV6, local=LocalMatch("saddr", "fd00:10::/64"))
    text = compile_nftables_kubeproxy(state, opts).render()
    assert "add table ip6 kube-proxy" in text
    assert "ip6 daddr fd00:10:96::1 ip6 saddr != fd00:10::/64 jump mark-for-masquerade" in text
    assert "meta l4proto udp dnat to [fd00:10::5]:5353" in text
    assert "fib daddr type local ip6 daddr != ::1" in text  # no nodeport addresses: all local


def test_update_script_sends_only_what_changed() -> None:
    state, options = overall_state_and_options()
    old = compile_nftables_kubeproxy(state, options)  # type: ignore[arg-type]
    svc6 = ServicePortName("ns6", "svc6", "p80", "TCP")
    services = dict(old.services)
    services[svc6] = compile_nftables_kubeproxy(
        dataclasses.replace(
            state,  # type: ignore[type-var]
            endpoints={**state.endpoints, svc6: (make_endpoint("10.180.0.6", 80),)},  # type: ignore[attr-defined]
        ),
        options,
    ).services[svc6]
    new = KubeProxyNftRuleset(options, services)
    update = new.render_update(old).splitlines()
    assert "delete element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 }" in update
    assert any(
        line.startswith("add element ip kube-proxy service-ips { 172.30.0.46") for line in update
    )
    assert not any("svc1" in line for line in update)
    assert not any("cluster-ips" in line for line in update)  # unchanged element
    assert new.render_update(new) == ""


def test_affinity_restore_refills_the_affinity_sets_still_there() -> None:
    tracker = ClusterTracker("node-a")
    tracker.add_objects(
        [
            {
                "kind": "Service",
                "metadata": {"name": "s", "namespace": "ns"},
                "spec": {
                    "clusterIP": "10.96.0.5",
                    "ports": [{"name": "p", "port": 80}],
                    "sessionAffinity": "ClientIP",
                },
            },
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "s-1",
                    "namespace": "ns",
                    "labels": {"kubernetes.io/service-name": "s"},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.1.1"], "conditions": {"ready": True}}],
                "ports": [{"name": "p", "port": 8080}],
            },
        ]
    )
    ruleset = compile_nftables_kubeproxy(tracker.snapshot(IPV4).state, NftablesOptions())
    (name,) = ruleset.affinity_maps
    assert name.startswith("affinity-")
    address = bytes([10, 1, 1, 1])
    listing = {
        name: [(address, None, None, 5000), (bytes([10, 1, 1, 2]), None, None, None)],
        "affinity-gone": [(bytes([10, 1, 1, 3]), None, None, 5000)],
    }
    assert ruleset.affinity_restore(listing) == (
        f"add element ip kube-proxy {name} {{ 10.1.1.1 expires 5000ms }}\n"
    )
