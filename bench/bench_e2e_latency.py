"""Network programming latency, end to end: an EndpointSlice update on the fake API server,
through the real ``kubernetes`` client, the controller's partial sync, to
``iptables-restore`` returning in a node network namespace (the rule is then in the kernel).

``--min-sync-period 0``; 1k and 10k Services x 10 endpoints; our partial sync (top-level
chains rewritten only when their content changes) against kube-proxy's (KUBE-SERVICES and
the other top-level chains rewritten on every sync). The initial full sync time is recorded
too. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_e2e_latency.py --benchmark-only
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from itertools import count
from typing import Any

import pytest

from minikproxy.benchmark.cluster import cluster_objects
from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.dataplane.execer import ExecResult, RealExecer
from minikproxy.model.names import IPV4
from minikproxy.modes.iptables import IptablesMode
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Topology
from minikproxy.testing.synthetic import synthetic_slice


class WatchingExecer(RealExecer):
    """Runs commands in a netns and signals when a restore containing ``marker`` returned."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.marker = b"\x00"
        self.done = threading.Event()

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        result = super().run(argv, stdin=stdin, timeout=timeout)
        if stdin and "restore" in argv[0] and self.marker in stdin:
            self.done.set()
        return result


@pytest.fixture(scope="module", params=[1000, 10000], ids=["1k", "10k"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    services = request.param
    with Topology() as topo, FakeApiServer() as api:
        for obj in cluster_objects(services, 10):  # the benchmark engine's cluster
            api.create(obj)
        kubeconfig = api.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        yield topo, api, kubeconfig, services


def start_controller(
    cluster: Any, rewrite_top_level: bool
) -> tuple[Controller, WatchingExecer, float]:
    topo, _, kubeconfig, _ = cluster
    execer = WatchingExecer(topo.namespaces["node"])
    config = ProxyConfig(hostname_override="node-0", min_sync_period=0.0, sync_period=600.0)
    controller = Controller(
        config, "node-0", load_api_client(str(kubeconfig)), execer=execer, backend="nft",
        families=[IPV4],
    )  # fmt: skip
    assert isinstance(controller.mode, IptablesMode)
    controller.mode.rewrite_top_level = rewrite_top_level
    start = time.perf_counter()
    controller.start()
    while controller.proxier.last_sync is None or not controller.proxier.last_sync.ok:
        time.sleep(0.05)
        assert time.perf_counter() - start < 600, "initial sync did not finish"
    return controller, execer, time.perf_counter() - start


_generations = count(1)


@pytest.mark.parametrize("strategy", ["minikproxy", "kube-proxy-style"])
def test_endpoint_change_to_kernel(benchmark: Any, cluster: Any, strategy: str) -> None:
    _, api, _, services = cluster
    controller, execer, initial = start_controller(cluster, strategy == "kube-proxy-style")
    benchmark.extra_info["initial_sync_s"] = round(initial, 2)
    target = services // 2

    def change() -> None:
        generation = next(_generations)
        new_slice = synthetic_slice(target, 10, generation=generation)
        del new_slice["metadata"]["resourceVersion"]  # an unconditional update
        execer.marker = new_slice["endpoints"][0]["addresses"][0].encode() + b":8080"
        execer.done.clear()
        api.update(new_slice)
        assert execer.done.wait(60), "the change never reached the kernel"

    try:
        benchmark.pedantic(change, rounds=15, iterations=1, warmup_rounds=1)
    finally:
        controller.stop()
        # The next strategy starts from an empty node, like a fresh node.
        cluster[0].reset_rules()
