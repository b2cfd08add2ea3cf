"""The reconciler's pure decision (which flows are stale given the wanted state) and its memory
of frontends that went away, over the in-memory flow table."""

from __future__ import annotations

import pytest

from minikproxy.compile.iptables import IptablesOptions
from minikproxy.ctreconcile import (
    NO_ENDPOINTS,
    ConntrackReconciler,
    ReconcileError,
    ServingCache,
    frontend,
    is_stale,
    nodeport_ips,
    pack_ip,
    service_frontends,
    udp_frontends_in_rules,
    wanted_flows,
)
from minikproxy.dataplane.ctnetlink import DeleteResult
from minikproxy.dataplane.netinfo import NetInfoError
from minikproxy.model.endpoint import Endpoint, make_endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.testing.fake_conntrack import FakeDump, FakeFlowTable, udp_flow

DNS = ServicePort(
    ServicePortName("kube-system", "dns", "dns", "UDP"),
    IPV4,
    "10.96.0.10",
    53,
    node_port=30053,
    external_ips=("203.0.113.5",),
    load_balancer_vips=("198.51.100.7",),
)
WEB = ServicePort(ServicePortName("shop", "web", "", "TCP"), IPV4, "10.96.0.20", 80)


def state(*ports: tuple[ServicePort, tuple[Endpoint, ...]]) -> ProxyState:
    return ProxyState(
        IPV4,
        NodeInfo(name="node-a"),
        services={p.name: p for p, _ in ports},
        endpoints={p.name: eps for p, eps in ports},
    )


def test_frontends_are_every_service_ip_with_its_port_and_nodeports_on_node_ips() -> None:
    node_ips = [pack_ip("192.168.0.10"), pack_ip("127.0.0.1")]
    assert service_frontends(DNS, node_ips) == [
        frontend("10.96.0.10", 53),
        frontend("203.0.113.5", 53),
        frontend("198.51.100.7", 53),
        frontend("192.168.0.10", 30053),
        frontend("127.0.0.1", 30053),
    ]


def test_wanted_endpoints_are_the_serving_ones_of_udp_ports_only() -> None:
    eps = (
        make_endpoint("10.244.1.1", 8053),
        make_endpoint("10.244.1.2", 8053, ready=False, serving=True, terminating=True),
        make_endpoint("10.244.1.3", 8053, ready=False, serving=False, terminating=True),
        make_endpoint("10.244.1.4", 8053, ready=False),  # not ready, so not serving
        make_endpoint("10.244.1.5", 8053, zone_hints=frozenset({"elsewhere"})),
    )
    wanted = wanted_flows(state((DNS, eps), (WEB, (make_endpoint("10.244.2.1", 80),))))
    serving = frozenset(frontend(ip, 8053) for ip in ("10.244.1.1", "10.244.1.2", "10.244.1.5"))
    assert wanted == {
        frontend("10.96.0.10", 53): serving,
        frontend("203.0.113.5", 53): serving,
        frontend("198.51.100.7", 53): serving,
    }


def test_gone_frontends_want_no_endpoint_unless_a_current_port_uses_them() -> None:
    gone = [frontend("10.96.0.99", 53), frontend("10.96.0.10", 53)]
    wanted = wanted_flows(state((DNS, ())), gone=gone)
    assert wanted[frontend("10.96.0.99", 53)] == NO_ENDPOINTS
    assert wanted[frontend("10.96.0.10", 53)] == NO_ENDPOINTS  # DNS has none either
    eps = (make_endpoint("10.244.1.1", 8053),)
    assert wanted_flows(state((DNS, eps)), gone=gone)[frontend("10.96.0.10", 53)] == {
        frontend("10.244.1.1", 8053)
    }


def test_serving_sets_are_reused_only_for_the_same_endpoints_tuple() -> None:
    eps = (make_endpoint("10.244.1.1", 8053),)
    cache: ServingCache = {}
    first = wanted_flows(state((DNS, eps)), cache=cache)[frontend("10.96.0.10", 53)]
    again = wanted_flows(state((DNS, eps)), cache=cache)[frontend("10.96.0.10", 53)]
    assert again is first
    changed = (make_endpoint("10.244.1.1", 8053, ready=False, serving=False),)
    now = wanted_flows(state((DNS, changed)), cache=cache)[frontend("10.96.0.10", 53)]
    assert now == NO_ENDPOINTS
    wanted_flows(state(), cache=cache)
    assert cache == {}  # a deleted port's entry goes


