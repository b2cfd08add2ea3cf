"""First-packet cost: the time a new TCP connection to a ClusterIP takes through the node's
rules, at 100 and 10k Services (x 3 endpoints), per mode.

A client netns connects to a random ClusterIP among N (each connect is a new connection, so
its SYN walks the nat rules); the node netns DNATs; a backend netns answers. The figure is
Python's ``connect()`` time (median of 2000 after 200 warm-up; p99 in ``extra_info``).
Compare within one run: what matters is how each mode's cost grows from 100 to 10k (the
iptables layout walks KUBE-SERVICES linearly; the flat nftables layout looks up maps).
kube-proxy's nftables layout at 10k loads in minutes: only with
``MINIKPROXY_BENCH_KUBEPROXY_10K=1``. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_first_packet.py --benchmark-only
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import compile_iptables
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.names import IPV4
from minikproxy.testing.netns import Topology
from minikproxy.testing.synthetic import synthetic_node, synthetic_service

from .conftest import bench_nft_options, bench_options

BACKENDS = ("10.10.2.2", "10.10.2.3", "10.10.2.4")
CONNECTS, WARMUP = 2000, 200

SLOW = pytest.mark.skipif(
    os.environ.get("MINIKPROXY_BENCH_KUBEPROXY_10K") != "1",
    reason="kube-proxy's nftables layout loads in minutes at 10k: "
    "set MINIKPROXY_BENCH_KUBEPROXY_10K=1",
)
CASES = [
    pytest.param(("nftables-flat", 100), id="nftables-flat-100"),
    pytest.param(("nftables-flat", 10000), id="nftables-flat-10k"),
    pytest.param(("iptables", 100), id="iptables-100"),
    pytest.param(("iptables", 10000), id="iptables-10k"),
    pytest.param(("nftables-kube-proxy", 100), id="nftables-kube-proxy-100"),
    pytest.param(("nftables-kube-proxy", 10000), id="nftables-kube-proxy-10k", marks=SLOW),
]


def cluster(services: int) -> list[dict[str, Any]]:
    """``services`` ClusterIP Services whose endpoints are the topology's real backends."""
    objs: list[dict[str, Any]] = [synthetic_node()]
    for i in range(services):
        svc = synthetic_service(i)
        objs.append(svc)
        objs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"svc-{i}-abcde",
                    "namespace": svc["metadata"]["namespace"],
                    "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                },
                "addressType": "IPv4",
                "endpoints": [
                    {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-1"}
                    for ip in BACKENDS
                ],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        )
    return objs


@pytest.fixture(scope="module", params=CASES)
def loaded(request: pytest.FixtureRequest) -> Iterator[tuple[Topology, list[str], str]]:
    mode, services = request.param
    objs = cluster(services)
    tracker = ClusterTracker("node-0")
    tracker.add_objects(objs)
    state = tracker.snapshot(IPV4).state
    vips = [o["spec"]["clusterIP"] for o in objs if o["kind"] == "Service"]
    with Topology() as topo:
        topo.serve_backends(8080, protos=("tcp",), family="IPv4")
        start = time.perf_counter()
        if mode == "iptables":
            topo.load_iptables(compile_iptables(state, bench_options()).render())
        elif mode == "nftables-flat":
            topo.load_nft(compile_nftables(state, bench_nft_options()).render())
        else:
            topo.load_nft(compile_nftables_kubeproxy(state, bench_nft_options()).render())
        yield topo, vips, f"{time.perf_counter() - start:.2f} s"


def test_new_connection_to_cluster_ip(benchmark: Any, loaded: Any) -> None:
    """One new TCP connection (connect, then close) to a random ClusterIP."""
    topo, vips, load_time = loaded
    benchmark.extra_info["load"] = load_time
    rng = random.Random(1)
    targets = iter([rng.choice(vips) for _ in range(CONNECTS + WARMUP + 10)])

    def connect() -> None:
        with socket.create_connection((next(targets), 80), timeout=2.0):
            pass

    def measure() -> None:
        benchmark.pedantic(connect, rounds=CONNECTS, iterations=1, warmup_rounds=WARMUP)

    run_in_netns(topo.namespaces["client"], measure)
    times = sorted(benchmark.stats.stats.data)
    benchmark.extra_info["p99_us"] = round(times[int(len(times) * 0.99)] * 1e6, 1)
