"""The iptables apply strategies of ``minikproxy bench`` load the same rules: the benchmark
compares the time ``iptables-legacy-restore`` and python-iptables take for one ruleset, which
means something only if both end up with the same tables in the kernel."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from minikproxy.benchmark import strategies
from minikproxy.benchmark.adapters import IptablesLegacy
from minikproxy.benchmark.measure import build_cluster, scratch_namespaces
from minikproxy.benchmark.runner import Runner

pytestmark = pytest.mark.kernel

BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
#: table -> chain -> (policy, its rules in order, as iptables-save prints them)
Tables = dict[str, dict[str, tuple[str, list[str]]]]


def saved_tables(netns: str) -> Tables:
    """``iptables-legacy-save`` of ``netns``, without what legitimately differs between two
    loads of the same rules: the generated-on comment lines and the chains' packet and byte
    counters. What is kept must match: every table, chain, policy, and each chain's rules in
    order (matches, options, comments and targets, as the kernel holds them)."""
    text = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-legacy-save"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    tables: Tables = {}
    chains: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]  # dropped: the "[packets:bytes]" counters
            chains[name] = (policy, [])
        else:
            assert line.startswith("-A "), line
            chains[line.split()[1]][1].append(line)
    return tables


def without_empty_tables(tables: Tables) -> Tables:
    """Tables that hold something. A table only its built-in chains with an ACCEPT policy
    and no rule changes no packet: python-iptables brings ``raw`` and ``security`` into the
    namespace so, where ``iptables-restore`` only creates the tables its input names."""
    return {
        name: chains
        for name, chains in tables.items()
        if set(chains) - BUILTIN_CHAINS
        or any(policy != "ACCEPT" or rules for policy, rules in chains.values())
    }


def test_restore_and_python_iptables_load_the_same_rules() -> None:
    reason = strategies.python_iptables_missing()
    if reason is not None:
        pytest.skip(reason)
    payload = Runner._render(IptablesLegacy(), build_cluster(20, 3))
    with scratch_namespaces(f"mkpbst{secrets.token_hex(2)}") as scratch:
        by_restore, by_python = scratch.fresh(), scratch.fresh()
        strategies.restore_load(payload, by_restore)
        strategies.python_iptables_load(payload, by_python)
        restored, loaded = saved_tables(by_restore), saved_tables(by_python)
    # The tables the payload names, with everything in them.
    assert set(restored) == {line[1:] for line in payload.splitlines() if line.startswith("*")}
    rules = sum(len(r) for chains in restored.values() for _, r in chains.values())
    assert rules == sum(line.startswith("-A ") for line in payload.splitlines())
    assert without_empty_tables(loaded) == without_empty_tables(restored)