@pytest.mark.parametrize(
    ("sent_to", "answered_by", "stale"),
    [
        (("10.96.0.10", 53), ("10.244.1.1", 8053), False),  # a serving endpoint
        (("10.96.0.10", 53), ("10.244.1.1", 9999), True),  # the endpoint IP, another port
        (("10.96.0.10", 53), ("10.244.1.9", 8053), True),  # a removed endpoint
        (("10.96.0.10", 53), ("10.96.0.10", 53), True),  # never DNATed (#48370)
        (("10.96.0.10", 54), ("10.244.1.9", 8053), False),  # not a service port
        (("10.96.0.11", 53), ("10.244.1.9", 8053), False),  # not a service IP
        (("10.96.0.99", 53), ("10.244.1.1", 8053), True),  # a deleted Service's
        (("10.96.0.99", 53), ("10.96.0.99", 53), True),
    ],
)
def test_is_stale(sent_to: tuple[str, int], answered_by: tuple[str, int], stale: bool) -> None:
    wanted = {
        frontend("10.96.0.10", 53): frozenset({frontend("10.244.1.1", 8053)}),
        frontend("10.96.0.99", 53): NO_ENDPOINTS,
    }
    assert is_stale(wanted, frontend(*sent_to), frontend(*answered_by)) is stale


def test_nodeport_ips_follow_the_rules() -> None:
    local = [pack_ip(ip) for ip in ("127.0.0.1", "192.168.0.10")]
    assert nodeport_ips(IptablesOptions(), lambda: local) == local
    no_localhost = IptablesOptions(localhost_nodeports=False)
    assert nodeport_ips(no_localhost, lambda: local) == [pack_ip("192.168.0.10")]
    v6 = [pack_ip("::1"), pack_ip("fd00::10")]
    assert nodeport_ips(IptablesOptions(family=IPV6), lambda: v6) == [pack_ip("fd00::10")]
    listed = IptablesOptions(nodeport_addresses=("192.168.0.10",))
    assert nodeport_ips(listed, lambda: pytest.fail("must not list")) == [pack_ip("192.168.0.10")]


def test_reconciler_remembers_gone_frontends_until_it_succeeds() -> None:
    table = FakeFlowTable()
    table.set_addresses(IPV4, ["192.168.0.10"])
    eps = (make_endpoint("10.244.1.1", 8053),)
    table.add(
        udp_flow("10.0.0.1", 1000, "10.96.0.10", 53, reply_src="10.244.1.1", reply_sport=8053),
        udp_flow("10.0.0.1", 1001, "203.0.113.5", 53, reply_src="10.244.1.1", reply_sport=8053),
    )
    reconciler = ConntrackReconciler(table)
    assert reconciler.reconcile(state((DNS, eps)), IptablesOptions()).stale == 0
    table.fail_next = OSError(4, "Interrupted")
    with pytest.raises(ReconcileError, match="IPv4 conntrack reconcile failed"):
        reconciler.reconcile(state(), IptablesOptions())  # DNS was deleted
    result = reconciler.reconcile(state(), IptablesOptions())
    assert (result.listed, result.stale, result.deleted) == (2, 2, 2)
    assert table.remaining() == set()
    dumps = table.dumps
    assert reconciler.reconcile(state(), IptablesOptions()).listed == 0
    assert table.dumps == dumps  # nothing UDP wanted any more: no dump at all


def test_failed_deletions_raise_and_are_retried() -> None:
    class Refusing(FakeFlowTable):
        def delete_rows(self, dump: FakeDump, rows: object) -> DeleteResult:
            return DeleteResult(0, 0, ("Operation not permitted",))

    table = Refusing()
    table.add(udp_flow("10.0.0.1", 1000, "10.96.0.10", 53, reply_src="10.244.1.9"))
    with pytest.raises(ReconcileError, match="1 of 1 deletions failed: Operation not permitted"):
        ConntrackReconciler(table).reconcile(state((DNS, ())), IptablesOptions())


