"""The flat nftables compiler: elements per service port, skeleton, determinism, CLI render."""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from minikproxy.cli import main
from minikproxy.compile.nftables import (
    AFFINITY_PORTS,
    DIGEST_SEEDS,
    ELEMENT_SETS,
    NftablesRuleset,
    compile_nftables,
    compile_service_port,
)
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.config import ProxyConfig
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
CLUSTER = str(EXAMPLES / "cluster")
NODE = NodeInfo("node-1", addresses=("10.0.0.1",))
OPTIONS = NftablesOptions(
    family=IPV4,
    local=LocalMatch("saddr", "10.244.0.0/16"),
    node_ip="10.0.0.1",
    nodeport_addresses=("10.0.0.1",),
    service_cidrs=("10.96.0.0/16",),
)
OPTIONS6 = NftablesOptions(family=IPV6, node_ip="fd00::1", nodeport_addresses=("fd00::1",))


def spn(name: str, proto: str = "TCP") -> ServicePortName:
    return ServicePortName("ns", name, "p", proto)  # type: ignore[arg-type]


def eps(n: int, local: int = 0) -> tuple[Any, ...]:
    return tuple(
        make_endpoint(f"10.244.1.{k + 1}", 8080, is_local=k < local, node_name="node-1")
        for k in range(n)
    )


def state(*ports: tuple[ServicePort, tuple[Any, ...]], family: IPFamily = IPV4) -> ProxyState:
    return ProxyState(
        family=family,
        node=NODE,
        services={p.name: p for p, _ in ports},
        endpoints={p.name: e for p, e in ports},
    )


def elements(port: ServicePort, endpoints: tuple[Any, ...], options: NftablesOptions = OPTIONS):
    result = compile_nftables(state((port, endpoints)), options)
    return result.services[port.name].elements


def of(items: tuple[tuple[str, str], ...], setname: str) -> list[str]:
    return [text for s, text in items if s == setname]


def test_cluster_ip_elements() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    items = elements(port, eps(3))
    assert of(items, "cluster-ips") == ["10.96.0.10"]
    assert of(items, "cluster-vips") == ["10.96.0.10 . tcp . 80"]
    assert of(items, "service-dispatch") == ["10.96.0.10 . tcp . 80 : goto pick-3"]
    assert of(items, "cluster-endpoints-tcp") == [
        "10.96.0.10 . 80 . 0 : 10.244.1.1 . 8080",
        "10.96.0.10 . 80 . 1 : 10.244.1.2 . 8080",
        "10.96.0.10 . 80 . 2 : 10.244.1.3 . 8080",
    ]
    assert of(items, "hairpin") == [f"10.244.1.{k} . 10.244.1.{k}" for k in (1, 2, 3)]
    assert of(items, "no-endpoint-services") == []


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 33, 100])
def test_selection_is_exact_by_structure(n: int) -> None:
    """``numgen random mod n`` over indices 0..n-1, one endpoint each: every share is 1/n."""
    port = ServicePort(spn("web", "UDP"), IPV4, "10.96.0.10", 53)
    endpoints = tuple(make_endpoint(f"10.244.{k // 200}.{k % 200 + 1}", 53) for k in range(n))
    ruleset = compile_nftables(state((port, endpoints)), OPTIONS)
    items = of(ruleset.services[port.name].elements, "cluster-endpoints-udp")
    indices = [int(t.split(" : ")[0].rsplit(" . ", 1)[1]) for t in items]
    targets = [t.split(" : ")[1] for t in items]
    assert sorted(indices) == list(range(n))
    assert sorted(targets) == sorted(f"{e.ip} . 53" for e in endpoints)
    script = ruleset.render()
    assert (
        f"add rule ip minikproxy pick-{n} meta l4proto udp dnat ip to ip daddr . udp dport . "
        f"numgen random mod {n} map @cluster-endpoints-udp\n" in script
    )


def test_no_endpoints_reject_every_frontend() -> None:
    port = ServicePort(
        spn("web"), IPV4, "10.96.0.10", 80, node_port=30080, external_ips=("192.0.2.7",)
    )
    items = elements(port, ())
    assert of(items, "no-endpoint-services") == [
        "10.96.0.10 . tcp . 80 : goto reject-chain",
        "192.0.2.7 . tcp . 80 : goto reject-chain",
        "10.0.0.1 . tcp . 30080 : goto reject-chain",
    ]
    assert of(items, "service-dispatch") == []


