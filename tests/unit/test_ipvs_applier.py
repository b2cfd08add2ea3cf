"""The IPVS applier against fakes: diffing, partial applies (one endpoint change is one kernel
operation), kube-proxy's graceful termination, stale state removal, cleanup."""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.compile.ipvs import IPSETS, JUMPS, IpvsOptions, IpvsPlan, compile_ipvs, ipset_name
from minikproxy.dataplane.iptables import IptablesError
from minikproxy.dataplane.ipvs import (
    IpvsApplier,
    entry_from_netlink,
    entry_to_netlink,
)
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.testing.fake_iptables import FakeIptables
from minikproxy.testing.fake_ipvs import FakeIpvsKernel

NODE = NodeInfo("node-1", addresses=("10.0.0.1",))
OPTIONS = IpvsOptions(node_ip="10.0.0.1", node_addresses=("10.0.0.1",))
INFOS = {info.name: info for info in IPSETS}


def spn(name: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName("ns", name, "p", proto)  # type: ignore[arg-type]


def port(name: str, ip: str, proto: str = "TCP", **kw: Any) -> ServicePort:
    return ServicePort(spn(name, proto), IPV4, ip, 80, **kw)


def eps(*last_octets: int) -> tuple[Any, ...]:
    return tuple(make_endpoint(f"10.244.0.{n}", 8080) for n in sorted(last_octets))


def state(*ports: tuple[ServicePort, tuple[Any, ...]]) -> ProxyState:
    return ProxyState(
        family=IPV4,
        node=NODE,
        services={p.name: p for p, _ in ports},
        endpoints={p.name: e for p, e in ports},
    )


def setup(
    *ports: tuple[ServicePort, tuple[Any, ...]],
) -> tuple[IpvsApplier, FakeIpvsKernel, IpvsPlan]:
    kernel = FakeIpvsKernel()
    applier = IpvsApplier(kernel, FakeIptables(), IPV4)
    plan = compile_ipvs(state(*ports), OPTIONS)
    applier.apply(plan)
    return applier, kernel, plan


def step(
    applier: IpvsApplier,
    previous: IpvsPlan,
    *ports: tuple[ServicePort, tuple[Any, ...]],
    changed: Any,
) -> IpvsPlan:
    plan = compile_ipvs(state(*ports), OPTIONS, previous=previous, changed_services=changed)
    applier.apply(plan)
    return plan


def test_full_apply_builds_everything_and_again_changes_nothing() -> None:
    web = port("web", "10.96.0.1", node_port=30001)
    applier, kernel, plan = setup((web, eps(1, 2)))
    assert kernel.dummy and kernel.bound == {"10.96.0.1"}
    assert set(kernel.services_) == {("TCP", "10.96.0.1", 80), ("TCP", "10.0.0.1", 30001)}
    assert set(kernel.dests_[("TCP", "10.96.0.1", 80)]) == {
        ("10.244.0.1", 8080),
        ("10.244.0.2", 8080),
    }
    assert kernel.sets["KUBE-CLUSTER-IP"] == {"10.96.0.1,tcp:80"}
    assert kernel.sets["KUBE-NODE-PORT-TCP"] == {"30001"}
    assert len(kernel.sets) == len(IPSETS)
    assert "KUBE-IPVS-FILTER" in applier.iptables.dump()  # type: ignore[attr-defined]
    kernel.log.clear()
    applier.apply(plan, full=True)
    assert kernel.log == []


def test_one_endpoint_change_is_one_kernel_operation() -> None:
    services = [(port(f"s{k}", f"10.96.0.{k}"), eps(1, 2, 3)) for k in range(1, 30)]
    applier, kernel, plan = setup(*services)
    kernel.log.clear()
    services[4] = (services[4][0], eps(1, 2, 3, 4))
    plan = step(applier, plan, *services, changed={services[4][0].name.service})
    assert kernel.log == ["add-dest ('TCP', '10.96.0.5', 80) 10.244.0.4:8080"]


def test_a_service_added_or_removed_reads_no_whole_table() -> None:
    """A partial sync's cost must not grow with the cluster: adding a Service used to read
    every address on kube-ipvs0 first (seconds at 5k Services in the emulated VM)."""
    services = [(port(f"s{k}", f"10.96.0.{k}"), eps(1, 2)) for k in range(1, 30)]
    applier, kernel, plan = setup(*services)
    kernel.table_reads.clear()
    new = (port("new", "10.96.1.1", node_port=30009), eps(5))
    plan = step(applier, plan, *services, new, changed={new[0].name.service})
    assert "add-address 10.96.1.1" in kernel.log and "10.96.1.1" in kernel.bound
    plan = step(applier, plan, *services, changed={new[0].name.service})
    assert "delete-address 10.96.1.1" in kernel.log and "10.96.1.1" not in kernel.bound
    assert kernel.table_reads == []


def test_graceful_termination_tcp() -> None:
    web = port("web", "10.96.0.1")
    applier, kernel, plan = setup((web, eps(1, 2)))
    key, dest = ("TCP", "10.96.0.1", 80), ("10.244.0.2", 8080)
    kernel.set_connections(key, dest, active=1, inactive=0)
    kernel.log.clear()
    plan = step(applier, plan, (web, eps(1)), changed={web.name.service})
    assert kernel.log == [f"update-dest {key} 10.244.0.2:8080 w=0"]
    assert kernel.dests_[key][dest].weight == 0 and (key, dest) in applier.terminating
    kernel.log.clear()
    assert applier.process_terminating() == []  # still busy
    kernel.set_connections(key, dest, active=0, inactive=0)
    assert applier.process_terminating() == [(key, dest)]
    assert kernel.log == [f"delete-dest {key} 10.244.0.2:8080"]


def test_reappearing_endpoint_gets_its_weight_back() -> None:
    web = port("web", "10.96.0.1")
    applier, kernel, plan = setup((web, eps(1, 2)))
    key, dest = ("TCP", "10.96.0.1", 80), ("10.244.0.2", 8080)
    kernel.set_connections(key, dest, active=0, inactive=3)
    plan = step(applier, plan, (web, eps(1)), changed={web.name.service})
    assert kernel.dests_[key][dest].weight == 0
    kernel.log.clear()
    plan = step(applier, plan, (web, eps(1, 2)), changed={web.name.service})
    assert kernel.log == [f"update-dest {key} 10.244.0.2:8080 w=1"]
    assert (key, dest) not in applier.terminating


def test_udp_and_idle_tcp_real_servers_go_at_once() -> None:
    dns = port("dns", "10.96.0.10", "UDP")
    web = port("web", "10.96.0.1")
    applier, kernel, plan = setup((dns, eps(1, 2)), (web, eps(1, 2)))
    kernel.set_connections(("UDP", "10.96.0.10", 80), ("10.244.0.2", 8080), 0, 5)
    kernel.log.clear()
    step(applier, plan, (dns, eps(1)), (web, eps(1)), changed={dns.name.service, web.name.service})
    assert sorted(kernel.log) == [
        "delete-dest ('TCP', '10.96.0.1', 80) 10.244.0.2:8080",
        "delete-dest ('UDP', '10.96.0.10', 80) 10.244.0.2:8080",
    ]
    assert len(applier.terminating) == 0


def test_removed_service_loses_everything_it_alone_owned() -> None:
    a = port("a", "10.96.0.1", external_ips=("192.0.2.1",))
    b = port("b", "10.96.0.2", external_ips=("192.0.2.1",))  # shares the external IP
    applier, kernel, plan = setup((a, eps(1)), (b, eps(2)))
    kernel.log.clear()
    step(applier, plan, (b, eps(2)), changed={a.name.service})
    assert ("TCP", "10.96.0.1", 80) not in kernel.services_
    assert kernel.bound == {"10.96.0.2", "192.0.2.1"}
    assert kernel.sets["KUBE-CLUSTER-IP"] == {"10.96.0.2,tcp:80"}
    # The shared external-IP virtual server stays (b wants it) ...
    assert ("TCP", "192.0.2.1", 80) in kernel.services_
    assert "delete-address 192.0.2.1" not in kernel.log


def test_full_apply_repairs_tampering_and_keeps_excluded_services() -> None:
    web = port("web", "10.96.0.1")
    applier, kernel, _ = setup((web, eps(1)))
    kernel.delete_service(("TCP", "10.96.0.1", 80))
    kernel.sets["KUBE-CLUSTER-IP"].clear()
    kernel.bound.clear()
    kernel.services_[("TCP", "10.1.2.3", 80)] = kernel.services_.get(
        ("TCP", "10.1.2.3", 80),
        ("rr", 0, 0),  # type: ignore[arg-type]
    )
    kernel.services_[("TCP", "172.16.0.9", 80)] = ("rr", 0, 0)  # type: ignore[assignment]
    options = IpvsOptions(
        node_ip="10.0.0.1", node_addresses=("10.0.0.1",), exclude_cidrs=("172.16.0.0/12",)
    )
    applier.apply(compile_ipvs(state((web, eps(1))), options), full=True)
    assert set(kernel.services_) == {("TCP", "10.96.0.1", 80), ("TCP", "172.16.0.9", 80)}
    assert kernel.sets["KUBE-CLUSTER-IP"] == {"10.96.0.1,tcp:80"} and kernel.bound == {"10.96.0.1"}


def test_cleanup_twice() -> None:
    web = port("web", "10.96.0.1", node_port=30001)
    applier, kernel, _ = setup((web, eps(1)))
    removed = applier.cleanup()
    assert kernel.services_ == {} and kernel.bound == set() and kernel.sets == {}
    assert "nat chain KUBE-SERVICES" in removed and "ipset KUBE-CLUSTER-IP" in removed
    assert applier.iptables.dump().count("KUBE-") == 0  # type: ignore[attr-defined]
    assert applier.cleanup() == []


def test_entry_netlink_round_trip() -> None:
    cases = {
        "KUBE-CLUSTER-IP": "10.96.0.1,tcp:80",
        "KUBE-LOOP-BACK": "10.244.0.1,udp:53,10.244.0.1",
        "KUBE-LOAD-BALANCER-SOURCE-CIDR": "1.2.3.4,sctp:80,10.0.0.0/8",
        "KUBE-NODE-PORT-TCP": "30080",
        "KUBE-IPVS-IPS": "fd00::1",
    }
    for set_name, entry in cases.items():
        info = INFOS[set_name]
        value, etype = entry_to_netlink(info, entry)
        assert etype in ("ip", "port", "ip,port", "ip,port,ip", "ip,port,net")
        attrs: dict[str, Any] = {}
        if etype == "port":
            attrs["IPSET_ATTR_PORT_FROM"] = value
        elif etype == "ip":
            attrs["IPSET_ATTR_IP_FROM"] = value
        else:
            attrs["IPSET_ATTR_IP_FROM"] = value[0]
            attrs["IPSET_ATTR_PORT_FROM"] = value[1].port
            attrs["IPSET_ATTR_PROTO"] = value[1].protocol
            if etype == "ip,port,ip":
                attrs["IPSET_ATTR_IP2"] = value[2]
            elif etype == "ip,port,net":
                net, cidr = value[2].split("/")
                attrs["IPSET_ATTR_IP2"], attrs["IPSET_ATTR_CIDR2"] = net, int(cidr)
        assert entry_from_netlink(info, attrs) == entry
    assert ipset_name("KUBE-CLUSTER-IP", "IPv6") == "KUBE-6-CLUSTER-IP"


class RecordingBulk:
    def __init__(self) -> None:
        self.texts: dict[str, str] = {}

    def ipvsadm_restore(self, text: str) -> None:
        self.texts["ipvsadm"] = text

    def ipset_restore(self, text: str) -> None:
        self.texts["ipset"] = text

    def ip_batch(self, text: str) -> None:
        self.texts["ip"] = text


def test_initial_load_goes_in_bulk_and_small_changes_do_not() -> None:
    services = [(port(f"s{k}", f"10.96.{k // 200}.{k % 200 + 1}"), eps(1, 2)) for k in range(300)]
    kernel, bulk = FakeIpvsKernel(), RecordingBulk()
    applier = IpvsApplier(kernel, FakeIptables(), IPV4, bulk)
    plan = compile_ipvs(state(*services), OPTIONS)
    applier.apply(plan)
    assert bulk.texts["ipvsadm"].count("\n-A ") + 1 == 300  # every service, none by netlink
    assert bulk.texts["ipvsadm"].count("-m -w 1\n") == 600
    assert bulk.texts["ip"].count("address add ") == 300
    assert bulk.texts["ipset"].count("add KUBE-CLUSTER-IP ") == 300
    assert not any(line.startswith(("add-service", "add-dest", "add-entry")) for line in kernel.log)
    small = RecordingBulk()
    other = IpvsApplier(FakeIpvsKernel(), FakeIptables(), IPV4, small)
    other.apply(compile_ipvs(state(*services[:3]), OPTIONS))
    assert small.texts == {}


def builtin_rules(ipt: FakeIptables) -> list[str]:
    """The rules of the built-in chains (the jumps), in each table's order."""
    builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
    return [
        line
        for table in ("nat", "filter")
        for line in ipt.save(table).decode().splitlines()
        if line.startswith("-A ") and line.split()[1] in builtin
    ]


def test_full_apply_prepends_missing_jumps_in_its_one_restore() -> None:
    ipt = FakeIptables()
    ipt.restore(b"*filter\n-A INPUT -j ACCEPT\nCOMMIT\n")  # someone else's rule stays last
    applier = IpvsApplier(FakeIpvsKernel(), ipt, IPV4)
    plan = compile_ipvs(state((port("web", "10.96.0.1"), eps(1))), OPTIONS)
    before = ipt.restore_count
    applier.apply(plan)
    assert ipt.restore_count == before + 1
    rules = builtin_rules(ipt)
    # kube-proxy prepends each jump in turn: the last one of a chain ends up first
    assert rules[:4] == [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
    ]
    assert rules[4:6] == [
        '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT',
    ]
    assert "-A INPUT -j ACCEPT" in rules[6:]
    assert len(rules) == len(JUMPS) + 1
    # again: nothing duplicated; a jump removed by someone comes back first in its chain
    applier.apply(plan, full=True)
    assert builtin_rules(ipt) == rules
    ipt.restore(
        b'*nat\n-D OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        b"-A OUTPUT -j RETURN\nCOMMIT\n"
    )
    applier.apply(plan, full=True)
    nat_output = [
        r for r in builtin_rules(ipt) if r.startswith("-A OUTPUT") and "KUBE-IPVS" not in r
    ]
    assert nat_output == [rules[1], "-A OUTPUT -j RETURN"]


def test_a_failing_save_fails_the_full_apply_instead_of_duplicating_jumps() -> None:
    """Only a table that does not exist has no jumps: any other iptables-save failure (a
    timeout, a busy lock) must fail the sync, not make every jump look missing."""
    ipt = FakeIptables()
    applier = IpvsApplier(FakeIpvsKernel(), ipt, IPV4)
    plan = compile_ipvs(state((port("web", "10.96.0.1"), eps(1))), OPTIONS)
    applier.apply(plan)
    rules = builtin_rules(ipt)
    real_save = ipt.save

    def timed_out(table: str) -> bytes:
        raise IptablesError("iptables-save timed out", stderr="timed out after 300 s")

    ipt.save = timed_out  # type: ignore[method-assign]
    with pytest.raises(IptablesError, match="timed out"):
        applier.apply(plan, full=True)
    ipt.save = real_save  # type: ignore[method-assign]
    assert builtin_rules(ipt) == rules
    applier.apply(plan, full=True)
    assert builtin_rules(ipt) == rules
