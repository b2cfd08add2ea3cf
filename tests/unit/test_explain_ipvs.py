"""explain and diff in IPVS mode: the evaluator (iptables rules with ipset matches, kube-ipvs0,
virtual and real servers), its reasons, the rendered and live (text) forms, and diff."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from minikproxy.cli import main
from minikproxy.config import ProxyConfig
from minikproxy.explain.diff import diff_views
from minikproxy.explain.driver import build_view, explain_packet, track, with_mode
from minikproxy.explain.engine import ExplainError
from minikproxy.explain.ipvs import IpsetTable, IpvsRules, parse_addresses, parse_ipvsadm
from minikproxy.explain.packet import make_packet
from minikproxy.model.names import IPV4, IPV6
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from tests.kernel.explain_cases import BACKENDS6, CASES, CLIENT6, NODE_IP6
from tests.kernel.traffic import BACKENDS, NODE, NODE_IP, NODE_OBJ, service, slice_

CLIENT = "10.10.1.2"
POD = "10.10.2.200"


def view_of(
    objs: list[Any], family: str = IPV4, node_addresses: tuple[str, ...] = (), **config: Any
) -> Any:
    settings = {"hostname_override": NODE, "cluster_cidr": "10.10.2.0/24", **config}
    cfg = with_mode(ProxyConfig(**settings), "ipvs")
    tracker, problems = track([SourcedObject(o, "t") for o in [NODE_OBJ, *objs]], cfg)
    assert problems == []
    return build_view(tracker, cfg, family, node_addresses=node_addresses)  # type: ignore[arg-type]


def explain(
    view: Any, dst: str, port: int, origin: str = "external", src: str = CLIENT, proto: str = "tcp"
) -> Any:
    return explain_packet(view, make_packet(src, dst, port, proto, origin))  # type: ignore[arg-type]


def eps(exp: Any) -> list[tuple[str, float, bool]]:
    return [(e.address, round(e.probability, 4), e.masquerade) for e in exp.endpoints]


def _lb(name: str, cip: str, vip: str, node_port: int, **spec: Any) -> Any:
    return service(
        name,
        cip,
        type="LoadBalancer",
        port_extra={"nodePort": node_port},
        status={"loadBalancer": {"ingress": [{"ip": vip}]}},
        **spec,
    )


WEB = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
THIRD = round(1 / 3, 4)


def test_cluster_ip_schedules_round_robin_and_masquerades_off_cluster_clients() -> None:
    view = view_of(WEB)
    exp = explain(view, "10.96.0.10", 80)
    assert exp.mode == "ipvs" and exp.verdict == "dnat" and exp.service == "t/web:p (TCP)"
    assert eps(exp) == [(f"{ip}:8080", THIRD, True) for ip in BACKENDS]
    assert exp.masquerade_rules[0].startswith("nat/KUBE-SERVICES: ! -s 10.10.2.0/24")
    assert exp.masquerade_rules[-1].startswith("nat/KUBE-POSTROUTING")
    ipvs_steps = [s for s in exp.path if s.table == "ipvs"]
    assert [s.lookup for s in ipvs_steps] == [
        f"real server {ip}:8080 weight 1 of 3" for ip in BACKENDS
    ]
    assert all(s.chain == "TCP 10.96.0.10:80" and s.hook == "input" for s in ipvs_steps)
    assert any(s.lookup == "KUBE-CLUSTER-IP (dst,dst): 10.96.0.10,tcp:80" for s in exp.path)
    # The path is in the order crossed: INPUT, IPVS, then the LOCAL_OUT path and POSTROUTING.
    hooks = [s.hook for s in exp.path]
    assert hooks.index("input") < hooks.index("output") < hooks.index("postrouting")
    pod = explain(view, "10.96.0.10", 80, "pod", POD)
    assert pod.verdict == "dnat" and not pod.masquerade and pod.masquerade_rules == ()
    node = explain(view, "10.96.0.10", 80, "node", NODE_IP)
    assert node.masquerade and [s.hook for s in node.path if s.table == "ipvs"] == ["output"] * 3


def test_other_ports_of_a_service_ip_are_rejected_by_the_ipvs_filter() -> None:
    exp = explain(view_of(WEB), "10.96.0.10", 81)
    assert exp.verdict == "reject" and exp.endpoints == ()
    assert exp.path[-1].chain == "KUBE-IPVS-FILTER"
    assert exp.path[-1].lookup == "KUBE-IPVS-IPS (dst): 10.96.0.10"
    assert any("kube-ipvs0" in r for r in exp.reasons)
    # An address nothing binds is left alone (routed on).
    assert explain(view_of(WEB), "10.96.0.11", 80).verdict == "none"


def test_no_endpoints_rejects_with_icmp_port_unreachable() -> None:
    view = view_of([service("empty", "10.96.0.30", type="NodePort",
                            port_extra={"nodePort": 30030})])  # fmt: skip
    for dst, port in (("10.96.0.30", 80), (NODE_IP, 30030)):
        exp = explain(view, dst, port)
        assert exp.verdict == "reject", (dst, exp)
        assert exp.path[-1].table == "ipvs"
        assert "no real servers: ICMP port unreachable" in exp.path[-1].lookup
    assert any("has no endpoints" in r for r in explain(view, "10.96.0.30", 80).reasons)


def test_node_ports_answer_on_every_node_address_but_not_localhost() -> None:
    objs = [service("np", "10.96.0.70", type="NodePort", port_extra={"nodePort": 30070}),
            slice_("np", BACKENDS)]  # fmt: skip
    view = view_of(objs, node_addresses=(NODE_IP, "192.168.5.5"))
    for dst in (NODE_IP, "192.168.5.5"):
        exp = explain(view, dst, 30070)
        assert exp.verdict == "dnat" and exp.masquerade, dst
        assert any(s.lookup == "KUBE-NODE-PORT-TCP (dst): 30070" for s in exp.path)
    local = explain(view, "127.0.0.1", 30070, "localhost", "127.0.0.1")
    assert local.verdict == "none"
    assert any("localhost NodePorts are not supported in ipvs mode" in n for n in local.notes)
    assert view.nodeport_addresses == (NODE_IP, "192.168.5.5")


def test_load_balancer_source_ranges() -> None:
    objs = [_lb("lb", "10.96.0.61", "203.0.113.61", 30061,
                loadBalancerSourceRanges=["10.10.1.0/24"]), slice_("lb", BACKENDS)]  # fmt: skip
    view = view_of(objs)
    allowed = explain(view, "203.0.113.61", 80)
    assert allowed.verdict == "dnat" and allowed.masquerade
    assert any(
        s.lookup == "KUBE-LOAD-BALANCER-SOURCE-CIDR (dst,dst,src): 203.0.113.61,tcp:80,10.10.1.0/24"
        for s in allowed.path
    )
    denied = explain(view, "203.0.113.61", 80, src="192.0.2.9")
    assert denied.verdict == "drop"
    assert denied.path[-1].chain == "KUBE-SOURCE-RANGES-FIREWALL"
    assert any("not in loadBalancerSourceRanges" in r for r in denied.reasons)
    # The NodePort and the cluster IP are not filtered.
    assert explain(view, NODE_IP, 30061, src="192.0.2.9").verdict == "dnat"
    assert explain(view, "10.96.0.61", 80, src="192.0.2.9").verdict == "dnat"


def test_load_balancer_the_node_may_not_reach_is_dropped_by_the_out_filter() -> None:
    objs = [_lb("lb", "10.96.0.64", "203.0.113.64", 30064,
                loadBalancerSourceRanges=["192.0.2.0/24"]), slice_("lb", BACKENDS)]  # fmt: skip
    view = view_of(objs)
    # The node connects to an address of kube-ipvs0 from that address itself.
    exp = explain(view, "203.0.113.64", 80, "node", "203.0.113.64")
    assert exp.verdict == "drop"
    (drop,) = [s for s in exp.path if s.chain == "KUBE-IPVS-OUT-FILTER"]
    assert drop.rule.startswith("-s 203.0.113.64 -m ipvs --vaddr 203.0.113.64 --vproto tcp")
    # iptables-save spells the rule with a numeric protocol.
    plan = view.ruleset
    saved = plan.render_iptables().replace("--vproto tcp", "--vproto 6")
    assert "--vproto 6" in saved
    rules = IpvsRules.from_text(
        plan.render_ipset(), plan.render_ipvs(), plan.render_addresses(), saved
    )
    again = explain(
        dataclasses.replace(view, rules=rules), "203.0.113.64", 80, "node", "203.0.113.64"
    )
    assert again.verdict == "drop"
    # From its own IP the out filter does not apply (nor the source ranges: no INPUT).
    assert explain(view, "203.0.113.64", 80, "node", NODE_IP).verdict == "dnat"


def test_external_ips_by_traffic_policy() -> None:
    objs = [
        service("ext", "10.96.0.45", externalIPs=["203.0.113.45"]),
        slice_("ext", BACKENDS),
        service("extl", "10.96.0.46", type="NodePort", externalTrafficPolicy="Local",
                externalIPs=["203.0.113.46"], port_extra={"nodePort": 30046}),
        slice_("extl", BACKENDS, local=("10.10.2.2", "10.10.2.4")),
    ]  # fmt: skip
    view = view_of(objs)
    cluster = explain(view, "203.0.113.45", 80)
    assert cluster.verdict == "dnat" and cluster.masquerade and len(cluster.endpoints) == 3
    assert any(s.lookup.startswith("KUBE-EXTERNAL-IP (dst,dst)") for s in cluster.path)
    local = explain(view, "203.0.113.46", 80)
    assert eps(local) == [("10.10.2.2:8080", 0.5, False), ("10.10.2.4:8080", 0.5, False)]
    assert any(s.lookup.startswith("KUBE-EXTERNAL-IP-LOCAL (dst,dst)") for s in local.path)
    nodeport = explain(view, NODE_IP, 30046)
    assert eps(nodeport) == eps(local)
    assert any(s.lookup == "KUBE-NODE-PORT-LOCAL-TCP (dst): 30046" for s in nodeport.path)


def test_external_policy_local_applies_to_pods_too_and_falls_back_without_local_endpoints() -> None:
    objs = [
        _lb("local", "10.96.0.40", "203.0.113.40", 30040, externalTrafficPolicy="Local"),
        slice_("local", BACKENDS, local=("10.10.2.3",)),
        _lb("remote", "10.96.0.41", "203.0.113.41", 30041, externalTrafficPolicy="Local"),
        slice_("remote", BACKENDS),
    ]
    view = view_of(objs)
    for origin, src in (("external", CLIENT), ("pod", POD)):
        exp = explain(view, "203.0.113.40", 80, origin, src)
        assert eps(exp) == [("10.10.2.3:8080", 1.0, False)], origin
    pod = explain(view, "203.0.113.40", 80, "pod", POD)
    assert any("not short-circuited" in r for r in pod.reasons)
    assert not any("short-circuited to every endpoint" in r for r in pod.reasons)
    # No local endpoint: IPVS uses every endpoint, unmasqueraded (kube-proxy's fallback).
    for dst, port in (("203.0.113.41", 80), (NODE_IP, 30041)):
        exp = explain(view, dst, port)
        assert eps(exp) == [(f"{ip}:8080", THIRD, False) for ip in BACKENDS], dst
        assert any("#97081" in r for r in exp.reasons)
        assert not any(r.endswith("this node has no ready endpoint") for r in exp.reasons)
    # The cluster IP is not subject to the external policy.
    assert explain(view, "10.96.0.41", 80).masquerade


def test_internal_policy_local() -> None:
    objs = [
        service("itp", "10.96.0.42", internalTrafficPolicy="Local"),
        slice_("itp", BACKENDS, local=("10.10.2.4",)),
        service("none", "10.96.0.43", internalTrafficPolicy="Local"),
        slice_("none", BACKENDS),
    ]
    view = view_of(objs)
    assert eps(explain(view, "10.96.0.42", 80, "pod", POD)) == [("10.10.2.4:8080", 1.0, False)]
    empty = explain(view, "10.96.0.43", 80, "pod", POD)
    assert empty.verdict == "reject"
    assert any("the virtual server has no real server" in r for r in empty.reasons)


def test_session_affinity_is_ipvs_persistence() -> None:
    objs = [service("sticky", "10.96.0.50", sessionAffinity="ClientIP",
                    sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
            slice_("sticky", BACKENDS)]  # fmt: skip
    exp = explain(view_of(objs), "10.96.0.50", 80)
    assert exp.affinity.startswith("ClientIP (IPVS persistence, 60 s)")
    assert len(exp.endpoints) == 3
    assert any(s.rule == "-A -t 10.96.0.50:80 -s rr -p 60" for s in exp.path)
    assert not explain(view_of(WEB), "10.96.0.10", 80).affinity


def test_masquerade_all_and_hairpin() -> None:
    every = view_of(WEB, cluster_cidr="10.10.0.0/16", masquerade_all=True)
    assert explain(every, "10.96.0.10", 80, "pod", POD).masquerade
    # A local endpoint reaching its own Service: KUBE-LOOP-BACK masquerades it.
    view = view_of(
        [service("self", "10.96.0.80"), slice_("self", BACKENDS[:1], local=BACKENDS[:1])]
    )
    exp = explain(view, "10.96.0.80", 80, "pod", BACKENDS[0])
    assert exp.verdict == "dnat" and exp.masquerade
    assert any(
        s.lookup == "KUBE-LOOP-BACK (dst,dst,src): 10.10.2.2,tcp:8080,10.10.2.2" for s in exp.path
    )
    assert exp.masquerade_rules[-1].startswith("nat/KUBE-POSTROUTING: -m comment --comment")
    other = explain(view, "10.96.0.80", 80, "pod", "10.10.2.3")
    assert other.verdict == "dnat" and not other.masquerade


def test_udp_and_sctp_node_ports() -> None:
    objs = [
        service("dns", "10.96.0.53", 53, "UDP", type="NodePort", port_extra={"nodePort": 30053}),
        slice_("dns", BACKENDS, proto="UDP"),
        service("sig", "10.96.0.60", 3868, "SCTP", type="NodePort",
                port_extra={"nodePort": 30868}),
        slice_("sig", BACKENDS[:1], proto="SCTP"),
    ]  # fmt: skip
    view = view_of(objs)
    udp = explain(view, NODE_IP, 30053, proto="udp")
    assert udp.verdict == "dnat" and udp.masquerade
    assert any(s.lookup == "KUBE-NODE-PORT-UDP (dst): 30053" for s in udp.path)
    assert explain(view, NODE_IP, 30053, proto="tcp").verdict == "none"
    sctp = explain(view, NODE_IP, 30868, proto="sctp")
    assert sctp.verdict == "dnat" and sctp.masquerade
    assert any(s.lookup == f"KUBE-NODE-PORT-SCTP-HASH (dst,dst): {NODE_IP},sctp:30868"
               for s in sctp.path)  # fmt: skip


def test_ipv6() -> None:
    objs = [
        service("web6", "fd00:96::10", type="NodePort", ipFamilies=["IPv6"],
                clusterIPs=["fd00:96::10"], port_extra={"nodePort": 30100}),
        slice_("web6", BACKENDS6, family="IPv6"),
    ]  # fmt: skip
    view = view_of(objs, IPV6, cluster_cidr="10.10.2.0/24,fd00:10:2::/64")
    exp = explain(view, "fd00:96::10", 80, src=CLIENT6)
    assert eps(exp) == [(f"[{ip}]:8080", THIRD, True) for ip in BACKENDS6]
    assert any(s.lookup == "KUBE-6-CLUSTER-IP (dst,dst): fd00:96::10,tcp:80" for s in exp.path)
    assert any(s.chain == "TCP [fd00:96::10]:80" for s in exp.path)
    assert explain(view, NODE_IP6, 30100, src=CLIENT6).verdict == "dnat"
    pod = explain(view, "fd00:96::10", 80, "pod", "fd00:10:2::99")
    assert not pod.masquerade
    assert explain(view, "fd00:96::10", 81, src=CLIENT6).verdict == "reject"


@pytest.mark.parametrize("case", [c for c in CASES if "iptables" in c.modes], ids=lambda c: c.name)
def test_rendered_text_and_compiled_plan_agree(case: Any) -> None:
    """What ``render`` prints, read back as text (the form ``--against-live`` reads), gives
    the same answers as the compiled plan."""
    view = view_of(case.objects, case.family, **case.config)
    cfg = with_mode(ProxyConfig(hostname_override=NODE, **{"cluster_cidr": "10.10.2.0/24",
                                                          **case.config}), "ipvs")  # fmt: skip
    objects = [SourcedObject(o, "t") for o in [NODE_OBJ, *case.objects]]
    rendered = render_objects(objects, cfg, families=[case.family])
    text = dataclasses.replace(view, rules=IpvsRules.from_render(rendered.payloads[case.family]))
    client = CLIENT6 if case.family == IPV6 else CLIENT
    for send in case.sends:
        a = explain(view, send.dst, send.port, send.origin, send.src or client, send.proto)
        b = explain(text, send.dst, send.port, send.origin, send.src or client, send.proto)
        assert (a.verdict, eps(a), a.affinity, a.path) == (b.verdict, eps(b), b.affinity, b.path)


def _live(view: Any, ipvs_edit: Any) -> Any:
    """``view`` with its state as text, the ipvsadm lines passed through ``ipvs_edit``."""
    plan = view.ruleset
    rules = IpvsRules.from_text(
        plan.render_ipset(), ipvs_edit(plan.render_ipvs()), plan.render_addresses(),
        plan.render_iptables(),
    )  # fmt: skip
    return dataclasses.replace(view, rules=rules, ruleset=None)


def test_weight_zero_real_servers_drain_and_schedulers_are_described() -> None:
    view = view_of(WEB)
    two, three = "-r 10.10.2.2:8080 -m -w ", "-r 10.10.2.3:8080 -m -w "
    draining = _live(
        view, lambda t: t.replace(two + "1", two + "0").replace(three + "1", three + "3")
    )
    exp = explain(draining, "10.96.0.10", 80)
    assert eps(exp) == [("10.10.2.3:8080", 0.75, True), ("10.10.2.4:8080", 0.25, True)]
    assert any("10.10.2.2:8080 has weight 0 (graceful termination)" in n for n in exp.notes)
    gone = _live(view, lambda t: t.replace("-m -w 1", "-m -w 0"))
    exp = explain(gone, "10.96.0.10", 80)
    assert exp.verdict == "reject" and "3 draining (weight 0)" in exp.path[-1].lookup
    hashed = _live(view, lambda t: t.replace("-s rr", "-s sh"))
    exp = explain(hashed, "10.96.0.10", 80)
    assert len(exp.endpoints) == 3
    assert any(n.startswith("scheduler sh: a hash of the source address") for n in exp.notes)
    least = _live(view, lambda t: t.replace("-s rr", "-s wlc"))
    assert any("depends on the connections" in n for n in explain(least, "10.96.0.10", 80).notes)


def test_ipvsadm_ipset_and_address_text_is_read() -> None:
    services = parse_ipvsadm(
        "-A -t [fd00:96::10]:80 -s rr -p 10800\n"
        "-a -t [fd00:96::10]:80 -r [fd00:10:2::2]:8080 -m -w 1\n"
        "-A -u 10.96.0.53:53 -s wrr\n-a -u 10.96.0.53:53 -r 10.10.2.2:53 -m -w 2\n"
        "-A --sctp-service 10.96.0.60:3868 -s mh -b mh-port\n"
        # other LVS software's firewall-mark and one-packet services: read past, not an error
        "-A -f 100 -s rr\n-a -f 100 -r 10.10.9.9:0 -g -w 1\n"
        "-A -u 10.0.0.9:514 -s rr -o\n"
    )
    assert ("UDP", "10.0.0.9", 514) in services and len(services) == 4
    v6 = services[("TCP", "fd00:96::10", 80)]
    assert v6.persistence == 10800 and v6.destinations[0].hostport == "[fd00:10:2::2]:8080"
    assert services[("UDP", "10.96.0.53", 53)].destinations[0].weight == 2
    assert services[("SCTP", "10.96.0.60", 3868)].destinations == ()
    with pytest.raises(ExplainError, match="unknown option --bogus"):
        parse_ipvsadm("-A -t 10.0.0.1:80 -s rr --bogus\n")
    with pytest.raises(ExplainError, match="never added"):
        parse_ipvsadm("-a -t 10.0.0.1:80 -r 10.0.0.2:80 -m -w 1\n")
    shown = (
        "7: kube-ipvs0    inet 10.96.0.10/32 scope global kube-ipvs0\\       valid_lft forever\n"
        "7: kube-ipvs0    inet6 fd00:96::10/128 scope global \\       valid_lft forever\n"
    )
    assert parse_addresses(shown) == {"10.96.0.10", "fd00:96::10"}
    table = IpsetTable.from_save(
        "create S hash:ip,port,net family inet hashsize 1024 maxelem 65536 bucketsize 12\n"
        "add S 203.0.113.1,tcp:80,10.0.0.0/8\ncreate P bitmap:port range 0-65535\nadd P 30080\n"
    )
    assert table.entries("P") == ["30080"]
    with pytest.raises(ExplainError, match="never created"):
        IpsetTable.from_save("add S 10.0.0.1\n")


def test_iptables_set_match_needs_ipsets_and_a_gateway_real_server_is_an_error() -> None:
    from minikproxy.explain.iptables import parse_rule

    with pytest.raises(ExplainError, match="no ipsets"):
        parse_rule("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT")
    view = view_of(WEB)
    gate = _live(view, lambda t: t.replace("-r 10.10.2.2:8080 -m", "-r 10.10.2.2:8080 -g"))
    with pytest.raises(ExplainError, match="not masquerading"):
        explain(gate, "10.96.0.10", 80)


def test_cli_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"kind": "List", "items": [NODE_OBJ, *WEB]}))
    rc = main(["explain", "--proxy-mode", "ipvs", "-f", str(manifest), "--cluster-cidr",
               "10.10.2.0/24", "--src", CLIENT, "--dst", "10.96.0.10", "--dport", "80",
               "--json"])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "ipvs" and out["verdict"] == "dnat" and out["masquerade"] is True
    assert [e["address"] for e in out["endpoints"]] == [f"{ip}:8080" for ip in BACKENDS]
    assert {"reasons", "path", "notes"} <= set(out)
    assert any(step["table"] == "ipvs" and "lookup" in step for step in out["path"])


def test_diff_between_ipvs_snapshots_and_to_other_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    base = [NODE_OBJ, service("web", "10.96.0.10", type="NodePort", port_extra={"nodePort": 30080}),
            _lb("lb", "10.96.0.41", "203.0.113.41", 30041, externalTrafficPolicy="Local"),
            slice_("lb", BACKENDS)]  # fmt: skip
    old.write_text(json.dumps({"kind": "List", "items": [*base, slice_("web", BACKENDS)]}))
    new.write_text(json.dumps({"kind": "List", "items": [*base, slice_("web", BACKENDS[:2])]}))
    args = ["diff", "--proxy-mode", "ipvs", "-f", str(old), "--cluster-cidr", "10.10.2.0/24",
            "--ip-family", "IPv4", "--json", "--exit-code"]  # fmt: skip
    assert main([*args, "--against", str(old)]) == 0
    capsys.readouterr()
    assert main([*args, "--against", str(new)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {c["service_port"] for c in out["changes"]} == {"t/web:p (TCP)"}
    assert all(c["changed"] == ["endpoint set"] for c in out["changes"])
    for target in ("nftables", "iptables"):
        assert main([*args, "--to-proxy-mode", target]) == 1
        migration = json.loads(capsys.readouterr().out)
        assert migration["old_mode"] == "ipvs" and migration["new_mode"] == target
        assert any("kube-ipvs0" in n for n in migration["mode_differences"])
        # The Local policy without a local endpoint: IPVS falls back, the other mode drops.
        lb = [c for c in migration["changes"] if c["service_port"] == "t/lb:p (TCP)"
              and c["from"] == "external"]  # fmt: skip
        assert lb and all(c["new"] == "drop" for c in lb)
        assert all("#97081" in c["known_mode_difference"] for c in lb)
        assert all(c["known_mode_difference"] for c in migration["changes"]), migration


def test_diff_with_incremental_compile_equals_full_compiles() -> None:
    from minikproxy.explain.driver import Feed

    cfg = with_mode(ProxyConfig(hostname_override=NODE, cluster_cidr="10.10.2.0/24"), "ipvs")
    lb = _lb("shop", "10.96.0.20", "203.0.113.20", 30080, loadBalancerSourceRanges=["10.0.0.0/8"])
    old = [
        SourcedObject(o, "o")
        for o in [
            NODE_OBJ,
            lb,
            slice_("shop", BACKENDS),
            service("a", "10.96.0.1"),
            slice_("a", BACKENDS),
        ]
    ]
    new = [
        SourcedObject(o, "n")
        for o in [
            NODE_OBJ,
            lb,
            slice_("shop", BACKENDS[:1]),
            service("b", "10.96.0.2"),
            slice_("b", BACKENDS),
        ]
    ]
    fed = Feed(old, cfg)
    first = build_view(fed.tracker, cfg, IPV4)
    fed.replace(old, new)
    second = build_view(fed.tracker, cfg, IPV4, previous=first)
    full_new = build_view(track(new, cfg)[0], cfg, IPV4)
    assert second.ruleset.render() == full_new.ruleset.render()
    full_old = build_view(track(old, cfg)[0], cfg, IPV4)
    got = [(c.probe.key, c.what) for c in diff_views(first, second)]
    assert got == [(c.probe.key, c.what) for c in diff_views(full_old, full_new)]
    assert {str(c.probe.port) for c in diff_views(first, second)} == {"t/a:p", "t/b:p", "t/shop:p"}
