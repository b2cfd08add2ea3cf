"""Tests of the network-namespace harness, driven by a small hand-written KUBE-like ruleset."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from minikproxy.testing.netns import (
    AddressPlan,
    CommandError,
    Family,
    Probe,
    ProbeResult,
    Topology,
    parse_conntrack,
    was_masqueraded,
)
from minikproxy.testing.probe_server import format_endpoint, parse_endpoint

kernel = pytest.mark.kernel

# One ClusterIP per behaviour, in each family.
VIPS = {
    "IPv4": {
        "plain": "10.96.0.10",
        "masq": "10.96.0.11",
        "split": "10.96.0.12",
        "reject": "10.96.0.20",
        "drop": "10.96.0.21",
        "none": "10.96.0.99",
    },
    "IPv6": {
        "plain": "fd00:96::10",
        "masq": "fd00:96::11",
        "split": "fd00:96::12",
        "reject": "fd00:96::20",
        "drop": "fd00:96::21",
        "none": "fd00:96::99",
    },
}
BACKEND_PORT = 8080

RULES_TEMPLATE = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-PLAIN - [0:0]
:KUBE-SVC-MASQ - [0:0]
:KUBE-SVC-SPLIT - [0:0]
:KUBE-SEP-B0 - [0:0]
:KUBE-SEP-B1 - [0:0]
:KUBE-SEP-B2 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES -d {plain} -p tcp --dport 80 -j KUBE-SVC-PLAIN
-A KUBE-SERVICES -d {plain} -p udp --dport 80 -j KUBE-SVC-PLAIN
-A KUBE-SERVICES -d {masq} -p tcp --dport 80 -j KUBE-SVC-MASQ
-A KUBE-SERVICES -d {split} -p tcp --dport 80 -j KUBE-SVC-SPLIT
-A KUBE-SVC-PLAIN -j KUBE-SEP-B1
-A KUBE-SVC-MASQ -j KUBE-MARK-MASQ
-A KUBE-SVC-MASQ -j KUBE-SEP-B2
-A KUBE-SVC-SPLIT -m statistic --mode random --probability 0.5 -j KUBE-SEP-B0
-A KUBE-SVC-SPLIT -j KUBE-SEP-B1
-A KUBE-SEP-B0 -p tcp -j DNAT --to-destination {b0}
-A KUBE-SEP-B1 -p tcp -j DNAT --to-destination {b1}
-A KUBE-SEP-B1 -p udp -j DNAT --to-destination {b1}
-A KUBE-SEP-B2 -p tcp -j DNAT --to-destination {b2}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A KUBE-SERVICES -d {reject} -p tcp --dport 80 -j REJECT
-A KUBE-SERVICES -d {reject} -p udp --dport 80 -j REJECT
-A KUBE-SERVICES -d {drop} -p tcp --dport 80 -j DROP
-A KUBE-SERVICES -d {drop} -p udp --dport 80 -j DROP
COMMIT
"""

FAMILIES: tuple[Family, ...] = ("IPv4", "IPv6")


def rules(topo: Topology, family: str) -> str:
    """The test ruleset of one family, aimed at the topology's first three backends."""
    plan = topo.v4 if family == "IPv4" else topo.v6
    targets = {f"b{i}": format_endpoint(ip, BACKEND_PORT) for i, ip in enumerate(plan.backends)}
    return RULES_TEMPLATE.format(**VIPS[family], **targets)


def plan_of(topo: Topology, family: str) -> AddressPlan:
    """The topology's address plan for ``family``."""
    return topo.v4 if family == "IPv4" else topo.v6


