"""The IPVS compiler: ipsets, virtual/real servers, bound addresses and iptables rules, with
expectations taken from kube-proxy's pkg/proxy/ipvs/proxier_test.go where it has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from minikproxy.compile.ipvs import (
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    IPSETS,
    IpvsOptions,
    IpvsPlan,
    compile_ipvs,
    ipset_name,
)
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.config import ProxyConfig
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.render import render_objects
from minikproxy.sources.manifests import load_manifests

DATA = Path(__file__).parent.parent / "data"
NODE = NodeInfo("node-1", addresses=("10.0.0.1",))
DETECTOR = make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=("10.244.0.0/16",))
OPTIONS = IpvsOptions(
    family=IPV4, local_detector=DETECTOR, node_ip="10.0.0.1", node_addresses=("10.0.0.1",)
)


def spn(name: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName("ns", name, "p", proto)  # type: ignore[arg-type]


def eps(n: int, local: int = 0, port: int = 8080) -> tuple[Any, ...]:
    return tuple(
        make_endpoint(f"10.244.1.{k + 1}", port, is_local=k < local, node_name="node-1")
        for k in range(n)
    )


def state(*ports: tuple[ServicePort, tuple[Any, ...]], family: IPFamily = IPV4) -> ProxyState:
    return ProxyState(
        family=family,
        node=NODE,
        services={p.name: p for p, _ in ports},
        endpoints={p.name: e for p, e in ports},
    )


def plan_of(
    *ports: tuple[ServicePort, tuple[Any, ...]], options: IpvsOptions = OPTIONS
) -> IpvsPlan:
    return compile_ipvs(state(*ports, family=options.family), options)


def chain(plan: IpvsPlan, table: str, name: str) -> list[str]:
    return [
        line.rstrip("\n") for line in plan.iptables_rules[table] if line.startswith(f"-A {name} ")
    ]


def jumps(lines: list[str]) -> list[tuple[str, str]]:
    """(target, matched set or "") per rule, as proxier_test.go's ExpectedIptablesChain."""
    out = []
    for line in lines:
        words = line.split()
        target = words[words.index("-j") + 1]
        match_set = words[words.index("--match-set") + 1] if "--match-set" in words else ""
        out.append((target, match_set))
    return out


def test_cluster_ip_without_endpoints_still_gets_a_virtual_server() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    plan = plan_of((port, ()))
    (vs,) = plan.virtual_servers.values()
    assert vs.key == ("TCP", "10.96.0.10", 80)
    assert vs.real_servers == () and vs.scheduler == "rr" and vs.flags == 0
    assert plan.bind_addresses == ("10.96.0.10",)
    assert plan.ipset_entries["KUBE-CLUSTER-IP"] == {"10.96.0.10,tcp:80"}
    assert plan.ipset_entries["KUBE-IPVS-IPS"] == {"10.96.0.10"}


def test_load_balancer_source_ranges() -> None:
    """proxier_test.go TestLoadBalancerSourceRanges: 2 virtual servers, 3 sets, the chains."""
    port = ServicePort(
        spn("lb"),
        IPV4,
        "10.20.30.41",
        80,
        load_balancer_vips=("1.2.3.4",),
        load_balancer_source_ranges=("1.2.3.4/16",),
    )
    plan = plan_of((port, (make_endpoint("10.180.0.1", 80),)))
    assert len(plan.virtual_servers) == 2
    lb = plan.virtual_servers[("TCP", "1.2.3.4", 80)]
    assert lb.real_servers == (("10.180.0.1", 80),)
    sets = plan.ipset_entries
    assert sets["KUBE-LOAD-BALANCER"] == {"1.2.3.4,tcp:80"}
    assert sets["KUBE-LOAD-BALANCER-FW"] == {"1.2.3.4,tcp:80"}
    assert sets["KUBE-LOAD-BALANCER-SOURCE-CIDR"] == {"1.2.3.4,tcp:80,1.2.3.4/16"}
    assert jumps(chain(plan, "nat", "KUBE-SERVICES")) == [
        ("RETURN", ""),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-LOAD-BALANCER"),
    ]
    assert jumps(chain(plan, "filter", "KUBE-PROXY-FIREWALL")) == [
        ("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW")
    ]
    assert jumps(chain(plan, "filter", "KUBE-SOURCE-RANGES-FIREWALL")) == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("DROP", ""),
    ]
    # The node (10.0.0.1) is outside the ranges: it may not reach the LB (#119656).
    assert chain(plan, "filter", "KUBE-IPVS-OUT-FILTER") == [
        "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP"
    ]


