"""Property tests: random valid clusters compile deterministically, every jump has a target,
and a partial restore after any change leaves the same rules as a full restore."""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import (
    IptablesOptions,
    IptablesRuleset,
    _chain_edits,
    compile_iptables,
)
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.testing.strategies import NODE, clusters, feed_change, service_with_slices

from .api_objects import endpoint_slice
from .test_iptables_golden import undefined_jumps

Tables = dict[str, dict[str, list[str]]]
PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def options(family: IPFamily, large_cluster_threshold: int = 1000) -> IptablesOptions:
    cidr = "10.244.0.0/16" if family == IPV4 else "fd00:10:244::/56"
    detector = make_local_detector("ClusterCIDR", family, cluster_cidrs=[cidr])
    node_ip = "192.168.1.10" if family == IPV4 else "fd00:192:168:1::10"
    return IptablesOptions(
        family=family,
        local_detector=detector,
        node_ip=node_ip,
        large_cluster_threshold=large_cluster_threshold,
    )


def compile_objects(
    objs: list[dict[str, Any]], family: IPFamily, large_cluster_threshold: int = 1000
) -> IptablesRuleset:
    tracker = ClusterTracker(NODE)
    tracker.add_objects(objs)
    return compile_iptables(
        tracker.snapshot(family).state, options(family, large_cluster_threshold)
    )


def apply_restore(tables: Tables, text: str, *, noflush: bool) -> None:
    """Apply iptables-restore input the way the kernel does (minus matching)."""
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if not noflush:
                tables[line[1:]] = {}
            current = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            current[line[1:].split()[0]] = []  # declare, or flush an existing chain
        elif line.startswith("-A "):
            chain = line.split()[1]
            assert chain in current, f"rule for undeclared chain: {line}"
            current[chain].append(line)
        elif line.startswith("-D "):  # by spec: what the compiler writes
            _, chain, spec = line.split(" ", 2)
            current[chain].remove(f"-A {chain} {spec}")  # ValueError if not there
        elif line.startswith("-I "):
            _, chain, number, spec = line.split(" ", 3)
            assert 1 <= int(number) <= len(current[chain]), f"bad position: {line}"
            current[chain].insert(int(number) - 1, f"-A {chain} {spec}")
        elif line.startswith("-X "):
            chain = line.split()[1]
            referencing = [r for rules in current.values() for r in rules if f"-j {chain}" in r]
            assert not referencing, f"deleting {chain} still referenced by {referencing}"
            del current[chain]
        elif line != "COMMIT":
            raise AssertionError(f"unexpected restore line {line!r}")


@PROPERTY_SETTINGS
@given(objs=clusters(), family=st.sampled_from([IPV4, IPV6]), seed=st.integers(0, 1000))
def test_compile_is_deterministic_and_order_independent(
    objs: list[dict[str, Any]], family: IPFamily, seed: int
) -> None:
    first = compile_objects(objs, family).render()
    shuffled = list(objs)
    random.Random(seed).shuffle(shuffled)
    assert compile_objects(shuffled, family).render() == first
    assert undefined_jumps(first) == []