def test_node_address_failures_are_reconcile_errors() -> None:
    """rtnetlink failing (NetInfoError) is a logged ReconcileError like any other, not an
    unexpected exception with a traceback on every sync (found by review)."""

    class NoAddresses(FakeFlowTable):
        def local_addresses(self, family: IPFamily) -> set[bytes]:
            raise NetInfoError("rtnetlink dump failed")

    with pytest.raises(ReconcileError, match="cannot list the node's IPv4 addresses"):
        ConntrackReconciler(NoAddresses()).reconcile(state((DNS, ())), IptablesOptions())


def test_udp_frontends_are_read_from_saved_rules_in_either_spelling() -> None:
    saved = "\n".join(
        [
            "*nat",
            ":KUBE-SERVICES - [0:0]",
            # iptables-save's own order (as the kernel reports the rule) ...
            '-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/dns:dns '
            'cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU',
            # ... and the order minikproxy writes it in.
            '-A KUBE-SERVICES -m comment --comment "a/b:p external IP" -m udp -p udp '
            "-d 203.0.113.5 --dport 5353 -j KUBE-EXT-AAAAAAAAAAAAAAAA",
            "-A KUBE-SERVICES -d fd00:96::10/128 -p udp -m udp --dport 53 -j KUBE-SVC-BBBB",
            "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-CCCC",
            "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            "-A KUBE-NODEPORTS -m comment --comment a/b:p -m udp -p udp --dport 30053 -j KUBE-EXT",
            "-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-C",
            "COMMIT",
        ]
    )
    frontends, node_ports = udp_frontends_in_rules(saved)
    assert frontends == {
        frontend("10.96.0.10", 53),
        frontend("203.0.113.5", 5353),
        frontend("fd00:96::10", 53),
    }
    assert node_ports == {30053}


def test_frontends_of_rules_left_by_a_previous_run_are_gone_unless_still_wanted() -> None:
    table = FakeFlowTable()
    table.set_addresses(IPV4, ["192.168.0.10"])
    eps = (make_endpoint("10.244.1.1", 8053),)
    kept = udp_flow("10.0.0.1", 1000, "10.96.0.10", 53, reply_src="10.244.1.1", reply_sport=8053)
    table.add(
        kept,
        udp_flow("10.0.0.1", 1001, "10.96.0.99", 53, reply_src="10.244.9.9", reply_sport=8053),
        udp_flow("10.0.0.1", 1002, "192.168.0.10", 30099, reply_src="10.244.9.9"),
    )
    reconciler = ConntrackReconciler(table)
    reconciler.remember_rules(
        IPV4,
        "-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-A\n"
        "-A KUBE-SERVICES -d 10.96.0.99/32 -p udp -m udp --dport 53 -j KUBE-SVC-B\n"
        "-A KUBE-NODEPORTS -p udp -m udp --dport 30099 -j KUBE-EXT-B\n",
    )
    no_nodeport = ServicePort(DNS.name, IPV4, "10.96.0.10", 53)
    result = reconciler.reconcile(state((no_nodeport, eps)), IptablesOptions())
    assert (result.stale, result.deleted) == (2, 2)
    assert table.flows == [kept]


def test_frontends_a_mode_read_itself_are_gone_unless_still_wanted() -> None:
    """remember_frontends: what nftables mode hands over from the table it found."""
    table = FakeFlowTable()
    table.set_addresses(IPV4, ["192.168.0.10"])
    eps = (make_endpoint("10.244.1.1", 8053),)
    kept = udp_flow("10.0.0.1", 1000, "10.96.0.10", 53, reply_src="10.244.1.1", reply_sport=8053)
    table.add(
        kept,
        udp_flow("10.0.0.1", 1001, "10.96.0.99", 53, reply_src="10.244.9.9", reply_sport=8053),
        udp_flow("10.0.0.1", 1002, "192.168.0.10", 30099, reply_src="10.244.9.9"),
    )
    reconciler = ConntrackReconciler(table)
    found = [frontend("10.96.0.10", 53), frontend("10.96.0.99", 53)]
    reconciler.remember_frontends(IPV4, found, [30099])
    no_nodeport = ServicePort(DNS.name, IPV4, "10.96.0.10", 53)
    result = reconciler.reconcile(state((no_nodeport, eps)), IptablesOptions())
    assert (result.stale, result.deleted) == (2, 2)
    assert table.flows == [kept]
