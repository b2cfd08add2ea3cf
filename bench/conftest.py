"""Shared fixtures: synthetic kube-proxy-shaped clusters, built once per size."""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from functools import cache
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.model.names import IPV4
from minikproxy.testing.synthetic import synthetic_cluster

ENDPOINTS_PER_SERVICE = 10


@cache
def tracked(services: int) -> tuple[ClusterTracker, Snapshot]:
    """A tracker fed ``services`` x 10 endpoints, and its first IPv4 snapshot."""
    tracker = ClusterTracker("node-0")
    tracker.add_objects(synthetic_cluster(services, ENDPOINTS_PER_SERVICE))
    return tracker, tracker.snapshot(IPV4)


def bench_options() -> IptablesOptions:
    """Options like a real node's: ClusterCIDR detection, a node IP."""
    detector = make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=["10.128.0.0/9"])
    return IptablesOptions(local_detector=detector, node_ip="192.168.0.10")


def bench_nft_options() -> NftablesOptions:
    """nftables options like a real node's: ClusterCIDR detection, a node IP, a service CIDR."""
    return NftablesOptions(
        local=LocalMatch("saddr", "10.128.0.0/9"),
        node_ip="192.168.0.10",
        nodeport_addresses=("192.168.0.10",),
        service_cidrs=("172.16.0.0/12",),
    )


def bench_nft_load(benchmark: Any, text: str, rounds: int) -> None:
    """Benchmark ``nft -f`` of the script ``text`` into a fresh, empty network namespace (one
    created per round, outside the timing; all deleted afterwards). Skips when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    created: list[str] = []
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as script:
        script.write(text)
        script.flush()

        def fresh_netns() -> tuple[tuple[str], dict[str, str]]:
            netns = f"mkpbench-{secrets.token_hex(3)}"
            subprocess.run(["ip", "netns", "add", netns], check=True)
            created.append(netns)
            return (netns,), {}

        def load(netns: str) -> None:
            subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", script.name], check=True)

        try:
            benchmark.pedantic(load, setup=fresh_netns, rounds=rounds, iterations=1)
        finally:
            for netns in created:
                subprocess.run(["ip", "netns", "del", netns], check=False)
