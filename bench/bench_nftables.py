"""nftables flat layout at 10k Services x 10 endpoints: full compile (plus render), and the
first ``nft -f`` load of that script into an empty network namespace, kernel included.

Run: .venv/bin/python -m pytest bench/bench_nftables.py --benchmark-only
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions

from .conftest import tracked


def nft_options() -> NftablesOptions:
    """Options like a real node's: ClusterCIDR detection, a node IP, a service CIDR."""
    return NftablesOptions(
        local=LocalMatch("saddr", "10.128.0.0/9"),
        node_ip="192.168.0.10",
        nodeport_addresses=("192.168.0.10",),
        service_cidrs=("172.16.0.0/12",),
    )


@pytest.mark.parametrize("services", [1000, 10000])
def test_nftables_full_compile(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A full compile and render of the complete ``nft -f`` script."""
    _, snapshot = tracked(services)
    options = nft_options()
    script = compile_nftables(snapshot.state, options).render()
    benchmark.extra_info["lines"] = script.count("\n")
    benchmark.extra_info["bytes"] = len(script)
    benchmark.pedantic(
        lambda: compile_nftables(snapshot.state, options).render(), rounds=5, iterations=1
    )


@pytest.fixture
def empty_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    names: list[str] = []

    def fresh() -> str:
        name = f"mkpbench{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        names.append(name)
        return name

    yield fresh  # type: ignore[misc]
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize("services", [1000, 10000])
def test_nftables_first_load(benchmark, empty_netns, services: int) -> None:  # type: ignore[no-untyped-def]
    """``nft -f`` of the complete script into a new, empty network namespace."""
    _, snapshot = tracked(services)
    script = compile_nftables(snapshot.state, nft_options()).render()
    fresh = empty_netns

    def setup() -> tuple[tuple[str], dict[str, str]]:
        return (fresh(),), {}

    def load(netns: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, text=True, check=True
        )

    benchmark.pedantic(load, setup=setup, rounds=3, iterations=1)
