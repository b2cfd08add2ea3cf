"""nftables mode, end to end: an API change on the fake API server, through the real
``kubernetes`` client and the controller's partial sync (``--min-sync-period 0``), to the
libnftables transaction that carries it returning in a node network namespace (the change is
then in the kernel).

Per layout (flat, kube-proxy) and size (1k and 10k Services x 10 endpoints): one EndpointSlice
changed, one Service added (with its slice: both must be in the kernel), one Service deleted;
plus the initial full sync and the controller's RSS after it (``extra_info``). The kube-proxy
layout at 10k takes minutes to load (kube-proxy's own layout: every chain is validated), so
it runs only with ``MINIKPROXY_BENCH_KUBEPROXY_10K=1``. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_nftables_e2e.py --benchmark-only
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from itertools import count
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.dataplane.execer import RealExecer
from minikproxy.model.names import IPV4
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Topology
from minikproxy.testing.synthetic import synthetic_node, synthetic_service, synthetic_slice

ENDPOINTS = 10
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


class TransactionWatch:
    """Wraps the applier's libnftables context: ``done`` is set when a script containing
    ``marker`` has been committed."""

    def __init__(self, controller: Controller) -> None:
        applier = controller.mode.applier  # type: ignore[attr-defined]
        self.context = applier.context
        self._run = self.context.run
        self.markers: tuple[str, ...] = ("\x00",)
        self.done = threading.Event()
        self.context.run = self.run

    def run(self, script: str, *, json: bool = False) -> str:
        out: str = self._run(script, json=json)
        if all(m in script for m in self.markers):
            self.done.set()
        return out

    def expect(self, *markers: str) -> None:
        self.markers = markers
        self.done.clear()

    def wait(self) -> None:
        assert self.done.wait(120), f"{self.markers} never reached the kernel"


@pytest.fixture(scope="module", params=LAYOUTS)
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Controller, TransactionWatch, FakeApiServer, int, str]]:
    layout, services = request.param
    with Topology() as topo, FakeApiServer() as api:
        api.create(synthetic_node())
        for i in range(services):
            api.create(synthetic_service(i))
            api.create(synthetic_slice(i, ENDPOINTS))
        kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        config = ProxyConfig(
            mode="nftables",
            nftables_layout=layout,
            hostname_override="node-0",
            min_sync_period=0.0,
            sync_period=600.0,
            node_ips=("10.10.1.1",),
        )
        controller = Controller(
            config, "node-0", load_api_client(str(kubeconfig)),
            execer=RealExecer(topo.namespaces["node"]), families=[IPV4],
        )  # fmt: skip
        watch = TransactionWatch(controller)
        start = time.perf_counter()
        controller.start()
        while controller.proxier.last_sync is None or not controller.proxier.last_sync.ok:
            time.sleep(0.05)
            assert time.perf_counter() - start < 900, "initial sync did not finish"
        initial = time.perf_counter() - start
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            yield controller, watch, api, services, f"{initial:.2f} s, peak RSS {rss_mb:.0f} MB"
        finally:
            controller.stop()


_generations = count(1)


def test_endpoint_change_to_kernel(benchmark: Any, running: Any) -> None:
    """One EndpointSlice changes all its addresses; the new ones must be in the kernel."""
    _, watch, api, services, initial = running
    benchmark.extra_info["initial_sync_and_rss"] = initial
    target = services // 2

    def change() -> None:
        new_slice = synthetic_slice(target, ENDPOINTS, generation=next(_generations))
        del new_slice["metadata"]["resourceVersion"]  # an unconditional update
        watch.expect(new_slice["endpoints"][0]["addresses"][0])
        api.update(new_slice)
        watch.wait()

    benchmark.pedantic(change, rounds=20, iterations=1, warmup_rounds=1)


def test_service_added_to_kernel(benchmark: Any, running: Any) -> None:
    """A Service and its EndpointSlice created; both in the kernel (its VIP and an endpoint)."""
    _, watch, api, services, _ = running
    # Numbers after the cluster's: their cluster IPs and NodePorts are free (a real API server
    # refuses duplicates; nftables maps would too).
    new_services = count(services + 1)

    def add() -> None:
        i = next(new_services)
        svc, eps = synthetic_service(i), synthetic_slice(i, ENDPOINTS, generation=3)
        for obj in (svc, eps):
            del obj["metadata"]["resourceVersion"]
        watch.expect(svc["spec"]["clusterIP"], eps["endpoints"][0]["addresses"][0])
        api.create(svc)
        api.create(eps)
        watch.wait()

    benchmark.pedantic(add, rounds=20, iterations=1, warmup_rounds=1)


def test_service_deleted_from_kernel(benchmark: Any, running: Any) -> None:
    """A Service and its EndpointSlice deleted; the delete transaction committed."""
    _, watch, api, services, _ = running
    victims = iter(range(services - 1, 0, -1))

    def delete() -> None:
        i = next(victims)
        svc = synthetic_service(i)
        watch.expect("delete element", svc["spec"]["clusterIP"])
        api.delete("services", svc["metadata"]["namespace"], svc["metadata"]["name"])
        api.delete("endpointslices", svc["metadata"]["namespace"], f"svc-{i}-abcde")
        watch.wait()

    benchmark.pedantic(delete, rounds=20, iterations=1, warmup_rounds=1)
