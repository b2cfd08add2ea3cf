"""Golden tests of the iptables compiler.

``tests/data/overall-cluster.*`` reproduces the objects of kube-proxy's
``TestOverallIPTablesRules`` (pkg/proxy/iptables/proxier_test.go). The golden output was
checked rule for rule against that test's expected ruleset; the only differences are
kube-proxy's nfacct counting rules (``-m nfacct``, and extra ``-d 127.0.0.0/8`` NodePort
rules that exist only to count localhost NodePort packets), which change no verdict.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from minikproxy.compile.iptables import IptablesRuleset
from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPV6, NamespacedName
from minikproxy.render import render_objects
from minikproxy.sources.manifests import load_manifests

DATA = Path(__file__).parent.parent / "data"
EXAMPLES = Path(__file__).parent.parent.parent / "examples"


def parse_restore(text: str) -> dict[str, dict[str, list[str]]]:
    """tables -> chains -> rules, from iptables-restore input (declarations included)."""
    tables: dict[str, dict[str, list[str]]] = {}
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            table.setdefault(line.split()[1], []).append(line)
    return tables


def undefined_jumps(text: str) -> list[str]:
    """Rules jumping to a chain that is neither declared nor built in."""
    builtin = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "MARK", "MASQUERADE"}
    builtin |= {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
    bad = []
    for table in parse_restore(text).values():
        for rules in table.values():
            for rule in rules:
                match = re.search(r" -j (\S+)", rule)
                if match and match.group(1) not in builtin and match.group(1) not in table:
                    bad.append(rule)
    return bad


def overall_ruleset() -> IptablesRuleset:
    config = ProxyConfig(
        hostname_override="test-node", cluster_cidr="10.0.0.0/8", node_ips=("192.168.0.2",)
    )
    objects = load_manifests([str(DATA / "overall-cluster.yaml")], [])
    result = render_objects(objects, config, families=[IPV4])
    assert result.problems == []
    return result.rulesets[IPV4]


def test_overall_cluster_matches_kube_proxy() -> None:
    rendered = overall_ruleset().render(jumps=False, canary=False)
    rendered = rendered.replace(" --random-fully", "")  # kube-proxy's fake lacks random-fully
    expected = (DATA / "overall-cluster.ipv4.golden").read_text()
    got, want = parse_restore(rendered), parse_restore(expected)
    assert set(got) == set(want)
    for table in want:
        assert set(got[table]) == set(want[table]), f"chains differ in {table}"
        for chain, rules in want[table].items():
            assert got[table][chain] == rules, f"{table}/{chain} differs"


def test_output_is_deterministic() -> None:
    assert overall_ruleset().render() == overall_ruleset().render()


@pytest.mark.parametrize("family", [IPV4, IPV6])
def test_every_jump_targets_a_defined_chain(family: str) -> None:
    config = ProxyConfig(cluster_cidr="10.244.0.0/16,fd00:10:244::/56")
    objects = load_manifests([str(EXAMPLES / "cluster")], [])
    result = render_objects(objects, config, families=[family])  # type: ignore[list-item]
    text = result.payloads[family]  # type: ignore[index]
    assert "-A KUBE-SERVICES" in text
    assert undefined_jumps(text) == []


def test_nodeports_jump_is_the_last_rule_of_kube_services() -> None:
    nat = parse_restore(overall_ruleset().render())["nat"]
    assert "-j KUBE-NODEPORTS" in nat["KUBE-SERVICES"][-1]
    assert sum("-j KUBE-NODEPORTS" in r for r in nat["KUBE-SERVICES"]) == 1


def test_render_services_prints_only_those_services() -> None:
    text = overall_ruleset().render_services({NamespacedName("ns5", "svc5")})
    assert "KUBE-FW-NUKIZ6OKUXPJNT4C" in text
    assert "ns5/svc5:p80" in text
    assert "ns1/svc1" not in text and "KUBE-POSTROUTING" not in text


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    from minikproxy.changes import ClusterTracker
    from minikproxy.compile.iptables import IptablesOptions, compile_iptables
    from minikproxy.testing.synthetic import synthetic_cluster

    tracker = ClusterTracker("node-0")
    tracker.add_objects(synthetic_cluster(101, 10))  # 1010 endpoints > 1000
    large = compile_iptables(tracker.snapshot(IPV4).state, IptablesOptions()).render()
    tracker = ClusterTracker("node-0")
    tracker.add_objects(synthetic_cluster(99, 10))
    small = compile_iptables(tracker.snapshot(IPV4).state, IptablesOptions()).render()
    sep_rule = re.compile(r"^-A KUBE-SEP-\S+ (.*)$", re.M)
    assert all("--comment" not in m for m in sep_rule.findall(large))
    assert all(m.startswith("-m comment --comment ns-") for m in sep_rule.findall(small))
    assert " -> 10." not in large and " -> 10." in small


def test_rule_counts_match_the_rendered_ruleset() -> None:
    ruleset = overall_ruleset()
    tables = parse_restore(ruleset.render(jumps=False, canary=False))
    expected = {t: sum(len(rules) for rules in chains.values()) for t, chains in tables.items()}
    assert ruleset.rule_counts() == expected


def test_stale_chains_are_flushed_and_deleted_in_a_full_render() -> None:
    text = overall_ruleset().render(delete_chains=["KUBE-SVC-STALE0000000000"])
    nat = text[text.index("*nat") :]
    assert ":KUBE-SVC-STALE0000000000 - [0:0]" in nat
    assert nat.index(":KUBE-SVC-STALE") < nat.index("-X KUBE-SVC-STALE0000000000")
