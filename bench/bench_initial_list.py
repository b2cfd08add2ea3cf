"""Benchmark: kube-proxy's initial list of 10k Services and 10k EndpointSlices.

Two Reflectors (Services, EndpointSlices) list a FakeApiServer through the official client,
paginated at 500 objects, until both have called ``on_synced``; the handler only stores the
dicts. Run with::

    .venv/bin/python -m pytest bench/bench_initial_list.py --benchmark-only

The fake API server runs in a separate process, as a real API server would: in the same
process its HTTP handling competes with the client for the GIL.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minikproxy.sources.kubeapi import ENDPOINT_SLICES, SERVICES, Reflector
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.testing.apiserver import FakeApiServer

SERVICE_COUNT = 10_000
ENDPOINTS_PER_SLICE = 10
NAMESPACES = 50
NODES = 100


def kube_service(i: int, ports: int = 2) -> dict[str, Any]:
    """A ClusterIP Service shaped like a real one (as kube-proxy receives it)."""
    name, ns = f"svc-{i}", f"ns-{i % NAMESPACES}"
    ip = f"10.96.{i // 250}.{i % 250 + 1}"
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"app": name, "app.kubernetes.io/part-of": "bench"},
            "annotations": {"owner": "team-bench"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP"},
            ][:ports],
        },
        "status": {"loadBalancer": {}},
    }


def kube_slice(i: int, ports: int = 2) -> dict[str, Any]:
    """The EndpointSlice of :func:`kube_service` ``i``, with 10 ready endpoints."""
    name, ns = f"svc-{i}", f"ns-{i % NAMESPACES}"
    endpoints = []
    for j in range(ENDPOINTS_PER_SLICE):
        n = i * ENDPOINTS_PER_SLICE + j
        endpoints.append(
            {
                "addresses": [f"10.{64 + n // 65536}.{n // 256 % 256}.{n % 256}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{n % NODES}",
                "zone": f"zone-{n % 3}",
                "targetRef": {
                    "kind": "Pod",
                    "namespace": ns,
                    "name": f"{name}-pod-{j}",
                    "uid": f"00000000-0000-0000-0000-{n:012d}",
                },
            }
        )
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"{name}-x7k2p",
            "namespace": ns,
            "generateName": f"{name}-",
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2024-05-01T12:00:00Z"
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": name,
                    "uid": f"11111111-0000-0000-0000-{i:012d}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
        ][:ports],
    }


class Store:
    """A handler that keeps the dicts and signals the first sync."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()

    def on_add(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects[f"{meta['namespace']}/{meta['name']}"] = obj

    def on_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        self.on_add(new)

    def on_delete(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.objects.pop(f"{meta['namespace']}/{meta['name']}", None)

    def on_synced(self) -> None:
        self.synced.set()


def _serve(kubeconfig: str, ready: Any, stop: Any, ports: int = 2) -> None:
    with FakeApiServer() as srv:
        for i in range(SERVICE_COUNT):
            srv.create(kube_service(i, ports))
            srv.create(kube_slice(i, ports))
        srv.write_kubeconfig(kubeconfig)
        ready.set()
        stop.wait()


@pytest.fixture(scope="module", params=[2, 1], ids=["2-ports", "1-port"])
def api_client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A client of a fake API server (own process) holding 10k Services with ``param`` ports
    each and their EndpointSlices (1 port: the shape behind issue-2's 10k x 10 sizing)."""
    kubeconfig = str(Path(tmp_path_factory.mktemp("kube")) / "config")
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    args = (kubeconfig, ready, stop, request.param)
    server = ctx.Process(target=_serve, args=args, daemon=True)
    server.start()
    try:
        assert ready.wait(300), "the fake API server did not start"
        api = load_api_client(kubeconfig)
        api.ports_per_service = request.param  # type: ignore[attr-defined]
        yield api
        api.close()
    finally:
        stop.set()
        server.join(10)


def initial_list(api: Any) -> tuple[int, int]:
    """Start both reflectors, wait for both syncs, stop them; return the object counts."""
    stop = threading.Event()
    services, slices = Store(), Store()
    threads = [
        Reflector(api, SERVICES, services, page_size=500).start(stop),
        Reflector(api, ENDPOINT_SLICES, slices, page_size=500).start(stop),
    ]
    try:
        assert services.synced.wait(120) and slices.synced.wait(120)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    return len(services.objects), len(slices.objects)


def test_initial_list_10k_services_10k_slices(benchmark: Any, api_client: Any) -> None:
    counts = benchmark.pedantic(
        initial_list, args=(api_client,), rounds=5, iterations=1, warmup_rounds=1
    )
    assert counts == (SERVICE_COUNT, SERVICE_COUNT)


def initial_list_into_model(api: Any) -> int:
    """As kube-proxy starts: list both resources into the proxier's tracker, then build the
    node-local model (the IPv4 snapshot the first sync compiles). Returns the port count."""
    from minikproxy.config import ProxyConfig
    from minikproxy.healthz import ProxierHealth
    from minikproxy.metrics import ProxyMetrics
    from minikproxy.proxier import Proxier

    proxier = Proxier(
        config=ProxyConfig(),
        node_name="node-0",
        families=["IPv4"],
        metrics=ProxyMetrics(),
        health=ProxierHealth(),
    )
    stop = threading.Event()
    proxier.initial_load_gc.hold()  # as Controller.start does
    services, slices = proxier.handler("services"), proxier.handler("endpointslices")
    threads = [
        Reflector(api, SERVICES, services, page_size=500).start(stop),
        Reflector(api, ENDPOINT_SLICES, slices, page_size=500).start(stop),
    ]
    try:
        deadline = threading.Event()
        while not proxier.initialized and not deadline.wait(0.005):
            pass
        snapshot = proxier.tracker.snapshot("IPv4")
        proxier.initial_load_gc.release()  # as after the first sync
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    return len(snapshot.state.services)


def test_initial_list_into_model_10k(benchmark: Any, api_client: Any) -> None:
    cpu: list[float] = []

    def timed() -> int:
        start = time.process_time()  # this process only: the API server runs in another
        ports = initial_list_into_model(api_client)
        cpu.append(time.process_time() - start)
        return ports

    ports = benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=1)
    assert ports == api_client.ports_per_service * SERVICE_COUNT
    benchmark.extra_info["client_cpu_s_median"] = round(statistics.median(cpu), 3)
    print(f"\nclient CPU for list + model: median {statistics.median(cpu):.2f} s")
