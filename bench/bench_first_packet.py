"""First-packet cost: the time a new TCP connection to a ClusterIP takes through the node's
rules, at 100 and 10k Services (x 3 endpoints), per mode, on the benchmark engine
(:mod:`minikproxy.benchmark`, what ``minikproxy bench`` measures as connect latency).

The engine's cluster (:func:`~minikproxy.benchmark.measure.build_cluster`: the synthetic
Services plus the benchmark's own, whose ``datapath`` Service sorts last, so iptables'
KUBE-SERVICES walk passes every other Service first) is loaded into the node of the engine's
topology (:func:`~minikproxy.benchmark.measure.datapath_topology`) by the mode's own full
apply (:func:`~minikproxy.benchmark.measure.load_direct`). A client connects to the
``datapath`` ClusterIP (each connect is a new connection, so its SYN walks the nat rules);
the node DNATs; a backend answers. The figure is one handshake's time
(:func:`~minikproxy.benchmark.probing.connect_time`, median of 2000 after 200 warm-up; p99 in
``extra_info``, with the engine's :func:`~minikproxy.benchmark.measure.measure_datapath`
connections per second). Compare within one run: what matters is how each mode's cost grows
from 100 to 10k (the iptables layout walks KUBE-SERVICES linearly; the nftables layouts look
up maps). kube-proxy's nftables layout at 10k loads in minutes: only with
``MINIKPROXY_BENCH_KUBEPROXY_10K=1``. ``MINIKPROXY_BENCH_FIRST_PACKET_SIZES=100,1000`` (say)
replaces the two sizes. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_first_packet.py --benchmark-only
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.benchmark.adapters import ADAPTERS
from minikproxy.benchmark.cluster import DATAPATH_VIP, PORT, backend_addresses
from minikproxy.benchmark.measure import (
    build_cluster,
    datapath_topology,
    load_direct,
    measure_datapath,
)
from minikproxy.benchmark.probing import Prober, connect_time
from minikproxy.benchmark.stats import percentile

ENDPOINTS = 3
CONNECTS, WARMUP = 2000, 200
MODES = ("nftables", "iptables", "nftables-kube-proxy")
SIZES = tuple(
    int(n) for n in os.environ.get("MINIKPROXY_BENCH_FIRST_PACKET_SIZES", "100,10000").split(",")
)

SLOW = pytest.mark.skipif(
    os.environ.get("MINIKPROXY_BENCH_KUBEPROXY_10K") != "1",
    reason="kube-proxy's nftables layout loads in minutes at 10k: "
    "set MINIKPROXY_BENCH_KUBEPROXY_10K=1",
)
CASES = [
    pytest.param(
        (mode, size),
        id=f"{mode}-{size // 1000}k" if size >= 1000 and size % 1000 == 0 else f"{mode}-{size}",
        marks=[SLOW] if mode == "nftables-kube-proxy" and size >= 10000 else [],
    )
    for mode in MODES
    for size in SIZES
]


@pytest.fixture(scope="module", params=CASES)
def loaded(request: pytest.FixtureRequest) -> Iterator[tuple[Prober, str]]:
    """The engine's cluster loaded in the topology's node by ``mode``'s full apply."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    mode, services = request.param
    adapter = ADAPTERS[mode]()
    cluster = build_cluster(services, ENDPOINTS)
    with datapath_topology(backend_addresses(ENDPOINTS)) as (topo, prober):
        start = time.perf_counter()
        load_direct(adapter, topo.namespaces["node"], cluster)
        yield prober, f"{time.perf_counter() - start:.2f} s"


def test_new_connection_to_cluster_ip(benchmark: Any, loaded: tuple[Prober, str]) -> None:
    """One new TCP connection (handshake, then reset) to the answering ClusterIP."""
    prober, load_time = loaded
    benchmark.extra_info["load"] = load_time

    def measure() -> None:
        benchmark.pedantic(
            connect_time, args=(DATAPATH_VIP, PORT), rounds=CONNECTS, iterations=1,
            warmup_rounds=WARMUP,
        )  # fmt: skip

    prober.run(measure)
    if benchmark.disabled:  # one connection, no figures
        return
    micros = [x * 1e6 for x in benchmark.stats.stats.data]
    benchmark.extra_info["p99_us"] = round(percentile(micros, 99), 1)
    # The engine's connection rate (its connect latencies are the benchmark's own, above).
    rate = measure_datapath(prober, 0, rate_rounds=1, rate_seconds=1.0)
    benchmark.extra_info["connections_per_second"] = round(rate.rates[0])
    benchmark.extra_info["unanswered"] = int(rate.unanswered[0])
