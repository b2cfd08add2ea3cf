"""Property, in the kernel: after any random sequence of changes, the table that incremental
applies left equals a fresh full load of the final state, for both nftables layouts and both
IP families.

Two empty network namespaces per layout and family: in ``incremental``, the first state is
loaded whole (``NftablesApplier.apply_full``) and every later one through
``NftablesApplier.apply_changes`` as the nftables mode does it (the flat layout recompiled
incrementally from the previous ruleset, its changed ports' elements sent; kube-proxy's
partial sync for its layout; a full replace when the ruleset says so); in ``reference`` the final
state is loaded whole. The two ``nft list table`` outputs must be equal once normalised:
top-level objects sorted by name (incrementally added chains come last in the kernel's
order), set and map elements sorted (hash order); rule order within a chain is kept.
"""

from __future__ import annotations

import itertools
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.config import ProxyConfig
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, IPV6, IPFamily, ServicePortName
from minikproxy.nodeopts import nftables_options
from minikproxy.testing.strategies import NODE, cluster_histories, feed_change

pytestmark = pytest.mark.kernel

COMPILERS: dict[str, Callable[..., Any]] = {
    "flat": compile_nftables,
    "kube-proxy": compile_nftables_kubeproxy,
}
TABLES = {"flat": "minikproxy", "kube-proxy": "kube-proxy"}
CONFIG = ProxyConfig(hostname_override=NODE, cluster_cidr="10.244.0.0/16,fd00:10:244::/56")
SERVICE_CIDRS = ("10.96.0.0/12", "fd00:10:96::/112")


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[str, str]]:
    """Two empty network namespaces (incremental, reference), deleted after the module."""
    names = [f"mkpinc{secrets.token_hex(4)}" for _ in range(2)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield names[0], names[1]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def listing(ns: str, family: IPFamily, table: str) -> str:
    nft_family = "ip" if family == IPV4 else "ip6"
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "table", nft_family, table],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def normalized(text: str) -> list[str]:
    """``nft list table`` output as sorted top-level blocks with sorted elements."""
    body = re.sub(
        r"elements = \{(.*?)\}",
        lambda m: (
            "elements = { " + ", ".join(sorted(e.strip() for e in m.group(1).split(","))) + " }"
        ),
        text,
        flags=re.S,
    )
    blocks = [b.strip() for b in re.split(r"\n(?=\t(?:set|map|chain) )", body.strip()[:-1])]
    return [blocks[0], *sorted(blocks[1:])]


def changed_ports(previous: Any, ruleset: Any, changed: frozenset[Any]) -> list[ServicePortName]:
    """The ports of the changed Services, gone ones included."""
    names = set(previous.services) | set(ruleset.services)
    return sorted(n for n in names if n.service in changed)


def diff(old: list[dict[str, Any]], new: list[dict[str, Any]], tracker: ClusterTracker) -> None:
    """Feed the difference between two object lists to ``tracker`` as watch events would."""
    feed_change(tracker, old, new)


@pytest.mark.parametrize("family", [IPV4, IPV6])
@pytest.mark.parametrize("layout", ["flat", "kube-proxy"])
def test_incremental_applies_equal_a_full_load(
    namespaces: tuple[str, str], layout: str, family: IPFamily
) -> None:
    incremental, reference = namespaces
    compile_ruleset = COMPILERS[layout]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(history=cluster_histories())
    def check(history: list[list[dict[str, Any]]]) -> None:
        tracker = ClusterTracker(NODE)
        tracker.add_objects(history[0])
        options = nftables_options(CONFIG, tracker.node, family, service_cidrs=SERVICE_CIDRS)
        ruleset = compile_ruleset(tracker.snapshot(family).state, options)
        with NftablesApplier(netns=incremental) as applier:
            applier.apply_full(ruleset)
            for old, new in itertools.pairwise(history):
                diff(old, new, tracker)
                snap = tracker.snapshot(family)
                assert snap.changed is not None
                # As the nftables mode does: the flat layout recompiles only the changed
                # Services and sends their ports' elements; kube-proxy's compiles in full.
                if layout == "flat":
                    following = compile_nftables(snap.state, options, ruleset, snap.changed)
                    ports = following.changed
                    assert ports is not None
                    assert ports == frozenset(changed_ports(ruleset, following, snap.changed))
                else:
                    following = compile_ruleset(snap.state, options)
                    ports = frozenset(changed_ports(ruleset, following, snap.changed))
                applier.apply_changes(ruleset, following, ports)
                ruleset = following
            assert applier.full_applies + applier.incremental_applies >= 1
        with NftablesApplier(netns=reference) as applier:
            applier.apply_full(ruleset)
        table = TABLES[layout]
        assert normalized(listing(incremental, family, table)) == normalized(
            listing(reference, family, table)
        )

    check()