@st.composite
def cluster_and_change(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A cluster, and the same cluster after replacing, deleting and adding Services."""
    before = draw(clusters(max_services=6))
    services = sorted({o["metadata"]["name"] for o in before if o["kind"] == "Service"})
    after = [o for o in before if o["kind"] == "Node"]
    for name in services:
        own = [o for o in before if o["metadata"]["name"].split("-")[0] == name]
        action = draw(st.sampled_from(["keep", "keep", "replace", "delete"]))
        if action == "keep":
            after.extend(own)
        elif action == "replace":
            after.extend(draw(service_with_slices(int(name[3:]))))
    for extra in range(draw(st.integers(0, 2))):
        after.extend(draw(service_with_slices(20 + extra)))
    return before, after


@PROPERTY_SETTINGS
@given(
    change=cluster_and_change(),
    family=st.sampled_from([IPV4, IPV6]),
    # 1000: never a large cluster here; 6: the change often crosses the threshold.
    threshold=st.sampled_from([1000, 6]),
)
def test_partial_restore_equals_full_restore(
    change: tuple[list[dict[str, Any]], list[dict[str, Any]]], family: IPFamily, threshold: int
) -> None:
    before, after = change
    tracker = ClusterTracker(NODE)
    tracker.add_objects(before)
    first = compile_iptables(tracker.snapshot(family).state, options(family, threshold))
    kernel: Tables = {}
    apply_restore(kernel, first.render(jumps=False), noflush=False)

    feed_change(tracker, before, after)  # as watch events would arrive
    snapshot = tracker.snapshot(family)
    assert snapshot.changed is not None  # the incremental path, not a full recompile
    partial = compile_iptables(
        snapshot.state,
        options(family, threshold),
        previous=first,
        changed_services=snapshot.changed,
    )
    assert partial.changed is not None  # a partial restore, also across the threshold
    apply_restore(kernel, partial.render_partial(), noflush=True)

    full = compile_objects(after, family, threshold)
    expected: Tables = {}
    apply_restore(expected, full.render(jumps=False), noflush=False)
    assert kernel == expected
    assert partial.render(jumps=False) == full.render(jumps=False)
    assert partial.rule_counts() == full.rule_counts()


def _ten_endpoint_cluster(endpoints: int) -> list[dict[str, Any]]:
    ips = [f"10.244.1.{i + 2}" for i in range(endpoints)]
    return [
        {
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "p", "port": 80}]},
        },
        endpoint_slice("web", *ips),
    ]


def test_partial_restore_writes_only_the_chains_that_changed() -> None:
    tracker = ClusterTracker(NODE)
    tracker.add_objects(_ten_endpoint_cluster(10))
    first = compile_iptables(tracker.snapshot(IPV4).state, options(IPV4))
    tracker.add_objects(_ten_endpoint_cluster(11)[1:])  # one endpoint more
    snapshot = tracker.snapshot(IPV4)
    second = compile_iptables(
        snapshot.state, options(IPV4), previous=first, changed_services=snapshot.changed
    )
    written = [line for line in second.render_partial().splitlines() if line.startswith(":")]
    new_sep = [c for c in second.all_chains()["nat"] - first.all_chains()["nat"]]
    assert len(new_sep) == 1 and new_sep[0].startswith("KUBE-SEP-")
    # The service chain (new probabilities) and the new endpoint's chain; the ten unchanged
    # endpoint chains are left alone. KUBE-SERVICES did not change either.
    assert sorted(written) == sorted(
        [f":{c} - [0:0]" for c in (*new_sep, *(c for c in first.all_chains()["nat"]
                                                if c.startswith("KUBE-SVC-")))]
    )  # fmt: skip
    # kube-proxy's own strategy writes every chain of the service (and the top level).
    kube_proxy_style = second.render_partial(rewrite_top_level=True)
    assert kube_proxy_style.count(":KUBE-SEP-") == 11


def test_a_ruleset_does_not_keep_its_predecessors_alive() -> None:
    tracker = ClusterTracker(NODE)
    tracker.add_objects(_ten_endpoint_cluster(3))
    ruleset = compile_iptables(tracker.snapshot(IPV4).state, options(IPV4))
    first = weakref.ref(ruleset)
    for endpoints in (4, 5, 6):
        tracker.add_objects(_ten_endpoint_cluster(endpoints)[1:])
        snapshot = tracker.snapshot(IPV4)
        ruleset = compile_iptables(
            snapshot.state, options(IPV4), previous=ruleset, changed_services=snapshot.changed
        )
    gc.collect()
    assert first() is None
    assert ruleset.render_partial()  # still knows what to write


def test_chain_edits_fall_back_to_a_rewrite_when_lines_repeat_or_move() -> None:
    rules = [f"-A KUBE-SERVICES -d 10.0.0.{i} -j X{i}" for i in range(10)]
    old = "\n".join(rules)
    assert _chain_edits("KUBE-SERVICES", old, "\n".join([*rules, rules[3]])) is None
    moved = [rules[1], rules[0], *rules[2:]]
    assert _chain_edits("KUBE-SERVICES", old, "\n".join(moved)) is None
    edits = _chain_edits(
        "KUBE-SERVICES", old, "\n".join([*rules[:4], "-A KUBE-SERVICES -j Y", *rules[5:]])
    )
    assert edits == ["-D KUBE-SERVICES -d 10.0.0.4 -j X4\n", "-I KUBE-SERVICES 5 -j Y\n"]