@pytest.fixture(scope="module", params=["nft", "legacy"])
def loaded(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """A topology with probe servers on every backend and the test ruleset in both families."""
    with Topology() as topo:
        topo.serve_backends(BACKEND_PORT)
        for family in FAMILIES:
            topo.load_iptables(rules(topo, family), family=family, backend=request.param)
        yield topo


def probe_all(topo: Topology, vip: str, *, timeout: float = 1.0) -> list[ProbeResult]:
    """Probe ``vip`` of every family over TCP and UDP in one batch."""
    batch = [Probe(VIPS[family][vip], 80, proto) for family in FAMILIES for proto in ("tcp", "udp")]
    return topo.connect_many(batch, timeout=timeout)


# ---- traffic through the loaded ruleset (each runs once per iptables backend) ---------------


@kernel
def test_tcp_and_udp_land_on_dnat_target_without_masquerade(loaded: Topology) -> None:
    for result in probe_all(loaded, "plain"):
        plan = plan_of(loaded, "IPv6" if ":" in result.probe.dst else "IPv4")
        assert result.outcome == "ok", result
        assert (result.server_ip, result.server_port) == (plan.backends[1], BACKEND_PORT)
        assert result.peer_ip == plan.client
        assert not loaded.masqueraded(result)


@kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_masquerade_rule_shows_node_ip_to_backend(loaded: Topology, family: Family) -> None:
    plan = plan_of(loaded, family)
    result = loaded.connect(VIPS[family]["masq"], 80)
    assert result.ok, result
    assert result.server_ip == plan.backends[2]
    assert result.peer_ip == plan.node_backend_side
    assert loaded.masqueraded(result)
    assert was_masqueraded(result, plan.client)


@kernel
def test_reject_rule_gives_refused(loaded: Topology) -> None:
    results = probe_all(loaded, "reject")
    assert [r.outcome for r in results] == ["refused"] * 4, results


@kernel
def test_drop_rule_gives_timeout(loaded: Topology) -> None:
    results = probe_all(loaded, "drop", timeout=0.3)
    assert [r.outcome for r in results] == ["timeout"] * 4, results


@kernel
def test_vip_without_rule_is_unreachable(loaded: Topology) -> None:
    results = probe_all(loaded, "none")
    assert [r.outcome for r in results] == ["unreachable"] * 4, results


@kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_random_split_reaches_both_endpoints(loaded: Topology, family: Family) -> None:
    plan = plan_of(loaded, family)
    results = loaded.connect_many([Probe(VIPS[family]["split"], 80)] * 60)
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    # Each endpoint is chosen with probability 1/2: missing one in 60 tries happens 1 in 2**59.
    assert {r.server_ip for r in results} == {plan.backends[0], plan.backends[1]}


@kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_node_originated_traffic_goes_through_output(loaded: Topology, family: Family) -> None:
    plan = plan_of(loaded, family)
    result = loaded.connect(VIPS[family]["plain"], 80, from_ns="node")
    assert result.ok, result
    assert result.server_ip == plan.backends[1]
    # The source is picked by the route to the VIP (the node's default route, to upstream).
    assert result.peer_ip == plan.node_upstream_side
    assert loaded.connect(VIPS[family]["reject"], 80, from_ns="node").outcome == "refused"


@kernel
def test_explicit_source_address(loaded: Topology) -> None:
    result = loaded.connect(VIPS["IPv4"]["plain"], 80, src_ip=loaded.v4.client)
    assert result.ok and result.peer_ip == loaded.v4.client
    assert loaded.connect("10.96.0.10", 80, src_ip="10.10.1.77").outcome == "error"


@kernel
def test_conntrack_shows_dnat_and_masquerade(loaded: Topology) -> None:
    # An earlier test's flow with the same reply tuple (backend, client port) would make NAT
    # pick another source port for this one, and its entry would show SNAT.
    loaded.conntrack_flush()
    plain = loaded.connect(VIPS["IPv4"]["plain"], 80)
    masq = loaded.connect(VIPS["IPv6"]["masq"], 80)
    assert plain.ok and masq.ok
    entries = loaded.conntrack_list()
    (plain_entry,) = [
        e for e in entries if e.orig_dst == plain.probe.dst and e.orig_sport == plain.peer_port
    ]
    assert plain_entry.dnat and not plain_entry.snat
    assert (plain_entry.reply_src, plain_entry.reply_sport) == (plain.server_ip, BACKEND_PORT)
    masq_entries = [e for e in entries if e.orig_dst == masq.probe.dst]
    assert masq_entries and all(e.snat for e in masq_entries)
    assert {e.reply_dst for e in masq_entries} == {loaded.v6.node_backend_side}


@kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_iptables_save_lists_loaded_rules(loaded: Topology, family: Family) -> None:
    saved = loaded.iptables_save(family)
    assert "-A KUBE-SVC-MASQ -j KUBE-MARK-MASQ" in saved
    assert VIPS[family]["plain"] in saved


# ---- rule loading on a shared, reset topology -------------------------------------------------


@kernel
def test_noflush_adds_rules_for_a_loadbalancer_ip(shared_topology: Topology) -> None:
    topo = shared_topology
    topo.serve(topo.v4.backends[1], BACKEND_PORT)
    topo.load_iptables(rules(topo, "IPv4"))
    assert topo.connect("203.0.113.5", 80).outcome == "unreachable"
    extra = "*nat\n-A KUBE-SERVICES -d 203.0.113.5 -p tcp --dport 80 -j KUBE-SVC-PLAIN\nCOMMIT\n"
    topo.load_iptables(extra, noflush=True)
    result = topo.connect("203.0.113.5", 80)
    assert result.ok and result.server_ip == topo.v4.backends[1], result
    assert topo.connect(VIPS["IPv4"]["plain"], 80).ok  # the first payload is still there


@kernel
def test_load_failure_raises_with_stderr(shared_topology: Topology) -> None:
    with pytest.raises(CommandError) as caught:
        shared_topology.load_iptables("*nat\n-A NO-SUCH-CHAIN -j ACCEPT\nCOMMIT\n")
    assert caught.value.returncode != 0
    assert "iptables" in caught.value.stderr.lower()


@kernel
def test_backends_are_not_mixed_and_reset_clears_legacy_rules(shared_topology: Topology) -> None:
    topo = shared_topology
    topo.load_iptables(rules(topo, "IPv4"), backend="legacy")
    with pytest.raises(ValueError, match="reset_rules"):
        topo.load_iptables(rules(topo, "IPv4"), backend="nft")
    topo.reset_rules()
    assert "KUBE-" not in topo.iptables_save("IPv4", "legacy")
    topo.load_iptables(rules(topo, "IPv4"), backend="nft")
    assert "KUBE-SVC-PLAIN" in topo.iptables_save("IPv4")


@kernel
def test_shared_topology_starts_clean(shared_topology: Topology) -> None:
    assert "KUBE-" not in shared_topology.iptables_save("IPv4", "nft")
    assert shared_topology.node_exec(["nft", "list", "ruleset"]).stdout.strip() == ""
    assert shared_topology.conntrack_list() == []


# ---- servers ----------------------------------------------------------------------------------


@kernel
def test_server_in_node_namespace_and_stop(topology: Topology) -> None:
    server = topology.serve(topology.v4.node_client_side, 30080, "udp", role="node")
    result = topology.connect(topology.v4.node_client_side, 30080, "udp")
    assert result.ok and result.server == f"{topology.v4.node_client_side}:30080"
    server.stop()
    assert not server.running
    assert topology.connect(topology.v4.node_client_side, 30080, "udp").outcome == "refused"


@kernel
def test_server_failure_reports_stderr(topology: Topology) -> None:
    with pytest.raises(CommandError, match="assign requested address"):
        topology.serve(topology.v4.client, BACKEND_PORT)  # not an address of the backend


# ---- lifecycle --------------------------------------------------------------------------------


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@kernel
def test_teardown_deletes_every_namespace_even_on_error() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), Topology() as topo:
        names = set(topo.namespaces.values())
        assert names <= _netns_names()
        topo.serve_backends(BACKEND_PORT)
        raise RuntimeError("boom")
    assert len(names) == 4
    assert not names & _netns_names()


