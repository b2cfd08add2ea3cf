"""nftables mode, end to end: an API change on the fake API server, through the real
controller (``minikproxy run``, its real ``kubernetes`` client, ``--min-sync-period 0``) and
its partial sync, to the first probe from the client namespace that sees the change (it is
then in the kernel).

The benchmark engine's machinery (:mod:`minikproxy.benchmark.live`, what ``minikproxy bench``
runs for its update latency): its cluster, topology, fake API server and controller. Per
layout (flat, kube-proxy) and size (1k and 10k Services x 10 endpoints): one EndpointSlice
changed (the engine's ``flip-endpoint`` Service's one endpoint replaced: an answering
backend, then a refusing one, in turn), the engine's ``flip-service`` Service created (its
EndpointSlice exists: answering) and deleted (no longer answering; nftables drops traffic
to an unallocated ClusterIP, so that last probe waits its 10 ms timeout); plus the
controller's first sync and RSS after it (``extra_info``). The benchmark's time runs from the
API change to the end of the probe that saw it; ``extra_info`` has the engine's figure (to
that probe's sending). The kube-proxy layout at 10k takes minutes to load (every chain is
validated), so it runs only with ``MINIKPROXY_BENCH_KUBEPROXY_10K=1``. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_nftables_e2e.py --benchmark-only
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.benchmark.adapters import NftablesFlat, NftablesKubeProxy
from minikproxy.benchmark.live import LiveController, set_flip_service
from minikproxy.benchmark.probing import Prober

from .conftest import UPDATE_TIMEOUT, bench_endpoint_change, live_node, record_engine, record_live

ADAPTERS = {"flat": NftablesFlat, "kube-proxy": NftablesKubeProxy}
LAYOUTS = [
    pytest.param(("flat", 1000), id="flat-1k"),
    pytest.param(("flat", 10000), id="flat-10k"),
    pytest.param(("kube-proxy", 1000), id="kube-proxy-1k"),
    pytest.param(
        ("kube-proxy", 10000),
        id="kube-proxy-10k",
        marks=pytest.mark.skipif(
            os.environ.get("MINIKPROXY_BENCH_KUBEPROXY_10K") != "1",
            reason="kube-proxy's layout takes minutes to load at 10k: "
            "set MINIKPROXY_BENCH_KUBEPROXY_10K=1",
        ),
    ),
]
ROUNDS = 20

Running = tuple[LiveController, Prober]


@pytest.fixture(scope="module", params=LAYOUTS)
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    layout, services = request.param
    with live_node(ADAPTERS[layout](), services, tmp_path_factory.mktemp("live")) as node:
        yield node


def test_endpoint_change_to_kernel(benchmark: Any, running: Running) -> None:
    """One EndpointSlice's address replaced; the new endpoint seen through the ClusterIP."""
    live, prober = running
    record_live(benchmark, live)
    bench_endpoint_change(benchmark, live, prober, rounds=ROUNDS)


def bench_flip_service(benchmark: Any, running: Running, present: bool) -> None:
    """``ROUNDS`` creations (``present``) or deletions of ``flip-service``: a creation after
    a deletion made outside the timing, a deletion followed by a creation outside it (the
    Service exists at first and after each test)."""
    live, prober = running
    seen: list[float] = []

    def untimed() -> None:
        set_flip_service(live.api, prober, not present, UPDATE_TIMEOUT)

    def flip() -> None:
        seen.append(set_flip_service(live.api, prober, present, UPDATE_TIMEOUT))

    before, after = (untimed, None) if present else (None, untimed)
    benchmark.pedantic(
        flip, setup=before, teardown=after, rounds=ROUNDS, iterations=1, warmup_rounds=1
    )
    record_engine(benchmark, seen[1:])


def test_service_added_to_kernel(benchmark: Any, running: Running) -> None:
    """A Service created (its EndpointSlice there already); its ClusterIP answers."""
    bench_flip_service(benchmark, running, present=True)


def test_service_deleted_from_kernel(benchmark: Any, running: Running) -> None:
    """A Service deleted; its ClusterIP no longer answers."""
    bench_flip_service(benchmark, running, present=False)
