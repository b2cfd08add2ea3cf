"""The kernel accepts every compiled ruleset, and a partial restore after a change leaves the
kernel exactly where a full restore of the new state would."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import _chain_edits, compile_iptables
from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import load_manifests
from minikproxy.testing.netns import Topology
from minikproxy.testing.soak import normalized_rules
from minikproxy.testing.strategies import NODE, clusters
from minikproxy.testing.synthetic import synthetic_cluster, synthetic_slice

from ..unit.test_iptables_properties import options

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).parent.parent.parent
BACKENDS = ("nft", "legacy")


def restore_test(topo: Topology, text: str, family: IPFamily, backend: str) -> None:
    binary = ("iptables" if family == IPV4 else "ip6tables") + f"-{backend}-restore"
    topo.node_exec([binary, "--test"], input=text)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", [IPV4, IPV6])
@pytest.mark.parametrize(
    "manifests",
    ["examples/cluster", "tests/data/overall-cluster.yaml"],
    ids=["examples", "overall"],
)
def test_golden_rulesets_are_accepted(
    module_topology: Topology, manifests: str, family: IPFamily, backend: str
) -> None:
    config = ProxyConfig(cluster_cidr="10.0.0.0/8,fd00:10::/32", hostname_override="node-a")
    result = render_objects(load_manifests([str(ROOT / manifests)], []), config, families=[family])
    restore_test(module_topology, result.payloads[family], family, backend)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(objs=clusters(), family=st.sampled_from([IPV4, IPV6]), backend=st.sampled_from(BACKENDS))
def test_random_clusters_are_accepted(
    module_topology: Topology, objs: list[dict[str, Any]], family: IPFamily, backend: str
) -> None:
    tracker = ClusterTracker(NODE)
    tracker.add_objects(objs)
    text = compile_iptables(tracker.snapshot(family).state, options(family)).render()
    restore_test(module_topology, text, family, backend)


def normalized_save(topo: Topology, backend: str) -> list[str]:
    """iptables-save without counters or comments, each chain's rules in their order."""
    return normalized_rules(topo.iptables_save(IPV4, backend))  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_restore_matches_full_restore_in_the_kernel(
    topology: Topology, backend: str
) -> None:
    tracker = ClusterTracker("node-0")
    tracker.add_objects(synthetic_cluster(60, 4))
    opts = options(IPV4)
    first = compile_iptables(tracker.snapshot(IPV4).state, opts)
    topology.load_iptables(first.render(), backend=backend)  # type: ignore[arg-type]

    # Change endpoints of one service, delete another, scale a third to zero, add a new one.
    tracker.upsert_endpoint_slice(synthetic_slice(3, 4, generation=1))
    tracker.delete_service({"metadata": {"namespace": "ns-7", "name": "svc-7"}})
    tracker.upsert_endpoint_slice(synthetic_slice(9, 0))
    tracker.add_objects(synthetic_cluster(61, 4)[-2:])
    snapshot = tracker.snapshot(IPV4)
    second = compile_iptables(
        snapshot.state, opts, previous=first, changed_services=snapshot.changed
    )
    partial = second.render_partial()
    assert 0 < len(partial) < len(second.render()) / 5
    topology.load_iptables(partial, backend=backend, noflush=True)  # type: ignore[arg-type]
    after_partial = normalized_save(topology, backend)

    topology.reset_rules()
    topology.load_iptables(second.render(), backend=backend)  # type: ignore[arg-type]
    assert after_partial == normalized_save(topology, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_chain_edits_end_like_a_rewrite(topology: Topology, backend: str) -> None:
    """The ``-D n``/``-I n``/``-A`` edits of a top-level chain, applied by the real
    iptables-restore in one transaction, leave the chain exactly as writing it whole would."""
    rng = random.Random(11)
    targets = "".join(f":T{i} - [0:0]\n" for i in range(4))

    def rule(n: int) -> str:
        return (
            f'-A KUBE-TEST -m comment --comment "r{n}" -d 10.0.{n // 250}.{n % 250}/32 -j T{n % 4}'
        )

    def load(chain: list[str]) -> None:
        text = f"*nat\n{targets}:KUBE-TEST - [0:0]\n" + "".join(f"{r}\n" for r in chain)
        topology.load_iptables(text + "COMMIT\n", backend=backend, noflush=True)  # type: ignore[arg-type]

    def saved() -> list[str]:
        return [line for line in normalized_save(topology, backend) if "KUBE-TEST" in line]

    fresh = iter(range(1000, 100000))
    for _ in range(30):
        old = [rule(n) for n in sorted(rng.sample(range(1000), rng.randint(0, 30)))]
        new = list(old)
        for _ in range(rng.randint(1, 6)):
            at = rng.randint(0, len(new))
            if new and rng.random() < 0.5:
                del new[min(at, len(new) - 1)]
            else:  # a run of new rules, as when a Service with several ports appears
                new[at:at] = [rule(next(fresh)) for _ in range(rng.randint(1, 3))]
        edits = _chain_edits("KUBE-TEST", "\n".join(old), "\n".join(new))
        if edits is None:
            continue  # rewritten whole: nothing to check here
        load(old)
        topology.load_iptables(f"*nat\n{''.join(edits)}COMMIT\n", backend=backend, noflush=True)  # type: ignore[arg-type]
        after_edits = saved()
        load(new)
        assert after_edits == saved()
