"""Shared fixtures: the benchmark engine's synthetic clusters (:mod:`minikproxy.benchmark`),
built once per size, and its node options and scratch namespaces."""

from __future__ import annotations

import os
import tempfile
from functools import cache
from typing import Any

import pytest

from minikproxy.benchmark.adapters import iptables_options, nftables_options
from minikproxy.benchmark.measure import build_cluster, scratch_namespaces
from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.nftables_options import NftablesOptions

ENDPOINTS_PER_SERVICE = 10


@cache
def tracked(services: int) -> tuple[ClusterTracker, Snapshot]:
    """A tracker fed the engine's cluster of ``services`` x 10 endpoints, and its first IPv4
    snapshot."""
    cluster = build_cluster(services, ENDPOINTS_PER_SERVICE)
    return cluster.tracker, cluster.snapshot


def bench_options() -> IptablesOptions:
    """Options like a real node's: ClusterCIDR detection, a node IP (the engine's)."""
    return iptables_options()


def bench_nft_options() -> NftablesOptions:
    """nftables options like a real node's (the engine's)."""
    return nftables_options()


def bench_nft_load(benchmark: Any, text: str, rounds: int) -> None:
    """Benchmark ``nft -f`` of the script ``text`` into a fresh, empty network namespace (one
    created per round, outside the timing; all deleted afterwards). Skips when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    import subprocess

    with tempfile.NamedTemporaryFile("w", suffix=".nft") as script, scratch_namespaces() as ns:
        script.write(text)
        script.flush()

        def fresh_netns() -> tuple[tuple[str], dict[str, str]]:
            return (ns.fresh(),), {}

        def load(netns: str) -> None:
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", script.name], check=True)

        benchmark.pedantic(load, setup=fresh_netns, rounds=rounds, iterations=1)
