"""kube-proxy's nftables layout: full compile + render, and its ``nft -f`` load into an empty
network namespace, at 1k and 10k Services x 10 endpoints.

Run: .venv/bin/python -m pytest bench/bench_nftables_kubeproxy.py --benchmark-only
(the 10k load takes minutes: nft 1.0.6 loads this layout in time growing faster than
linearly with the number of chains, as kube-proxy's own issue k/k#135639 reports).
"""

from __future__ import annotations

import pytest

from minikproxy.compile import nftables_kubeproxy
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy

from .conftest import bench_nft_load, bench_nft_options, tracked


@pytest.mark.parametrize("services", [1000, 10000])
def test_full_compile_and_render(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A full compile and render (chain-name hashes cached, as in every sync after the first)."""
    _, snapshot = tracked(services)
    options = bench_nft_options()
    text = compile_nftables_kubeproxy(snapshot.state, options).render()
    benchmark.extra_info["lines"] = text.count("\n")
    benchmark.pedantic(
        lambda: compile_nftables_kubeproxy(snapshot.state, options).render(),
        rounds=5,
        iterations=1,
    )


@pytest.mark.parametrize("services", [1000])
def test_full_compile_cold(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A first compile in a fresh process: every chain name hashed."""
    _, snapshot = tracked(services)
    options = bench_nft_options()
    benchmark.pedantic(
        lambda: compile_nftables_kubeproxy(snapshot.state, options).render(),
        setup=nftables_kubeproxy.hash_and_truncate.cache_clear,
        rounds=5,
        iterations=1,
    )


@pytest.mark.parametrize(("services", "rounds"), [(1000, 5), (10000, 1)])
def test_nft_load_into_empty_netns(benchmark, services: int, rounds: int) -> None:  # type: ignore[no-untyped-def]
    """``nft -f`` of the whole script into a fresh network namespace (created per round)."""
    _, snapshot = tracked(services)
    text = compile_nftables_kubeproxy(snapshot.state, bench_nft_options()).render()
    bench_nft_load(benchmark, text, rounds)