def test_source_range_including_the_node_allows_it() -> None:
    port = ServicePort(
        spn("lb"),
        IPV4,
        "10.96.0.1",
        80,
        load_balancer_vips=("1.2.3.4",),
        load_balancer_source_ranges=("10.0.0.0/24",),
    )
    plan = plan_of((port, eps(1)))
    assert plan.ipset_entries["KUBE-LOAD-BALANCER-SOURCE-IP"] == {"1.2.3.4,tcp:80,1.2.3.4"}
    assert chain(plan, "filter", "KUBE-IPVS-OUT-FILTER") == []
    assert jumps(chain(plan, "filter", "KUBE-SOURCE-RANGES-FIREWALL")) == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-IP"),
        ("DROP", ""),
    ]


def test_only_local_nodeports() -> None:
    """proxier_test.go TestOnlyLocalNodePorts: a VS per node IP with only local endpoints,
    the port in both NodePort sets, the -LOCAL set matched first."""
    port = ServicePort(
        spn("np"), IPV4, "10.20.30.41", 80, node_port=3001, external_policy_local=True
    )
    endpoints = (
        make_endpoint("10.180.0.1", 80, is_local=False),
        make_endpoint("10.180.2.1", 80, is_local=True),
    )
    options = IpvsOptions(
        family=IPV4, node_ip="100.101.102.103", node_addresses=("100.101.102.103",)
    )
    plan = plan_of((port, endpoints), options=options)
    nodeport = plan.virtual_servers[("TCP", "100.101.102.103", 3001)]
    assert nodeport.real_servers == (("10.180.2.1", 80),)
    # ClusterIP traffic keeps the cluster-wide endpoints.
    assert len(plan.virtual_servers[("TCP", "10.20.30.41", 80)].real_servers) == 2
    assert plan.ipset_entries["KUBE-NODE-PORT-TCP"] == {"3001"}
    assert plan.ipset_entries["KUBE-NODE-PORT-LOCAL-TCP"] == {"3001"}
    assert jumps(chain(plan, "nat", "KUBE-NODE-PORT")) == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
    ]
    assert plan.ipset_entries["KUBE-LOOP-BACK"] == {"10.180.2.1,tcp:80,10.180.2.1"}
    assert "100.101.102.103" not in plan.bind_addresses  # NodePort IPs are never bound


def test_local_policy_without_local_endpoints_falls_back_to_cluster() -> None:
    """kube-proxy #97081: pods can still reach the service; the no-local metric counts it."""
    port = ServicePort(
        spn("np"), IPV4, "10.96.0.1", 80, node_port=30001, external_policy_local=True
    )
    plan = plan_of((port, eps(2)))
    assert len(plan.virtual_servers[("TCP", "10.0.0.1", 30001)].real_servers) == 2
    svc = plan.services[port.name]
    assert svc.no_local_external and not svc.no_local_internal


def test_internal_policy_local() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.1", 80, internal_policy_local=True)
    plan = plan_of((port, eps(3, local=1)))
    assert plan.virtual_servers[("TCP", "10.96.0.1", 80)].real_servers == (("10.244.1.1", 8080),)


def test_terminating_fallback() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.1", 80)
    endpoints = (
        make_endpoint("10.244.1.1", 8080, ready=False, serving=True, terminating=True),
        make_endpoint("10.244.1.2", 8080, ready=False, serving=False, terminating=True),
    )
    plan = plan_of((port, endpoints))
    assert plan.virtual_servers[("TCP", "10.96.0.1", 80)].real_servers == (("10.244.1.1", 8080),)


