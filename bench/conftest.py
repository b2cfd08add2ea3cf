"""Shared fixtures: the benchmark engine's synthetic clusters (:mod:`minikproxy.benchmark`),
built once per size, its node options and scratch namespaces, and its real controller
(:mod:`minikproxy.benchmark.live`) in a topology, with update rounds timed as the engine
times them."""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from minikproxy.benchmark.adapters import ModeAdapter, iptables_options, nftables_options
from minikproxy.benchmark.cluster import REFUSING_BACKEND, backend_addresses, cluster_objects
from minikproxy.benchmark.live import LiveController, live_controller, set_flip_endpoint
from minikproxy.benchmark.measure import build_cluster, datapath_topology, scratch_namespaces
from minikproxy.benchmark.probing import Prober
from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.nftables_options import NftablesOptions

ENDPOINTS_PER_SERVICE = 10
#: Seconds an update may take to reach the kernel (kube-proxy's nftables layout at 10k: ~7 s).
UPDATE_TIMEOUT = 120.0


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


@contextmanager
def live_node(
    adapter: ModeAdapter, services: int, workdir: Path, extra_flags: tuple[str, ...] = ()
) -> Iterator[tuple[LiveController, Prober]]:
    """The engine's controller (``minikproxy run``, ``--min-sync-period 0``) in ``adapter``'s
    mode, synced with the engine's cluster of ``services`` x 10 endpoints, in the node of the
    engine's topology (a refusing backend address too), and a prober in its client. Skips
    when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    objects = cluster_objects(services, ENDPOINTS_PER_SERVICE)
    backends = backend_addresses(ENDPOINTS_PER_SERVICE)
    with (
        datapath_topology(backends, refusing=(REFUSING_BACKEND,)) as (topo, prober),
        live_controller(
            adapter, topo.namespaces["node"], objects, workdir,
            sync_timeout=900.0, extra_flags=extra_flags,
        ) as live,
    ):  # fmt: skip
        yield live, prober
        live.check_running()


def record_live(benchmark: Any, live: LiveController) -> None:
    """The controller's first sync (its own duration, and start to synced) and RSS."""
    benchmark.extra_info["first_sync_s"] = round(live.first_sync, 2)
    benchmark.extra_info["startup_s"] = round(live.startup, 2)
    benchmark.extra_info["rss_mib"] = round(live.rss_mib)


def record_engine(benchmark: Any, seconds: list[float]) -> None:
    """The engine's own figure (API change to the sending of the probe that saw it, as
    ``minikproxy bench`` reports it): the benchmark's time adds that probe's own duration.
    Nothing with ``--benchmark-disable`` (one round, no warm-up, no figures)."""
    if benchmark.disabled or not seconds:
        return
    benchmark.extra_info["engine_median_ms"] = round(statistics.median(seconds) * 1e3, 2)


def bench_endpoint_change(
    benchmark: Any, live: LiveController, prober: Prober, rounds: int
) -> None:
    """``rounds`` changes of the ``flip-endpoint`` Service's EndpointSlice, each replacing its
    one address: an answering backend, then :data:`REFUSING_BACKEND`, in turn (the Service
    always has one endpoint, so no top-level rule changes, as for any endpoint change of a
    Service with endpoints). Each round ends when a probe sees the new endpoint (answering
    or refusing). The warm-up round gives the Service its first endpoint."""
    answering = backend_addresses(ENDPOINTS_PER_SERVICE)[:1]
    seen: list[float] = []

    def change() -> None:
        up = len(seen) % 2 == 0
        addresses = answering if up else (REFUSING_BACKEND,)
        seen.append(set_flip_endpoint(live.api, prober, addresses, up, UPDATE_TIMEOUT))

    benchmark.pedantic(change, rounds=rounds, iterations=1, warmup_rounds=1)
    record_engine(benchmark, seen[1:])
