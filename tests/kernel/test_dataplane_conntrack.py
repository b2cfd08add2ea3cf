"""The ctnetlink codec and the UDP reconciler against real flows DNATed by the node namespace of
a test topology (client -> node -> backend); what is left is read with the ``conntrack`` binary
(an independent reader). netinfo reads a namespace's addresses, with ``ip`` and rtnetlink."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from minikproxy.compile.iptables import IptablesOptions
from minikproxy.ctreconcile import ConntrackReconciler, frontend, pack_ip
from minikproxy.dataplane.ctnetlink import CtNetlink, NetlinkConntrack, UdpFlow
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.dataplane.netinfo import local_addresses, netlink_addresses
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.testing.netns import Proto, Topology

pytestmark = pytest.mark.kernel

VIP_A, VIP_B, VIP_V6 = "10.96.0.10", "10.96.0.11", "fd00:96::10"
BACKEND_1, BACKEND_2, BACKEND_3, BACKEND_V6 = "10.10.2.2", "10.10.2.3", "10.10.2.4", "fd00:10:2::2"
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
        [(ip, TARGET_PORT, "udp") for ip in (BACKEND_1, BACKEND_2, BACKEND_3, BACKEND_V6)]
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
        (BACKEND_3, TARGET_PORT, "udp", BACKEND_3),  # routed, not a Service's
    ]
    for dst, port, proto, expected in probes:
        result = topology.connect(dst, port, proto)
        assert result.ok and result.server_ip == expected, result
    yield topology


def udp_summary(topo: Topology) -> set[tuple[str, int | None, str]]:
    """(orig dst, orig dport, reply src) of the node's UDP flows, read with ``conntrack -L``."""
    return {
        (e.orig_dst, e.orig_dport, e.reply_src) for e in topo.conntrack_list() if e.proto == "udp"
    }


def text(flow: UdpFlow) -> tuple[str, int, str]:
    return (
        str(ipaddress.ip_address(flow.frontend[0])),
        int.from_bytes(flow.frontend[1], "big"),
        str(ipaddress.ip_address(flow.backend[0])),
    )


def ctnetlink(topo: Topology) -> CtNetlink:
    return run_in_netns(topo.namespaces["node"], CtNetlink)


def test_dump_lists_each_familys_udp_flows_and_no_tcp(flows: Topology) -> None:
    node_v4, node_v6 = flows.v4.node_client_side, flows.v6.node_client_side
    with ctnetlink(flows) as ct:
        v4 = {text(f) for f in ct.dump_udp(IPV4).flows()}
        v6 = {text(f) for f in ct.dump_udp(IPV6).flows()}
        assert ct.kernel_filter  # this kernel filters the dump itself
    assert v4 == {
        (VIP_A, DNS_PORT, BACKEND_1),
        (VIP_B, DNS_PORT, BACKEND_2),
        (node_v4, NODE_PORT, BACKEND_2),
        (BACKEND_3, TARGET_PORT, BACKEND_3),
    }
    assert v6 == {(VIP_V6, DNS_PORT, BACKEND_V6), (node_v6, NODE_PORT, BACKEND_V6)}
    assert v4 | v6 == udp_summary(flows)  # what the conntrack binary sees


def test_unfiltered_dump_skips_tcp_itself(flows: Topology) -> None:
    with ctnetlink(flows) as ct:
        ct.kernel_filter = False  # as on a kernel before 5.8
        assert len(ct.dump_udp(IPV4)) == 4


def test_delete_removes_exactly_the_located_flows(flows: Topology) -> None:
    with ctnetlink(flows) as ct:
        dump = ct.dump_udp(IPV4)
        doomed = [r for r in dump.rows if r[2] == pack_ip(VIP_A)]
        result = ct.delete(IPV4, dump.locate(doomed))
        assert (result.deleted, result.missing, result.errors) == (1, 0, ())
        again = ct.delete(IPV4, dump.locate(doomed))  # gone: ENOENT, not an error
        assert (again.deleted, again.missing, again.errors) == (0, 1, ())
    remaining = {(dst, port, src) for dst, port, src in udp_summary(flows)}
    assert (VIP_A, DNS_PORT, BACKEND_1) not in remaining and len(remaining) == 5
    assert any(e.proto == "tcp" and e.orig_dst == VIP_A for e in flows.conntrack_list())


