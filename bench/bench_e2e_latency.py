"""Network programming latency, end to end, iptables mode (nf_tables backend): an EndpointSlice
update on the fake API server, through the real controller (``minikproxy run``, its real
``kubernetes`` client, ``--min-sync-period 0``) and its partial sync, to the first probe from
the client namespace that sees the new endpoint (the rule is then in the kernel).

The benchmark engine's machinery (:mod:`minikproxy.benchmark.live`, what ``minikproxy bench``
runs for its update latency): its cluster, topology, fake API server and controller; each
round replaces the one endpoint of the engine's ``flip-endpoint`` Service (an answering
backend, then a refusing one, in turn: the Service keeps an endpoint, so no top-level chain
changes). 1k and 10k Services x 10 endpoints; our partial sync (top-level chains rewritten
only when their content changes) against kube-proxy's (KUBE-SERVICES and the other top-level
chains rewritten on every sync: ``run --iptables-rewrite-top-level``). The benchmark's time
runs from the API change to the end of the probe that saw it; ``extra_info`` has the
engine's figure (to that probe's sending), the controller's first sync and RSS. Needs root.
Run:

    .venv/bin/python -m pytest bench/bench_e2e_latency.py --benchmark-only
"""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.benchmark.adapters import IptablesNft

from .conftest import bench_endpoint_change, live_node, record_live

STRATEGY_FLAGS = {"minikproxy": (), "kube-proxy-style": ("--iptables-rewrite-top-level",)}


@pytest.mark.parametrize("services", [1000, 10000], ids=["1k", "10k"])
@pytest.mark.parametrize("strategy", sorted(STRATEGY_FLAGS))
def test_endpoint_change_to_kernel(
    benchmark: Any, tmp_path: Any, services: int, strategy: str
) -> None:
    with live_node(IptablesNft(), services, tmp_path, STRATEGY_FLAGS[strategy]) as (live, prober):
        record_live(benchmark, live)
        bench_endpoint_change(benchmark, live, prober, rounds=15)