def test_external_policy_cluster_masquerades_external_frontends() -> None:
    port = ServicePort(
        spn("web"),
        IPV4,
        "10.96.0.10",
        80,
        node_port=30080,
        load_balancer_vips=("198.51.100.9",),
    )
    items = elements(port, eps(2))
    assert of(items, "external-masq") == ["198.51.100.9 . tcp . 80", "10.0.0.1 . tcp . 30080"]
    assert "10.0.0.1 . tcp . 30080 : goto pick-2" in of(items, "service-dispatch")


def test_external_policy_local() -> None:
    port = ServicePort(
        spn("web"), IPV4, "10.96.0.10", 80, node_port=30080, external_policy_local=True
    )
    items = elements(port, eps(3, local=1))
    key = "10.0.0.1 . tcp . 30080"
    assert f"{key} : goto external-local" in of(items, "service-dispatch")
    assert of(items, "cluster-dispatch") == [f"{key} : goto pick-3"]
    assert of(items, "local-dispatch") == [f"{key} : goto local-pick-1"]
    assert of(items, "local-endpoints-tcp") == ["10.0.0.1 . 30080 . 0 : 10.244.1.1 . 8080"]
    assert of(items, "external-masq") == []
    # No local endpoint: external sources are dropped (filter side); pods and the node still
    # reach every endpoint through external-local (as kube-proxy's short-circuits).
    items = elements(port, tuple(e._replace(is_local=False) for e in eps(3)))
    assert of(items, "no-endpoint-services") == [f"{key} : drop"]
    assert of(items, "service-dispatch") == [
        "10.96.0.10 . tcp . 80 : goto pick-3",
        f"{key} : goto external-local",
    ]
    assert of(items, "cluster-dispatch") == [f"{key} : goto pick-3"]
    assert of(items, "local-dispatch") == []


def test_internal_policy_local() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80, internal_policy_local=True)
    items = elements(port, eps(3, local=2))
    assert of(items, "service-dispatch") == ["10.96.0.10 . tcp . 80 : goto pick-2"]
    items = elements(port, eps(3))
    assert of(items, "no-endpoint-services") == ["10.96.0.10 . tcp . 80 : drop"]


def test_terminating_fallback() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    terminating = (make_endpoint("10.244.1.9", 8080, ready=False, serving=True, terminating=True),)
    items = elements(port, terminating)
    assert of(items, "cluster-endpoints-tcp") == ["10.96.0.10 . 80 . 0 : 10.244.1.9 . 8080"]


def test_affinity_and_source_ranges() -> None:
    port = ServicePort(
        spn("web"),
        IPV4,
        "10.96.0.10",
        80,
        load_balancer_vips=("198.51.100.9",),
        load_balancer_source_ranges=("10.0.0.0/24", "192.0.2.0/24"),
        session_affinity_client_ip=True,
        sticky_max_age_seconds=600,
    )
    ruleset = compile_nftables(state((port, eps(2))), OPTIONS)
    items = ruleset.services[port.name].elements
    assert of(items, "affinity-timeouts") == [
        "10.96.0.10 . tcp . 80 : goto affinity-600",
        "198.51.100.9 . tcp . 80 : goto affinity-600",
    ]
    assert of(items, "firewall-ips") == ["198.51.100.9 . tcp . 80"]
    # The node IP is inside a range, so the node may reach its own load balancer.
    assert of(items, "firewall-allow") == [
        "198.51.100.9 . tcp . 80 . 10.0.0.0/24",
        "198.51.100.9 . tcp . 80 . 192.0.2.0/24",
        "198.51.100.9 . tcp . 80 . 198.51.100.9",
    ]
    assert "add chain ip minikproxy affinity-600\n" in ruleset.render()


def test_ipv6_and_sctp() -> None:
    port = ServicePort(spn("web", "SCTP"), IPV6, "fd00::10", 80)
    options = NftablesOptions(family=IPV6, node_ip="fd00::1")
    ruleset = compile_nftables(
        state((port, (make_endpoint("fd00:1::2", 8080),)), family=IPV6), options
    )
    assert of(ruleset.services[port.name].elements, "cluster-endpoints-sctp") == [
        "fd00::10 . 80 . 0 : fd00:1::2 . 8080"
    ]
    script = ruleset.render()
    assert script.startswith("add table ip6 minikproxy\ndelete table ip6 minikproxy\n")
    assert "dnat ip6 to ip6 daddr . sctp dport . numgen random mod 1 map" in script