def test_flows_in_zones_are_listed_and_deleted(topology: Topology) -> None:
    """A zone on the flow (CTA_ZONE) and zones inside its tuples (CTA_TUPLE_ZONE, a layout the
    fast parser does not match) are both listed and deleted exactly."""
    base = ["conntrack", "-I", "-p", "udp", "-s", "10.1.0.1", "--sport", "1000", "-t", "100"]
    node = RealExecer(netns=topology.namespaces["node"])
    for args in (
        ["-d", "10.96.0.20", "--dport", "53", "-r", "10.244.0.2", "-q", "10.1.0.1", "-w", "3"],
        [
            "-d",
            "10.96.0.21",
            "--dport",
            "53",
            "-r",
            "10.244.0.3",
            "-q",
            "10.1.0.1",
            "--orig-zone",
            "4",
        ],
        ["-d", "10.96.0.20", "--dport", "53", "-r", "10.244.0.2", "-q", "10.1.0.1"],
    ):
        result = node.run([*base, *args, "--reply-port-src", "8053", "--reply-port-dst", "1000"])
        assert result.returncode == 0, result.stderr
    with ctnetlink(topology) as ct:
        dump = ct.dump_udp(IPV4)
        assert sorted(text(f) for f in dump.flows()) == [
            ("10.96.0.20", 53, "10.244.0.2"),
            ("10.96.0.20", 53, "10.244.0.2"),
            ("10.96.0.21", 53, "10.244.0.3"),
        ]
        zoned = [r for r in dump.rows if r[2] == pack_ip("10.96.0.21")]
        assert ct.delete(IPV4, dump.locate(zoned)).deleted == 1
    listed = node.run(["conntrack", "-L", "-p", "udp", "-o", "extended", "-w", "3"])
    assert b"10.96.0.20" in listed.stdout  # the zone-3 twin survives
    assert b"10.96.0.21" not in node.run(["conntrack", "-L", "-p", "udp"]).stdout


def udp_port(
    name: str, ip: str, port: int, node_port: int = 0, family: IPFamily = IPV4
) -> ServicePort:
    spn = ServicePortName("ns", name, "dns", "UDP")
    return ServicePort(spn, family, ip, port, node_port=node_port)


def test_reconciler_deletes_only_stale_service_flows(flows: Topology) -> None:
    """VIP_A's endpoint still serves; VIP_B's endpoint is terminating and no longer serving;
    the NodePort now goes to BACKEND_1 only; BACKEND_3's flow and TCP are nobody's business."""
    a, b = udp_port("a", VIP_A, DNS_PORT), udp_port("b", VIP_B, DNS_PORT, NODE_PORT)
    state = ProxyState(
        IPV4,
        NodeInfo(name="node"),
        services={a.name: a, b.name: b},
        endpoints={
            a.name: (
                make_endpoint(BACKEND_1, TARGET_PORT, ready=False, serving=True, terminating=True),
            ),
            b.name: (
                make_endpoint(BACKEND_1, TARGET_PORT),
                make_endpoint(BACKEND_2, TARGET_PORT, ready=False, serving=False, terminating=True),
            ),
        },
    )
    table = NetlinkConntrack(flows.namespaces["node"])
    try:
        result = ConntrackReconciler(table).reconcile(state, IptablesOptions(family=IPV4))
    finally:
        table.close()
    assert (result.listed, result.stale, result.deleted) == (4, 2, 2)
    node_v6 = flows.v6.node_client_side
    assert udp_summary(flows) == {
        (VIP_A, DNS_PORT, BACKEND_1),
        (BACKEND_3, TARGET_PORT, BACKEND_3),
        (VIP_V6, DNS_PORT, BACKEND_V6),
        (node_v6, NODE_PORT, BACKEND_V6),
    }
    assert any(e.proto == "tcp" for e in flows.conntrack_list())


def test_reconciler_matches_nodeports_on_node_addresses_only(flows: Topology) -> None:
    """The IPv6 NodePort flow goes to a local address: stale once its endpoint is gone. With
    --nodeport-addresses naming another address, the same flow is not a NodePort's."""
    svc = udp_port("v6", "fd00:96::99", DNS_PORT, NODE_PORT, IPV6)
    state = ProxyState(IPV6, NodeInfo(name="node"), services={svc.name: svc}, endpoints={})
    table = NetlinkConntrack(flows.namespaces["node"])
    try:
        reconciler = ConntrackReconciler(table)
        other = IptablesOptions(family=IPV6, nodeport_addresses=("fd00:10:9::1",))
        assert reconciler.reconcile(state, other).stale == 0
        assert reconciler.reconcile(state, IptablesOptions(family=IPV6)).deleted == 1
    finally:
        table.close()
    assert (flows.v6.node_client_side, NODE_PORT, BACKEND_V6) not in udp_summary(flows)
    assert (VIP_V6, DNS_PORT, BACKEND_V6) in udp_summary(flows)
    assert frontend(VIP_V6, DNS_PORT)[0] == ipaddress.ip_address(VIP_V6).packed


def test_local_addresses_reads_the_namespace(topology: Topology) -> None:
    node = RealExecer(netns=topology.namespaces["node"])
    v4 = local_addresses(node, IPV4)
    assert ipaddress.ip_address(topology.v4.node_client_side) in v4
    assert ipaddress.ip_address("127.0.0.1") in v4
    assert all(a.version == 4 for a in v4)
    v6 = local_addresses(node, IPV6)
    assert ipaddress.ip_address(topology.v6.node_backend_side) in v6
    assert all(a.version == 6 for a in v6)
    table = NetlinkConntrack(topology.namespaces["node"])
    try:
        for family, expected in ((IPV4, v4), (IPV6, v6)):
            assert table.local_addresses(family) == {a.packed for a in expected}
    finally:
        table.close()
    assert run_in_netns(topology.namespaces["node"], lambda: netlink_addresses(IPV4)) == {
        a.packed for a in v4
    }