@kernel
def test_failed_setup_deletes_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    topo = Topology()
    monkeypatch.setattr(topo, "_leaf_commands", lambda role: ["link set nonexistent0 up"])
    with pytest.raises(CommandError, match="nonexistent0"):
        topo.setup()
    assert not set(topo.namespaces.values()) & _netns_names()


@kernel
def test_name_clash_leaves_the_other_namespace_alone() -> None:
    topo = Topology()
    squatter = topo.namespaces["backend"]
    subprocess.run(["ip", "netns", "add", squatter], check=True)
    try:
        with pytest.raises(CommandError, match="exists"):
            topo.setup()
        assert squatter in _netns_names()
        others = set(topo.namespaces.values()) - {squatter}
        assert not others & _netns_names()
    finally:
        subprocess.run(["ip", "netns", "del", squatter], check=True)


# ---- pure helpers (no kernel needed) ----------------------------------------------------------


def test_address_plan_rejects_addresses_outside_its_subnets() -> None:
    with pytest.raises(ValueError, match=r"10\.10\.2\.0/24"):
        Topology(backends=["10.10.3.5"])
    with pytest.raises(ValueError, match="other than"):
        Topology(backends=["10.10.2.1"])
    with pytest.raises(ValueError, match="duplicate"):
        Topology(clients=["10.10.1.2", "10.10.1.2", "fd00:10:1::2"])


def test_custom_addresses_and_unique_prefixes() -> None:
    topo = Topology(clients=["10.10.1.9", "fd00:10:1::9"], backends=["10.10.2.7"])
    assert topo.v4.client == "10.10.1.9" and topo.v4.backends == ("10.10.2.7",)
    assert topo.v6.backends == ()
    assert all(len(name) <= 15 for name in topo.namespaces.values())
    assert Topology().prefix != Topology().prefix


def test_endpoint_round_trip() -> None:
    assert format_endpoint("fd00::1", 80) == "[fd00::1]:80"
    assert parse_endpoint("[fd00::1]:80") == ("fd00::1", 80)
    assert parse_endpoint("10.0.0.1:53") == ("10.0.0.1", 53)
    for bad in ("fd00::1:80", "10.0.0.1", "10.0.0.1:0", ":80"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_masquerade_helper_needs_an_answer() -> None:
    probe = Probe("10.96.0.10", 80)
    answered = ProbeResult(probe, "ok", server="10.10.2.3:8080", peer="10.10.2.1:40000")
    assert was_masqueraded(answered, "10.10.1.2")
    assert not was_masqueraded(answered, "10.10.2.1")
    with pytest.raises(ValueError, match="timeout"):
        was_masqueraded(ProbeResult(probe, "timeout"), "10.10.1.2")


def test_parse_conntrack() -> None:
    text = (
        "tcp      6 118 TIME_WAIT src=10.10.1.2 dst=10.96.0.11 sport=40000 dport=80 "
        "src=10.10.2.4 dst=10.10.2.1 sport=8080 dport=40000 [ASSURED] mark=0 use=1\n"
        "udp      17 29 src=fd00:10:1::2 dst=fd00:96::10 sport=5000 dport=80 [UNREPLIED] "
        "src=fd00:10:2::3 dst=fd00:10:1::2 sport=8080 dport=5000 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n"
    )
    tcp, udp = parse_conntrack(text)
    assert (tcp.proto, tcp.reply_src, tcp.reply_sport) == ("tcp", "10.10.2.4", 8080)
    assert tcp.dnat and tcp.snat
    assert udp.orig_dst == "fd00:96::10" and udp.dnat and not udp.snat