def test_masquerade_modes() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    for options, rule in (
        (OPTIONS, "@cluster-vips ip saddr != 10.244.0.0/16 jump mark-for-masquerade"),
        (
            NftablesOptions(local=LocalMatch("iifname", "veth*")),
            '@cluster-vips iifname != "veth*" jump mark-for-masquerade',
        ),
        (NftablesOptions(masquerade_all=True), "@cluster-vips jump mark-for-masquerade"),
    ):
        assert rule in compile_nftables(state((port, eps(1))), options).render()
    assert "@cluster-vips" not in "".join(
        line
        for line in compile_nftables(state((port, eps(1))), NftablesOptions()).render_parts()
        if line.startswith("add rule")
    )


def test_loopback_nodeport_addresses_are_skipped() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80, node_port=30080)
    options = NftablesOptions(nodeport_addresses=("127.0.0.1", "10.0.0.1"))
    items = elements(port, eps(1), options)
    assert of(items, "service-dispatch") == [
        "10.96.0.10 . tcp . 80 : goto pick-1",
        "10.0.0.1 . tcp . 30080 : goto pick-1",
    ]


def test_service_cidr_drop_rule() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    script = compile_nftables(state((port, eps(1))), OPTIONS).render()
    assert "add rule ip minikproxy cluster-ips-check ip daddr @cluster-ips reject\n" in script
    assert "cluster-ips-check ip daddr { 10.96.0.0/16 } drop\n" in script
    no_cidr = compile_nftables(state((port, eps(1))), NftablesOptions()).render()
    assert "} drop\n" not in no_cidr


def test_only_needed_count_chains_and_deterministic_order() -> None:
    a = (ServicePort(spn("a"), IPV4, "10.96.0.1", 80), eps(2))
    b = (ServicePort(spn("b"), IPV4, "10.96.0.2", 80), eps(5))
    one = compile_nftables(state(a, b), OPTIONS)
    two = compile_nftables(state(b, a), OPTIONS)
    assert one.render() == two.render()
    chains = re.findall(r"^add chain ip minikproxy (pick-\d+)$", one.render(), re.MULTILINE)
    assert chains == ["pick-2", "pick-5"]


def test_endpoint_change_is_element_only() -> None:
    """Changing endpoints (same count) leaves the skeleton identical: only elements differ."""
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    before = compile_nftables(state((port, eps(3))), OPTIONS)
    moved = tuple(make_endpoint(f"10.244.2.{k}", 8080) for k in range(3))
    after = compile_nftables(state((port, moved)), OPTIONS)
    assert before.skeleton == after.skeleton
    assert before.services[port.name].elements != after.services[port.name].elements


def test_element_sets_are_all_declared() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    script = compile_nftables(state((port, eps(1))), OPTIONS).render()
    for name in ELEMENT_SETS:
        if name != AFFINITY_PORTS:  # IPv6 only
            assert re.search(rf"^add (set|map) ip minikproxy {name} ", script, re.M), name
    port6 = ServicePort(spn("web"), IPV6, "fd00::10", 80)
    script6 = compile_nftables(state((port6, ()), family=IPV6), OPTIONS6).render()
    for name in ELEMENT_SETS:
        assert re.search(rf"^add (set|map) ip6 minikproxy {name} ", script6, re.M), name


def test_shared_elements_are_written_once() -> None:
    a = ServicePort(ServicePortName("ns", "web", "a", "TCP"), IPV4, "10.96.0.10", 80)
    b = ServicePort(ServicePortName("ns", "web", "b", "TCP"), IPV4, "10.96.0.10", 81)
    script = compile_nftables(state((a, eps(1)), (b, eps(1))), OPTIONS).render()
    assert "add element ip minikproxy cluster-ips { 10.96.0.10 }\n" in script
    assert "add element ip minikproxy hairpin { 10.244.1.1 . 10.244.1.1 }\n" in script


def test_compile_service_port_matches_the_ruleset() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    st = state((port, eps(2)))
    direct = compile_service_port(port, st.categorize(port), OPTIONS)
    assert direct == compile_nftables(st, OPTIONS).services[port.name]


# --- render and the CLI ---------------------------------------------------------------------