def test_session_affinity_and_mh() -> None:
    port = ServicePort(
        spn("web", "UDP"),
        IPV4,
        "10.96.0.1",
        53,
        session_affinity_client_ip=True,
        sticky_max_age_seconds=60,
    )
    plan = plan_of((port, eps(1, port=53)), options=IpvsOptions(scheduler="mh"))
    (vs,) = plan.virtual_servers.values()
    assert vs.flags == FLAG_PERSISTENT | FLAG_SOURCE_HASH and vs.timeout == 60
    assert plan.render_ipvs() == (
        "-A -u 10.96.0.1:53 -s mh -p 60 -b mh-port\n-a -u 10.96.0.1:53 -r 10.244.1.1:53 -m -w 1\n"
    )


def test_external_ip_on_a_node_address_is_not_bound() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.1", 80, external_ips=("10.0.0.1", "192.0.2.5"))
    plan = plan_of((port, eps(1)))
    assert plan.bind_addresses == ("10.96.0.1", "192.0.2.5")
    assert ("TCP", "10.0.0.1", 80) in plan.virtual_servers
    assert plan.ipset_entries["KUBE-EXTERNAL-IP"] == {"10.0.0.1,tcp:80", "192.0.2.5,tcp:80"}


def test_nodeport_addresses_skip_loopback_and_sctp_uses_hash_set() -> None:
    port = ServicePort(spn("s", "SCTP"), IPV4, "10.96.0.1", 90, node_port=30090)
    options = IpvsOptions(nodeport_addresses=("127.0.0.1", "10.0.0.1", "10.0.0.2"))
    plan = plan_of((port, eps(1, port=9090)), options=options)
    assert sorted(k for k in plan.virtual_servers if k[2] == 30090) == [
        ("SCTP", "10.0.0.1", 30090),
        ("SCTP", "10.0.0.2", 30090),
    ]
    assert plan.ipset_entries["KUBE-NODE-PORT-SCTP-HASH"] == {
        "10.0.0.1,sctp:30090",
        "10.0.0.2,sctp:30090",
    }
    assert "--sctp-service 10.0.0.1:30090" in plan.render_ipvs()


def test_nodeport_without_node_ips_skips_health_check_port_too() -> None:
    port = ServicePort(
        spn("np"), IPV4, "10.96.0.1", 80, node_port=30001, health_check_node_port=32000
    )
    plan = plan_of((port, eps(1)), options=IpvsOptions())
    assert plan.ipset_entries["KUBE-HEALTH-CHECK-NODE-PORT"] == set()
    plan = plan_of((port, eps(1)))
    assert plan.ipset_entries["KUBE-HEALTH-CHECK-NODE-PORT"] == {"32000"}


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (
            IpvsOptions(masquerade_all=True),
            '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
            'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ',
        ),
        (
            OPTIONS,
            '-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service '
            'cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP '
            "dst,dst -j KUBE-MARK-MASQ",
        ),
        (
            IpvsOptions(),
            '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
            'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ',
        ),
    ],
    ids=["masquerade-all", "cluster-cidr", "no-detector"],
)
def test_cluster_ip_masquerade(options: IpvsOptions, rule: str) -> None:
    plan = plan_of((ServicePort(spn("web"), IPV4, "10.96.0.1", 80), eps(1)), options=options)
    assert chain(plan, "nat", "KUBE-SERVICES")[1] == rule


def test_ipv6_set_names_and_addresses() -> None:
    assert ipset_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", IPV6) == "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert all(len(ipset_name(info.name, IPV6)) <= 31 for info in IPSETS)
    port = ServicePort(spn("web"), IPV6, "fd00::10", 80)
    options = IpvsOptions(family=IPV6)
    plan = compile_ipvs(state((port, (make_endpoint("fd00:1::2", 8080),)), family=IPV6), options)
    text = plan.render()
    assert (
        "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536\n" in text
    )
    assert "add KUBE-6-CLUSTER-IP fd00::10,tcp:80\n" in text
    assert "-a -t [fd00::10]:80 -r [fd00:1::2]:8080 -m -w 1\n" in text
    assert "fd00::10/128 dev kube-ipvs0\n" in text
    assert "-A KUBE-SERVICES -s ::1/128 -j RETURN\n" in text


