"""Every proxy mode through the benchmark engine (:mod:`minikproxy.benchmark`, the same code
``minikproxy bench`` runs): a first sync into an empty namespace (full compile and the
controller's own full apply), and one EndpointSlice change compiled (snapshot, incremental
compile, the text sent), at 1k and 10k Services x 10 endpoints. A first sync needs the
mode's kernel: where the engine's adapter reports it unavailable (IPVS on a kernel without
it), that case is skipped with the adapter's reason, as ``minikproxy bench`` skips it (IPVS
kernel figures come from the IPVS VM); the one-change compile runs in dry-run everywhere.

Run: .venv/bin/python -m pytest bench/bench_modes.py --benchmark-only
(``minikproxy bench`` measures the same and more, with a report.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.benchmark.adapters import ADAPTERS, ModeAdapter
from minikproxy.benchmark.measure import Scratch, scratch_namespaces
from minikproxy.model.names import IPV4
from minikproxy.testing.synthetic import synthetic_slice

from .conftest import ENDPOINTS_PER_SERVICE, tracked

MODES = sorted(ADAPTERS)


def available(mode: str) -> ModeAdapter:
    """The engine's adapter of ``mode``; skips the test when it reports itself unavailable."""
    adapter = ADAPTERS[mode]()
    reason = adapter.unavailable()
    if reason is not None:
        pytest.skip(f"{mode} unavailable: {reason}")
    return adapter


@pytest.fixture(scope="module")
def scratch() -> Iterator[Scratch]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with scratch_namespaces() as ns:
        yield ns


@pytest.mark.parametrize("services", [1000, 10000])
@pytest.mark.parametrize("mode", MODES)
def test_first_sync(benchmark: Any, scratch: Scratch, mode: str, services: int) -> None:
    """Full compile + the mode's full apply into a new empty namespace (made outside)."""
    adapter = available(mode)
    _, snapshot = tracked(services)
    live: list[Any] = []

    def setup() -> tuple[tuple[Any], dict[str, Any]]:
        netns = scratch.fresh()
        live.append((adapter.build(netns), netns))
        return (live[-1][0],), {}

    def first_sync(proxy_mode: Any) -> None:
        proxy_mode.apply(adapter.compile(proxy_mode, snapshot.state), None, True)

    try:
        benchmark.pedantic(first_sync, setup=setup, rounds=1 if services > 1000 else 3)
    finally:
        for proxy_mode, netns in live:
            proxy_mode.close()
            scratch.drop(netns)


@pytest.mark.parametrize("services", [1000, 10000])
@pytest.mark.parametrize("mode", MODES)
def test_one_change(benchmark: Any, mode: str, services: int) -> None:
    """One EndpointSlice changes: snapshot, the mode's incremental compile, the text sent."""
    adapter = ADAPTERS[mode]()
    tracker, snapshot = tracked(services)
    proxy_mode = adapter.build()
    state = {"plan": adapter.compile(proxy_mode, snapshot.state), "generation": 0}
    target = services // 2

    def change() -> None:
        state["generation"] += 1
        tracker.upsert_endpoint_slice(
            synthetic_slice(target, ENDPOINTS_PER_SERVICE, generation=state["generation"])
        )
        snap = tracker.snapshot(IPV4)
        new = proxy_mode.compile(snap.state, adapter.options(), state["plan"], snap.changed)
        adapter.increment_text(proxy_mode, state["plan"], new)
        state["plan"] = new

    try:
        benchmark.pedantic(change, rounds=20, iterations=1, warmup_rounds=1)
    finally:
        tracker.upsert_endpoint_slice(synthetic_slice(target, ENDPOINTS_PER_SERVICE))
        tracker.snapshot(IPV4)