def render(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["render", "--proxy-mode", "nftables", "-f", CLUSTER, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_renders_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(capsys)
    assert code == 0, err
    v4, _, v6 = out.partition("# IPv6\n")
    assert v4.startswith("# IPv4\nadd table ip minikproxy\n")
    assert v6.startswith("add table ip6 minikproxy\n")
    assert "add element ip minikproxy service-dispatch" in v4


def test_cli_one_family_and_service_filter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(capsys, "--ip-family", "IPv4", "--service", "shop/web")
    assert code == 0, err
    assert out and all(line.startswith("add element ip minikproxy ") for line in out.splitlines())
    code, full, _ = render(capsys, "--ip-family", "IPv4")
    assert code == 0
    added = {line for line in out.splitlines()}
    assert len(added) < len(full.splitlines())


def test_cli_service_cidr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(capsys, "--ip-family", "IPv4", "--service-cidr", "10.96.0.0/12")
    assert code == 0, err
    assert "cluster-ips-check ip daddr { 10.96.0.0/12 } drop" in out


@pytest.mark.parametrize(
    "value",
    [
        "10.96.0.0/33",
        "nonsense",
        "10.96.0.0/12,10.97.0.0/16",
        "a,b,c",
        "",
        "10.96.0.0",
        "10.96.0.0/255.240.0.0",
    ],
)
def test_cli_service_cidr_errors(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        render(capsys, "--service-cidr", value)
    assert exc.value.code == 2
    assert "--service-cidr" in capsys.readouterr().err


def test_cli_localhost_nodeports_warning(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = render(capsys, "--iptables-localhost-nodeports", "true")
    assert code == 0
    assert "localhost NodePorts are not supported in nftables mode" in err


def test_cli_kube_proxy_layout(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(capsys, "--nftables-layout", "kube-proxy")
    assert code == 0, err
    assert out.startswith("# IPv4\nadd table ip kube-proxy\n")
    assert "add chain ip kube-proxy service-" in out
    assert "minikproxy" not in out


def test_cli_unknown_nftables_layout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        render(capsys, "--nftables-layout", "tree")
    assert exit_info.value.code == 2


def test_render_objects_gives_the_ruleset() -> None:
    objs: list[dict[str, Any]] = [
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "t"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }
    ]
    result = render_objects(
        [SourcedObject(o, "x") for o in objs],
        ProxyConfig(mode="nftables", hostname_override="n"),
        families=[IPV4],
        services=[NamespacedName("t", "web")],
    )
    ruleset = result.rulesets[IPV4]
    assert isinstance(ruleset, NftablesRuleset)
    assert result.payloads[IPV4] == (
        "add element ip minikproxy cluster-ips { 10.96.0.10 }\n"
        "add element ip minikproxy no-endpoint-services "
        "{ 10.96.0.10 . tcp . 80 : goto reject-chain }\n"
    )


def test_run_refuses_nftables_mode_for_now() -> None:
    assert main(["run", "--proxy-mode", "nftables", "--dry-run"]) == 2


def test_update_script_is_element_only_and_respects_shared_elements() -> None:
    a = ServicePort(ServicePortName("ns", "web", "a", "TCP"), IPV4, "10.96.0.10", 80)
    b = ServicePort(ServicePortName("ns", "web", "b", "TCP"), IPV4, "10.96.0.10", 81)
    before = compile_nftables(state((a, eps(2)), (b, eps(2))), OPTIONS)
    moved = (eps(2)[0], make_endpoint("10.244.9.9", 8080))
    after = compile_nftables(state((a, moved), (b, eps(2))), OPTIONS)
    script = after.update_script(before, [a.name])
    assert script == (
        "delete element ip minikproxy cluster-endpoints-tcp { 10.96.0.10 . 80 . 1 }\n"
        "add element ip minikproxy hairpin { 10.244.9.9 . 10.244.9.9 }\n"
        "add element ip minikproxy cluster-endpoints-tcp "
        "{ 10.96.0.10 . 80 . 1 : 10.244.9.9 . 8080 }\n"
    )  # 10.244.1.2's hairpin element stays: port b still holds it


def test_update_script_adds_and_deletes_count_class_chains() -> None:
    a = ServicePort(ServicePortName("ns", "web", "a", "TCP"), IPV4, "10.96.0.10", 80)
    b = ServicePort(ServicePortName("ns", "web", "b", "TCP"), IPV4, "10.96.0.10", 81)
    before = compile_nftables(state((a, eps(2)), (b, eps(2))), OPTIONS)
    three = compile_nftables(state((a, eps(3)), (b, eps(2))), OPTIONS)
    script = three.update_script(before, [a.name])
    assert script is not None
    lines = script.splitlines()
    new_chain = lines.index("add chain ip minikproxy pick-3")
    assert [line.split(" dnat")[0] for line in lines[new_chain + 1 : new_chain + 4]] == [
        f"add rule ip minikproxy pick-3 meta l4proto {p}" for p in ("tcp", "udp", "sctp")
    ]
    assert (
        lines.index("delete element ip minikproxy service-dispatch { 10.96.0.10 . tcp . 80 }")
        < (new_chain)
        < lines.index(
            "add element ip minikproxy service-dispatch { 10.96.0.10 . tcp . 80 : goto pick-3 }"
        )
    )
    assert "delete chain" not in script  # port b still uses pick-2
    # Both at 3: pick-2 goes, after the elements that referred to it.
    both = compile_nftables(state((a, eps(3)), (b, eps(3))), OPTIONS)
    script = both.update_script(three, [b.name])
    assert script is not None
    lines = script.splitlines()
    assert lines.index("delete chain ip minikproxy pick-2") > lines.index(
        "delete element ip minikproxy service-dispatch { 10.96.0.10 . tcp . 81 }"
    )
    assert "flush chain ip minikproxy pick-2" in lines and "add chain" not in script
    # Other options change the fixed skeleton: only a full load will do.
    other = compile_nftables(state((a, eps(3)), (b, eps(3))), replace(OPTIONS, masquerade_all=True))
    assert other.update_script(both, [a.name, b.name]) is None


def test_ipv6_affinity_keys_by_digest_and_takes_the_port_from_affinity_ports() -> None:
    port = ServicePort(
        spn("web"), IPV6, "fd00::10", 80, session_affinity_client_ip=True, sticky_max_age_seconds=60
    )
    endpoints = (make_endpoint("fd00:1::2", 8080), make_endpoint("fd00:1::3", 8080))
    ruleset = compile_nftables(state((port, endpoints), family=IPV6), OPTIONS6)
    items = ruleset.services[port.name].elements
    assert of(items, "affinity-timeouts") == ["fd00::10 . tcp . 80 : goto affinity-60"]
    assert of(items, "affinity-ports") == ["fd00::10 . tcp . 80 : 8080"]
    script = ruleset.render()
    digest = " . ".join(
        f"jhash ip6 saddr . ct original ip6 daddr . ct original proto-dst mod 4294967295 "
        f"seed {seed:#x}"
        for seed in DIGEST_SEEDS
    )
    assert f"update @affinity-tcp {{ {digest} timeout 60s : ip6 daddr }}" in script
    assert "map @affinity-tcp : ip6 daddr . meta l4proto . th dport map @affinity-ports" in script
    assert ruleset.notes == ()


def test_ipv6_affinity_needs_one_target_port() -> None:
    port = ServicePort(spn("web"), IPV6, "fd00::10", 80, session_affinity_client_ip=True)
    endpoints = (make_endpoint("fd00:1::2", 8080), make_endpoint("fd00:1::3", 8081))
    ruleset = compile_nftables(state((port, endpoints), family=IPV6), OPTIONS6)
    items = ruleset.services[port.name].elements
    assert of(items, "affinity-timeouts") == [] and of(items, "affinity-ports") == []
    assert len(ruleset.notes) == 1 and "one target port number" in ruleset.notes[0]


def test_topology_hints_select_same_zone_endpoints() -> None:
    node = NodeInfo("node-1", labels={"topology.kubernetes.io/zone": "a"}, addresses=("10.0.0.1",))
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80)
    endpoints = (
        make_endpoint("10.244.1.1", 8080, zone_hints=frozenset({"a"})),
        make_endpoint("10.244.1.2", 8080, zone_hints=frozenset({"b"})),
        make_endpoint("10.244.1.3", 8080, zone_hints=frozenset({"a"})),
    )
    st = ProxyState(
        family=IPV4, node=node, services={port.name: port}, endpoints={port.name: endpoints}
    )
    items = compile_nftables(st, OPTIONS).services[port.name].elements
    assert of(items, "cluster-endpoints-tcp") == [
        "10.96.0.10 . 80 . 0 : 10.244.1.1 . 8080",
        "10.96.0.10 . 80 . 1 : 10.244.1.3 . 8080",
    ]


def raw4(
    client: str,
    vip: str,
    endpoint: str,
    *,
    timeout_ms: int | None = 600000,
    expires_ms: int = 90000,
) -> tuple[bytes, bytes, int | None, int]:
    """An IPv4 affinity element as the kernel reports it (port 80 -> 8080)."""
    key = b"".join(socket.inet_pton(socket.AF_INET, a) for a in (client, vip))
    data = socket.inet_pton(socket.AF_INET, endpoint) + struct.pack("!H2x", 8080)
    return key + struct.pack("!H2x", 80), data, timeout_ms, expires_ms


def raw6(digest: tuple[int, int, int], endpoint: str) -> tuple[bytes, bytes, int, int]:
    """An IPv6 affinity element as the kernel reports it."""
    return struct.pack("=III", *digest), socket.inet_pton(socket.AF_INET6, endpoint), 1000, 900


def test_affinity_cleanup_names_entries_of_endpoints_that_left() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80, session_affinity_client_ip=True)
    before = compile_nftables(state((port, eps(3))), OPTIONS)
    after = compile_nftables(state((port, (eps(3)[0], eps(3)[2]))), OPTIONS)
    assert (
        compile_nftables(state((port, eps(4))), OPTIONS).affinity_cleanup(before, [port.name])
        is None
    )
    cleanup = after.affinity_cleanup(before, [port.name])
    assert cleanup is not None and cleanup.maps == ("affinity-tcp",)
    assert cleanup.stale == {"affinity-tcp": {"10.244.1.2 . 8080": frozenset({"10.96.0.10 . 80"})}}

    listing = {
        "affinity-tcp": [
            raw4("10.1.1.1", "10.96.0.10", "10.244.1.2"),  # stale
            raw4("10.1.1.2", "10.96.0.10", "10.244.1.3"),  # its endpoint stays
            raw4("10.1.1.3", "10.96.0.99", "10.244.1.2"),  # another Service's frontend
        ]
    }
    assert cleanup.commands(listing) == (
        "add element ip minikproxy affinity-tcp "
        "{ 10.1.1.1 . 10.96.0.10 . 80 : 10.244.1.2 . 8080 }\n"
        "delete element ip minikproxy affinity-tcp { 10.1.1.1 . 10.96.0.10 . 80 }\n"
    )
    # The port gone, or its affinity off: every endpoint's entries go.
    gone = compile_nftables(state(), OPTIONS).affinity_cleanup(before, [port.name])
    assert gone is not None and len(gone.stale["affinity-tcp"]) == 3


def test_affinity_cleanup_ipv6_matches_the_endpoint_address() -> None:
    port = ServicePort(spn("web", "UDP"), IPV6, "fd00::10", 53, session_affinity_client_ip=True)
    two = (make_endpoint("fd00:1::2", 53), make_endpoint("fd00:1::3", 53))
    before = compile_nftables(state((port, two), family=IPV6), OPTIONS6)
    after = compile_nftables(state((port, two[:1]), family=IPV6), OPTIONS6)
    cleanup = after.affinity_cleanup(before, [port.name])
    assert cleanup is not None and cleanup.stale == {"affinity-udp": {"fd00:1::3": None}}
    listing = {"affinity-udp": [raw6((1, 2, 3), "fd00:1::3"), raw6((4, 5, 6), "fd00:1::2")]}
    assert cleanup.commands(listing) == (
        "add element ip6 minikproxy affinity-udp { 1 . 2 . 3 : fd00:1::3 }\n"
        "delete element ip6 minikproxy affinity-udp { 1 . 2 . 3 }\n"
    )


def test_affinity_restore_keeps_entries_of_live_endpoints_only() -> None:
    port = ServicePort(spn("web"), IPV4, "10.96.0.10", 80, session_affinity_client_ip=True)
    ruleset = compile_nftables(state((port, eps(2))), OPTIONS)
    assert ruleset.affinity_maps == ("affinity-tcp", "affinity-udp", "affinity-sctp")

    listing = {
        "affinity-tcp": [
            raw4("10.1.1.1", "10.96.0.10", "10.244.1.2"),  # live: kept
            raw4("10.1.1.2", "10.96.0.10", "10.244.1.9"),  # endpoint gone
            raw4("10.1.1.3", "10.96.0.99", "10.244.1.2"),  # not this frontend
            raw4("10.1.1.4", "10.96.0.10", "10.244.1.1", expires_ms=0),  # expiring now
            raw4("10.1.1.5", "10.96.0.10", "10.244.1.1", timeout_ms=None),  # map's default
        ]
    }
    assert ruleset.affinity_restore(listing) == (
        "add element ip minikproxy affinity-tcp { 10.1.1.1 . 10.96.0.10 . 80 timeout 600000ms "
        "expires 90000ms : 10.244.1.2 . 8080, 10.1.1.5 . 10.96.0.10 . 80 expires 90000ms : "
        "10.244.1.1 . 8080 }\n"
    )
    assert ruleset.affinity_restore({}) == ""