def test_render_sections_and_determinism() -> None:
    ports = [
        (ServicePort(spn(f"s{k}"), IPV4, f"10.96.0.{k}", 80, node_port=30000 + k), eps(k % 4))
        for k in range(1, 20)
    ]
    first = plan_of(*ports).render()
    again = plan_of(*reversed(ports)).render()
    assert first == again
    headers = [line for line in first.splitlines() if line.startswith("# ")]
    assert headers == ["# ipset", "# ipvs", "# addresses", "# iptables"]


def test_incremental_compile_matches_full_and_names_changes() -> None:
    a = ServicePort(spn("a"), IPV4, "10.96.0.1", 80)
    b = ServicePort(spn("b"), IPV4, "10.96.0.2", 80)
    old = plan_of((a, eps(2)), (b, eps(1)))
    new_state = state((a, eps(3)), (b, eps(1)))
    inc = compile_ipvs(
        new_state, OPTIONS, previous=old, changed_services={a.name.service, b.name.service}
    )
    assert inc.changed == {a.name}
    assert inc.render() == compile_ipvs(new_state, OPTIONS).render()
    gone = compile_ipvs(
        state((b, eps(1))), OPTIONS, previous=inc, changed_services={a.name.service}
    )
    assert gone.changed == {a.name} and gone.replaced[a.name].name == a.name
    assert "10.96.0.1" not in gone.bind_addresses


def test_render_overall_cluster_golden() -> None:
    """kube-proxy's TestOverallIPTablesRules objects, in IPVS mode (loaded and read back in an
    IPVS kernel by tests/kernel/test_ipvs_vm.py's render test)."""
    objects = load_manifests([str(DATA / "overall-cluster.yaml")], [])
    config = ProxyConfig(mode="ipvs", cluster_cidr="10.0.0.0/8")
    result = render_objects(objects, config, families=(IPV4,), node_addresses=("192.168.0.2",))
    golden = (DATA / "overall-cluster.ipvs.ipv4.golden").read_text()
    assert "".join(result.parts[IPV4]) == golden


def test_render_service_filter() -> None:
    objects = load_manifests([str(DATA / "overall-cluster.yaml")], [])
    config = ProxyConfig(mode="ipvs", cluster_cidr="10.0.0.0/8")
    full = render_objects(objects, config, families=(IPV4,), node_addresses=("192.168.0.2",))
    plan = full.rulesets[IPV4]
    name = plan.order[0]
    only = render_objects(
        objects,
        config,
        families=(IPV4,),
        node_addresses=("192.168.0.2",),
        services=[NamespacedName(name.namespace, name.name)],
    )
    text = "".join(only.parts[IPV4])
    cluster_ip = plan.services[name].virtual_servers[0].address
    assert f"-A -t {cluster_ip}:" in text and f"add KUBE-IPVS-IPS {cluster_ip}\n" in text
    other = plan.services[plan.order[-1]].virtual_servers[0].address
    assert other not in text


def test_cli_render_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    from minikproxy.cli import main

    argv = ["render", "--proxy-mode", "ipvs", "-f", str(DATA / "overall-cluster.yaml")]
    assert main([*argv, "--ipvs-scheduler", "wlc", "--node-addresses", "192.168.0.2"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("# ")]
    sections = ["# ipset", "# ipvs", "# addresses", "# iptables"]
    assert headers == ["# IPv4", *sections, "# IPv6", *sections]
    assert "-A -t 192.168.0.2:3001 -s wlc\n" in out
    assert main([*argv, "--ipvs-scheduler", "fifo"]) == 2
    assert "--ipvs-scheduler: unknown scheduler 'fifo'" in capsys.readouterr().err
