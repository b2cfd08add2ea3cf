"""nftables flat layout at 10k Services x 10 endpoints: full compile (plus render), and the
first ``nft -f`` load of that script into an empty network namespace, kernel included.

Run: .venv/bin/python -m pytest bench/bench_nftables.py --benchmark-only
"""

from __future__ import annotations

import pytest

from minikproxy.compile.nftables import compile_nftables

from .conftest import bench_nft_load, bench_nft_options, tracked


@pytest.mark.parametrize("services", [1000, 10000])
def test_nftables_full_compile(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A full compile and render of the complete ``nft -f`` script."""
    _, snapshot = tracked(services)
    options = bench_nft_options()
    script = compile_nftables(snapshot.state, options).render()
    benchmark.extra_info["lines"] = script.count("\n")
    benchmark.extra_info["bytes"] = len(script)
    benchmark.pedantic(
        lambda: compile_nftables(snapshot.state, options).render(), rounds=5, iterations=1
    )


@pytest.mark.parametrize("services", [1000, 10000])
def test_nftables_first_load(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """``nft -f`` of the complete script into a new, empty network namespace."""
    _, snapshot = tracked(services)
    bench_nft_load(benchmark, compile_nftables(snapshot.state, bench_nft_options()).render(), 3)
