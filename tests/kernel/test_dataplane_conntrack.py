"""RealConntrack clears exactly the flows it is asked to, with real UDP flows DNATed by the node
namespace of a test topology (client -> node -> backend), and netinfo reads a namespace's
addresses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from minikproxy.dataplane.conntrack import ConntrackFlow, RealConntrack
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.dataplane.netinfo import local_addresses
from minikproxy.model.names import IPV4, IPV6
from minikproxy.testing.netns import Proto, Topology

pytestmark = pytest.mark.kernel

VIP_A, VIP_B, VIP_V6 = "10.96.0.10", "10.96.0.11", "fd00:96::10"
BACKEND_1, BACKEND_2, BACKEND_V6 = "10.10.2.2", "10.10.2.3", "fd00:10:2::2"
NODE_PORT = 30053
DNS_PORT, TARGET_PORT = 53, 8053

RULES_V4 = f"""*nat
:KUBE-TEST - [0:0]
-A PREROUTING -j KUBE-TEST
-A KUBE-TEST -d {VIP_A} -p udp --dport {DNS_PORT} -j DNAT --to-destination {BACKEND_1}:{TARGET_PORT}
-A KUBE-TEST -d {VIP_B} -p udp --dport {DNS_PORT} -j DNAT --to-destination {BACKEND_2}:{TARGET_PORT}
-A KUBE-TEST -d {VIP_A} -p tcp --dport {DNS_PORT} -j DNAT --to-destination {BACKEND_1}:{TARGET_PORT}
-A KUBE-TEST -p udp --dport {NODE_PORT} -j DNAT --to-destination {BACKEND_2}:{TARGET_PORT}
COMMIT
""".encode()
RULES_V6 = f"""*nat
:KUBE-TEST - [0:0]
-A PREROUTING -j KUBE-TEST
-A KUBE-TEST -d {VIP_V6} -p udp --dport {DNS_PORT} -j DNAT --to-destination [{BACKEND_V6}]:{TARGET_PORT}
-A KUBE-TEST -p udp --dport {NODE_PORT} -j DNAT --to-destination [{BACKEND_V6}]:{TARGET_PORT}
COMMIT
""".encode()  # noqa: E501


@pytest.fixture
def flows(topology: Topology) -> Iterator[Topology]:
    """A topology whose node DNATs services and a NodePort, with one flow of each kind."""
    node = RealExecer(netns=topology.namespaces["node"])
    RealIptables(node, IPV4, "nft").restore(RULES_V4)
    RealIptables(node, IPV6, "nft").restore(RULES_V6)
    topology.serve_many(
        [(ip, TARGET_PORT, "udp") for ip in (BACKEND_1, BACKEND_2, BACKEND_V6)]
        + [(BACKEND_1, TARGET_PORT, "tcp")]
    )
    node_v4, node_v6 = topology.v4.node_client_side, topology.v6.node_client_side
    probes: list[tuple[str, int, Proto, str]] = [
        (VIP_A, DNS_PORT, "udp", BACKEND_1),
        (VIP_B, DNS_PORT, "udp", BACKEND_2),
        (VIP_A, DNS_PORT, "tcp", BACKEND_1),
        (node_v4, NODE_PORT, "udp", BACKEND_2),
        (VIP_V6, DNS_PORT, "udp", BACKEND_V6),
        (node_v6, NODE_PORT, "udp", BACKEND_V6),
    ]
    for dst, port, proto, expected in probes:
        result = topology.connect(dst, port, proto)
        assert result.ok and result.server_ip == expected, result
    yield topology


def conntrack(topo: Topology) -> RealConntrack:
    return RealConntrack(RealExecer(netns=topo.namespaces["node"]))


def summary(flows: list[ConntrackFlow]) -> set[tuple[str, str, int | None, str]]:
    return {(f["protocol"], f["orig_dst"], f["orig_dport"], f["reply_src"]) for f in flows}


def test_list_entries_parses_dnat_flows(flows: Topology) -> None:
    ct = conntrack(flows)
    node_v4, node_v6 = flows.v4.node_client_side, flows.v6.node_client_side
    assert summary(ct.list_entries("udp")) == {
        ("udp", VIP_A, DNS_PORT, BACKEND_1),
        ("udp", VIP_B, DNS_PORT, BACKEND_2),
        ("udp", node_v4, NODE_PORT, BACKEND_2),
        ("udp", VIP_V6, DNS_PORT, BACKEND_V6),
        ("udp", node_v6, NODE_PORT, BACKEND_V6),
    }
    (tcp,) = ct.list_entries("tcp", IPV4)
    assert (tcp["orig_dst"], tcp["reply_src"], tcp["reply_sport"]) == (
        VIP_A,
        BACKEND_1,
        TARGET_PORT,
    )
    assert tcp["state"] is not None and tcp["family"] == IPV4
    v6 = ct.list_entries("udp", IPV6)
    assert {f["family"] for f in v6} == {IPV6} and len(v6) == 2


def test_clear_entries_for_nat_removes_only_flows_to_that_endpoint(flows: Topology) -> None:
    ct = conntrack(flows)
    before = summary(ct.list_entries())
    assert ct.clear_entries_for_nat(VIP_A, BACKEND_1, "udp") == 1
    assert ct.clear_entries_for_nat(VIP_A, BACKEND_1, "udp") == 0  # exit 1, "0 deleted": fine
    assert ct.clear_entries_for_nat(VIP_B, BACKEND_1, "udp") == 0  # VIP_B goes elsewhere
    assert summary(ct.list_entries()) == before - {("udp", VIP_A, DNS_PORT, BACKEND_1)}


def test_clear_entries_for_ip_removes_flows_to_that_service_ip(flows: Topology) -> None:
    ct = conntrack(flows)
    assert ct.clear_entries_for_ip(VIP_A, "udp") == 1
    assert ct.clear_entries_for_ip(VIP_V6, "udp") == 1
    remaining = summary(ct.list_entries())
    assert not any(dst in (VIP_A, VIP_V6) and p == "udp" for p, dst, _, _ in remaining)
    assert ("tcp", VIP_A, DNS_PORT, BACKEND_1) in remaining  # other protocol untouched
    assert ("udp", VIP_B, DNS_PORT, BACKEND_2) in remaining


def test_clear_entries_for_port_removes_nodeport_flows_of_one_family(flows: Topology) -> None:
    ct = conntrack(flows)
    assert ct.clear_entries_for_port(NODE_PORT, "udp", IPV4) == 1
    remaining = summary(ct.list_entries("udp"))
    assert not any(port == NODE_PORT for _, dst, port, _ in remaining if ":" not in dst)
    assert ("udp", flows.v6.node_client_side, NODE_PORT, BACKEND_V6) in remaining
    assert ct.clear_entries_for_port(NODE_PORT, "udp", IPV6) == 1
    assert len(ct.list_entries("udp")) == 3


def test_local_addresses_reads_the_namespace(topology: Topology) -> None:
    node = RealExecer(netns=topology.namespaces["node"])
    v4 = local_addresses(node, IPV4)
    assert ipaddress.ip_address(topology.v4.node_client_side) in v4
    assert ipaddress.ip_address("127.0.0.1") in v4
    assert all(a.version == 4 for a in v4)
    v6 = local_addresses(node, IPV6)
    assert ipaddress.ip_address(topology.v6.node_backend_side) in v6
    assert all(a.version == 6 for a in v6)
