"""explain's evaluators (iptables, both nftables layouts), the CLI's JSON, and diff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from minikproxy.cli import main
from minikproxy.config import ProxyConfig
from minikproxy.explain.diff import diff_views
from minikproxy.explain.driver import MODES, build_view, explain_packet, track, with_mode
from minikproxy.explain.engine import ExplainError
from minikproxy.explain.iptables import IptablesRules, parse_rule
from minikproxy.explain.nft import NftRules
from minikproxy.explain.packet import make_packet
from minikproxy.model.names import IPV4, IPV6
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.apiserver import FakeApiServer
from tests.kernel.explain_cases import CASES
from tests.kernel.traffic import BACKENDS, NODE, NODE_IP, NODE_OBJ, service, slice_

CLIENT = "10.10.1.2"


def view_of(objs: list[Any], mode: str = "iptables", family: str = IPV4, **config: Any) -> Any:
    cfg = with_mode(
        ProxyConfig(hostname_override=NODE, **{"cluster_cidr": "10.10.2.0/24", **config}), mode
    )
    tracker, problems = track([SourcedObject(o, "t") for o in [NODE_OBJ, *objs]], cfg)
    assert problems == []
    return build_view(tracker, cfg, family)  # type: ignore[arg-type]


def explain(
    view: Any, dst: str, port: int, origin: str = "external", src: str = CLIENT, proto: str = "tcp"
) -> Any:
    return explain_packet(view, make_packet(src, dst, port, proto, origin))  # type: ignore[arg-type]


LB = service(
    "shop", "10.96.0.20", type="LoadBalancer", externalIPs=["203.0.113.10"],
    loadBalancerSourceRanges=["10.10.1.0/24"], port_extra={"nodePort": 30080},
    status={"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}},
)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_cluster_ip_dnat_shares_and_masquerade(mode: str) -> None:
    view = view_of([service("web", "10.96.0.10"), slice_("web", BACKENDS)], mode)
    exp = explain(view, "10.96.0.10", 80)
    assert exp.verdict == "dnat"
    assert [e.address for e in exp.endpoints] == [f"{ip}:8080" for ip in BACKENDS]
    assert [round(e.probability, 6) for e in exp.endpoints] == [0.333333] * 3
    assert exp.masquerade and exp.masquerade_rules
    assert exp.service == "t/web:p (TCP)"
    pod = explain(view, "10.96.0.10", 80, origin="pod", src="10.10.2.200")
    assert pod.verdict == "dnat" and not pod.masquerade


@pytest.mark.parametrize("mode", MODES)
def test_no_endpoints_rejects_and_local_policy_drops(mode: str) -> None:
    objs = [
        service("empty", "10.96.0.30"),
        service("remote", "10.96.0.41", type="NodePort", externalTrafficPolicy="Local",
                port_extra={"nodePort": 30041}),
        slice_("remote", BACKENDS),
    ]  # fmt: skip
    view = view_of(objs, mode)
    empty = explain(view, "10.96.0.30", 80)
    assert empty.verdict == "reject" and empty.endpoints == ()
    assert any("has no endpoints" in r for r in empty.reasons)
    remote = explain(view, NODE_IP, 30041)
    assert remote.verdict == "drop"
    assert "externalTrafficPolicy: Local and this node has no ready endpoint" in remote.reasons


@pytest.mark.parametrize("mode", MODES)
def test_source_ranges(mode: str) -> None:
    view = view_of([LB, slice_("shop", BACKENDS)], mode)
    allowed = explain(view, "203.0.113.20", 80)
    assert allowed.verdict == "dnat"
    denied = explain(view, "203.0.113.20", 80, src="192.0.2.9")
    assert denied.verdict == "drop"
    assert "source 192.0.2.9 not in loadBalancerSourceRanges (10.10.1.0/24)" in denied.reasons


@pytest.mark.parametrize("mode", MODES)
def test_topology_and_terminating_reasons(mode: str) -> None:
    case = next(c for c in CASES if c.name == "topology-zone-hints")
    exp = explain(view_of(case.objects, mode), "10.96.0.90", 80)
    assert {e.address for e in exp.endpoints} == {"10.10.2.2:8080", "10.10.2.4:8080"}
    assert "topology: zone hints select 2 of 3 endpoints" in exp.reasons
    drain = [service("d", "10.96.0.70"),
             slice_("d", BACKENDS[1:], ready=False, serving=True, terminating=True)]  # fmt: skip
    exp = explain(view_of(drain, mode), "10.96.0.70", 80)
    assert exp.verdict == "dnat" and len(exp.endpoints) == 2
    assert "all endpoints terminating: falling back to serving-terminating" in exp.reasons


@pytest.mark.parametrize("mode", MODES)
def test_affinity_is_reported(mode: str) -> None:
    objs = [service("s", "10.96.0.50", sessionAffinity="ClientIP"), slice_("s", BACKENDS)]
    exp = explain(view_of(objs, mode), "10.96.0.50", 80)
    assert exp.verdict == "dnat" and exp.affinity.startswith("ClientIP")


def test_ipv6_in_every_mode() -> None:
    v6 = ["fd00:10:2::2", "fd00:10:2::3"]
    objs = [service("w", "fd00:96::10", ipFamilies=["IPv6"], clusterIPs=["fd00:96::10"]),
            slice_("w", v6, family="IPv6")]  # fmt: skip
    for mode in MODES:
        view = view_of(objs, mode, IPV6, cluster_cidr="10.10.2.0/24,fd00:10:2::/64")
        exp = explain(view, "fd00:96::10", 80, src="fd00:10:1::2")
        assert [e.address for e in exp.endpoints] == [f"[{ip}]:8080" for ip in v6], mode


def test_rendered_text_and_compiled_ruleset_agree() -> None:
    """The evaluator gives the same answer from ``render``'s text and from the ruleset."""
    objs = [LB, slice_("shop", BACKENDS, local=("10.10.2.3",))]
    for mode in MODES:
        view = view_of(objs, mode)
        cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr="10.10.2.0/24"), mode)
        text = render_objects(
            [SourcedObject(o, "t") for o in [NODE_OBJ, *objs]], cfg, families=[IPV4]
        ).payloads[IPV4]
        rules = IptablesRules.from_text(text) if mode == "iptables" else NftRules.from_script(text)
        from_text = view.__class__(**{**view.__dict__, "rules": rules})
        packets = [("203.0.113.20", 80, CLIENT), (NODE_IP, 30080, "192.0.2.1"),
                   ("203.0.113.20", 80, "192.0.2.1"), ("10.96.0.20", 80, CLIENT)]  # fmt: skip
        for dst, port, src in packets:
            a, b = explain(view, dst, port, src=src), explain(from_text, dst, port, src=src)
            assert (a.verdict, a.endpoints, a.masquerade) == (b.verdict, b.endpoints, b.masquerade)


