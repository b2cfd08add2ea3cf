"""The nftables applier through one long-lived libnftables context, both layouts (flat
``minikproxy`` and kube-proxy's ``kube-proxy`` table), at 1k and 10k Services x 10 endpoints:
one endpoint change (``apply_changes``: diff + one transaction: element deletes and adds in the
flat layout, the Service's chains re-created in kube-proxy's), and the canary check
(``table_intact``).

The table is loaded once per size into a fresh network namespace; rounds alternate between two
rulesets that differ in one endpoint of one Service, so every round is a real change.

One run on the shared 2-core box (medians of 40): flat layout, one endpoint change 0.50-0.56 ms
at 1k and 10k (the transaction alone 0.50 ms), canary 10 us at both; kube-proxy's layout 39 ms
at 1k, and at 10k (run once by adding ``("kube-proxy", 10000)`` to the params) 1.2 s per
change after a 178 s full load (its update re-creates the Service's chains; presumably
libnftables first reads the table's 110k chains into its cache, not profiled).

Run: .venv/bin/python -m pytest bench/bench_nftables_apply.py --benchmark-only
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from minikproxy.benchmark.measure import build_cluster, scratch_namespaces
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.compile.nftables_options import NftablesOptions
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.state import ProxyState
from minikproxy.testing.synthetic import synthetic_slice

from .conftest import ENDPOINTS_PER_SERVICE, bench_nft_options


@dataclass
class Loaded:
    """An applier whose namespace holds ``rulesets[0]``; ``rulesets[1]`` moves one endpoint."""

    applier: NftablesApplier
    rulesets: tuple[Any, Any]
    changed: list[ServicePortName]
    full_load_seconds: float
    current: int = 0

    def flip(self) -> None:
        """Apply the other ruleset (one endpoint change)."""
        nxt = 1 - self.current
        full = self.applier.apply_changes(
            self.rulesets[self.current], self.rulesets[nxt], self.changed
        )
        assert not full
        self.current = nxt


COMPILERS: dict[str, Callable[[ProxyState, NftablesOptions], Any]] = {
    "flat": compile_nftables,
    "kube-proxy": compile_nftables_kubeproxy,
}


@pytest.fixture(
    scope="module",
    # kube-proxy's layout at 10k is left out: its full load alone takes ~3 min (see above).
    params=[("flat", 1000), ("flat", 10000), ("kube-proxy", 1000)],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def loaded(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    layout: str = request.param[0]
    services: int = request.param[1]
    compile_fn = COMPILERS[layout]
    tracker = build_cluster(services, ENDPOINTS_PER_SERVICE).tracker
    options = bench_nft_options()
    first = compile_fn(tracker.snapshot(IPV4).state, options)
    victim = services // 2
    obj = copy.deepcopy(synthetic_slice(victim, ENDPOINTS_PER_SERVICE))
    obj["endpoints"][0]["addresses"] = ["10.255.255.1"]
    obj["metadata"]["resourceVersion"] = "2"
    tracker.upsert_endpoint_slice(obj)
    snap = tracker.snapshot(IPV4)
    assert snap.changed is not None
    second = compile_fn(snap.state, options)
    changed = [name for name in snap.state.services if name.service in snap.changed]
    # Warm both rulesets' cached reference counts (a compile-side cost paid once per ruleset).
    assert second.incremental_script(first, changed)
    assert first.incremental_script(second, changed)
    with scratch_namespaces() as scratch:
        applier = NftablesApplier(netns=scratch.fresh())
        try:
            start = time.perf_counter()
            applier.apply_full(first)
            elapsed = time.perf_counter() - start
            yield Loaded(applier, (first, second), changed, elapsed)
        finally:
            applier.close()


def test_nftables_apply_endpoint_change(benchmark, loaded: Loaded) -> None:  # type: ignore[no-untyped-def]
    """One endpoint of one Service changes: ``apply_changes`` (diff + kernel transaction)."""
    script = loaded.rulesets[1].incremental_script(loaded.rulesets[0], loaded.changed)
    assert script
    benchmark.extra_info["services"] = len(loaded.rulesets[0].services)
    benchmark.extra_info["script_lines"] = script.count("\n")
    benchmark.extra_info["full_load_s"] = round(loaded.full_load_seconds, 3)
    benchmark.pedantic(loaded.flip, rounds=40, iterations=1, warmup_rounds=2)
    assert loaded.applier.table_intact(loaded.rulesets[loaded.current])


def test_nftables_table_intact(benchmark, loaded: Loaded) -> None:  # type: ignore[no-untyped-def]
    """The canary check: list one small base chain, never the table's sets and maps."""
    ruleset = loaded.rulesets[loaded.current]
    assert benchmark.pedantic(
        lambda: loaded.applier.table_intact(ruleset), rounds=40, iterations=1, warmup_rounds=2
    )


def test_nftables_endpoint_change_transaction_only(benchmark, loaded: Loaded) -> None:  # type: ignore[no-untyped-def]
    """The same change as one precomputed script through the context: the kernel's share."""
    first, second = loaded.rulesets
    if loaded.current == 1:
        first, second = second, first
    forward = second.incremental_script(first, loaded.changed)
    back = first.incremental_script(second, loaded.changed)
    assert forward and back
    scripts = [forward, back]
    state = [0]

    def flip() -> None:
        loaded.applier.context.run(scripts[state[0]])
        state[0] ^= 1

    benchmark.pedantic(flip, rounds=40, iterations=1, warmup_rounds=2)
    if state[0]:
        flip()  # leave the table as ``loaded.current`` says
    assert loaded.applier.table_intact(first)