def test_iptables_save_spelling_is_understood() -> None:
    rule = parse_rule(
        '-A KUBE-SVC-X -d 10.96.0.10/32 ! -s 10.0.0.0/8 -p tcp -m comment --comment "a b" '
        "-m tcp --dport 80 -j KUBE-MARK-MASQ"
    )
    assert rule.target == "KUBE-MARK-MASQ" and len(rule.matches) == 4
    mark = parse_rule("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000")
    assert mark.target_args == {"--set-xmark": "0x4000/0x4000"}


@pytest.mark.parametrize(
    "line",
    ["-A X -m owner --uid-owner 0 -j DROP", "-A X --sport 80 -j DROP", "-A X -j DNAT --foo 1"],
)
def test_unknown_iptables_shapes_are_errors(line: str) -> None:
    with pytest.raises(ExplainError, match="unknown"):
        parse_rule(line)


def test_unknown_nft_expression_is_an_error() -> None:
    rules = NftRules.from_script(
        "add table ip t\nadd chain ip t c { type nat hook prerouting priority -100 ; }\n"
        "add rule ip t c meta skuid 0 drop\n"
    )
    view = view_of([], "nftables")
    broken = view.__class__(**{**view.__dict__, "rules": rules})
    with pytest.raises(ExplainError, match="skuid"):
        explain(broken, "10.96.0.1", 80)


def test_cli_json_has_the_documented_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.json"
    objs = [NODE_OBJ, service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    manifest.write_text(json.dumps({"kind": "List", "items": objs}))
    rc = main(["explain", "-f", str(manifest), "--cluster-cidr", "10.10.2.0/24",
               "--src", CLIENT, "--dst", "10.96.0.10", "--dport", "80", "--json"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"verdict", "endpoints", "masquerade", "reasons", "path"} <= set(out)
    assert out["verdict"] == "dnat" and out["masquerade"] is True
    assert {"address", "probability"} <= set(out["endpoints"][0])
    assert out["endpoints"][0]["address"] == "10.10.2.2:8080"
    assert all({"chain", "rule"} <= set(step) for step in out["path"])
    rc = main(
        ["explain", "-f", str(manifest), "--src", "x", "--dst", "10.96.0.10", "--dport", "80"]
    )
    assert rc == 2 and "--src: invalid IP address 'x'" in capsys.readouterr().err


def test_diff_of_two_snapshots_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    base = [NODE_OBJ, service("web", "10.96.0.10", type="NodePort", port_extra={"nodePort": 30080})]
    old.write_text(json.dumps({"kind": "List", "items": [*base, slice_("web", BACKENDS)]}))
    new.write_text(json.dumps({"kind": "List", "items": [*base, slice_("web", BACKENDS[:2])]}))
    args = ["diff", "-f", str(old), "--cluster-cidr", "10.10.2.0/24", "--ip-family", "IPv4"]
    assert main([*args, "--against", str(old), "--exit-code"]) == 0
    capsys.readouterr()
    assert main([*args, "--against", str(new), "--exit-code", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    kinds = {(c["frontend"], c["from"]) for c in out["changes"]}
    assert ("ClusterIP", "pod") in kinds and ("NodePort", "external") in kinds
    assert all("endpoint set" in c["changed"] for c in out["changes"])
    assert main([*args, "--to-proxy-mode", "nftables", "--json"]) == 0
    migration = json.loads(capsys.readouterr().out)
    (local,) = [c for c in migration["changes"] if c["packet"]["dst"] == "127.0.0.1"]
    assert "localhost NodePorts" in local["known_mode_difference"]
    assert migration["mode_differences"]


def test_diff_skips_only_ports_with_identical_rules() -> None:
    a = view_of([service("a", "10.96.0.1"), slice_("a", BACKENDS),
                 service("b", "10.96.0.2"), slice_("b", BACKENDS)])  # fmt: skip
    sticky = service("b", "10.96.0.2", sessionAffinity="ClientIP")
    b = view_of([service("a", "10.96.0.1"), slice_("a", BACKENDS), sticky, slice_("b", BACKENDS)])
    changes = diff_views(a, b)
    assert {str(c.probe.port) for c in changes} == {"t/b:p"}
    assert all(c.what == ("affinity",) for c in changes)


def test_explain_reads_a_live_cluster_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeApiServer() as server:
        for obj in (NODE_OBJ, service("web", "10.96.0.10"), slice_("web", BACKENDS[:1])):
            server.create({**obj, "metadata": {**obj["metadata"]}})
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        rc = main(["explain", "--kubeconfig", str(kubeconfig), "--hostname-override", NODE,
                   "--cluster-cidr", "10.10.2.0/24", "--src", CLIENT, "--dst", "10.96.0.10",
                   "--dport", "80", "--json"])  # fmt: skip
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["endpoints"] == [
            {"address": "10.10.2.2:8080", "probability": 1.0, "masquerade": True}
        ]
        verbs = {(r.resource, r.verb) for r in server.request_log if r.resource}
        assert verbs == {("services", "list"), ("endpointslices", "list"), ("nodes", "list")}


@pytest.mark.parametrize("mode", MODES)
def test_diff_with_incremental_compile_equals_full_compiles(mode: str) -> None:
    from minikproxy.explain.driver import Feed

    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr="10.10.2.0/24"), mode)
    old_objs = [NODE_OBJ, LB, slice_("shop", BACKENDS), service("a", "10.96.0.1"),
                slice_("a", BACKENDS)]  # fmt: skip
    new_objs = [NODE_OBJ, LB, slice_("shop", BACKENDS[:1]), service("b", "10.96.0.2"),
                slice_("b", BACKENDS)]  # fmt: skip
    old = [SourcedObject(o, "old") for o in old_objs]
    new = [SourcedObject(o, "new") for o in new_objs]
    fed = Feed(old, cfg)
    first = build_view(fed.tracker, cfg, IPV4)
    fed.replace(old, new)
    second = build_view(fed.tracker, cfg, IPV4, previous=first)
    full_old = build_view(track(old, cfg)[0], cfg, IPV4)
    full_new = build_view(track(new, cfg)[0], cfg, IPV4)
    if mode != "nftables/kube-proxy":
        assert second.ruleset.render() == full_new.ruleset.render()
    got = [(c.probe.key, c.what) for c in diff_views(first, second)]
    assert got == [(c.probe.key, c.what) for c in diff_views(full_old, full_new)]
    assert {str(c.probe.port) for c in diff_views(first, second)} == {"t/a:p", "t/b:p", "t/shop:p"}


def test_nft_list_output_is_read_back() -> None:
    from minikproxy.explain.nftlist import list_to_commands

    listing = """table ip t {
	set ips {
		type ipv4_addr
		elements = { 10.0.0.1,
			10.0.0.2 }
	}
	set sticky {
		type ipv4_addr
		flags dynamic,timeout
		elements = { 10.9.9.9 timeout 3h expires 2h }
	}
	chain pre {
		type filter hook prerouting priority dstnat - 10; policy accept;
		comment "a chain comment"
		ip daddr @ips drop comment "x"
	}
}
"""
    assert list_to_commands(listing) == [
        "add table ip t",
        "add set ip t ips",
        "add element ip t ips { 10.0.0.1, 10.0.0.2 }",
        "add set ip t sticky",
        "add chain ip t pre { type filter hook prerouting priority -110 ; }",
        'add rule ip t pre ip daddr @ips drop comment "x"',
    ]
    with pytest.raises(ExplainError, match="priority"):
        list_to_commands("table ip t {\n chain c {\n type filter hook input priority odd; }\n}\n")


def test_diff_of_an_added_service_says_what_its_frontends_did_before() -> None:
    old = view_of([service("a", "10.96.0.1"), slice_("a", BACKENDS)], "nftables",
                  service_cidrs=("10.96.0.0/16",))  # fmt: skip
    new = view_of([service("a", "10.96.0.1"), slice_("a", BACKENDS),
                   service("b", "10.96.0.2"), slice_("b", BACKENDS)], "nftables",
                  service_cidrs=("10.96.0.0/16",))  # fmt: skip
    changes = diff_views(old, new)
    assert {str(c.probe.port) for c in changes} == {"t/b:p"}
    # An unallocated address of the service CIDR was dropped; now it is a Service.
    assert all(c.old.verdict == "drop" and c.new.verdict == "dnat" for c in changes)
    assert all("reachability" in c.what for c in changes)


@pytest.mark.parametrize("mode", MODES)
def test_in_interface_decides_interface_based_detection(mode: str) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    view = view_of(
        objs, mode, detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth"
    )
    pod = explain_packet(view, make_packet(CLIENT, "10.96.0.10", 80, "tcp", "external", "veth12"))
    assert pod.verdict == "dnat" and not pod.masquerade
    assert any("the source is kept" in r for r in pod.reasons)
    other = explain_packet(view, make_packet(CLIENT, "10.96.0.10", 80, "tcp", "pod", "eth0"))
    assert other.masquerade
    with pytest.raises(ValueError, match="--in-interface"):
        make_packet("10.10.1.1", "10.96.0.10", 80, "tcp", "node", "eth0")


def test_mode_migrations_on_the_example_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    """The two nftables layouts do the same to every kind of traffic; iptables -> nftables
    differs only where kube-proxy documents a difference (each change says which)."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    args = ["diff", "-f", str(examples / "cluster"), "--config",
            str(examples / "kube-proxy-config.yaml"), "--json", "--exit-code"]  # fmt: skip
    layouts = [*args, "--proxy-mode", "nftables", "--to-nftables-layout", "kube-proxy"]
    assert main(layouts) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []
    assert main([*args, "--to-proxy-mode", "nftables"]) == 1
    changes = json.loads(capsys.readouterr().out)["changes"]
    assert changes and all(c["known_mode_difference"] for c in changes)
    assert main(["diff", "-f", str(examples / "cluster")]) == 2
    assert "nothing to compare with" in capsys.readouterr().err
