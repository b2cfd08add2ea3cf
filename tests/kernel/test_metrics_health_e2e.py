"""End to end over HTTP: the controller programs a test node netns from a fake API server, and
its metrics, proxy health and per-Service health check servers are scraped as Prometheus and
load balancers would. The servers listen on 127.0.0.1 of this process's namespace."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from minikproxy.controller import Controller
from minikproxy.dataplane.execer import RealExecer
from minikproxy.healthz import HealthzServer
from minikproxy.metrics import MetricsServer
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Topology

from ..helpers import wait_for
from .cluster_objects import NODE_OBJ, endpoint_slice, service, start_controller

pytestmark = pytest.mark.kernel

VIP = "10.96.0.10"
LB_VIP = "10.96.0.40"


def http_get(port: int, path: str) -> tuple[int, bytes, dict[str, str]]:
    """GET ``http://127.0.0.1:<port><path>``: status, body and headers (errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(port: int) -> Samples:
    """Scrape ``/metrics``: every sample by (name, sorted labels)."""
    status, body, headers = http_get(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain"), headers
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    """One sample's value (KeyError if absent)."""
    return scraped[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def running(topology: Topology, tmp_path: Path) -> Iterator[tuple[Controller, FakeApiServer]]:
    """A controller programming the topology's node netns, with its HTTP servers on 127.0.0.1."""
    with FakeApiServer() as api:
        api.create(NODE_OBJ)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        controller = start_controller(kubeconfig, RealExecer(topology.namespaces["node"]))
        try:
            yield controller, api
        finally:
            controller.stop()


def ports_of(controller: Controller) -> tuple[int, int]:
    """The bound ports of the metrics and the healthz servers."""
    metrics, healthz = controller.servers
    assert isinstance(metrics, MetricsServer) and isinstance(healthz, HealthzServer)
    return metrics.port, healthz.port


def test_metrics_proxy_mode_and_health(
    running: tuple[Controller, FakeApiServer], topology: Topology
) -> None:
    controller, api = running
    metrics_port, healthz_port = ports_of(controller)
    started = time.time()
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", ["10.10.2.2", "10.10.2.3"]))
    wait_for(lambda: "KUBE-SVC-" in topology.iptables_save(backend="nft"), what="rules")

    def synced_count() -> float:
        return value(samples(metrics_port), "kubeproxy_sync_proxy_rules_duration_seconds_count")

    wait_for(lambda: synced_count() > 0, what="a counted sync")
    scraped = samples(metrics_port)
    assert value(scraped, "kubeproxy_sync_proxy_rules_iptables_total", table="nat") > 0
    assert value(scraped, "kubeproxy_sync_proxy_rules_iptables_total", table="filter") > 0
    last = value(scraped, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    assert started - 5 < last <= time.time() + 1
    assert value(scraped, "kubeproxy_sync_proxy_rules_service_changes_total") >= 1
    assert value(scraped, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 1
    assert value(scraped, "kubeproxy_sync_proxy_rules_iptables_restore_failures_total") == 0
    assert value(scraped, "kubeproxy_network_programming_duration_seconds_count") == 0

    # an EndpointSlice change stamped by the endpoints controller: programming latency
    trigger = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    api.update(endpoint_slice("web", ["10.10.2.2"], trigger=trigger))

    def programmed() -> float:
        return value(samples(metrics_port), "kubeproxy_network_programming_duration_seconds_count")

    wait_for(lambda: programmed() == 1, what="network programming latency observed")
    scraped = samples(metrics_port)
    latency = value(scraped, "kubeproxy_network_programming_duration_seconds_sum")
    assert 0 <= latency < 15
    assert value(scraped, "kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 2
    assert value(scraped, "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") >= 1

    status, body, _ = http_get(metrics_port, "/proxyMode")
    assert (status, body) == (200, b"iptables")
    assert http_get(metrics_port, "/nothing-here")[0] == 404

    status, body, headers = http_get(healthz_port, "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json", (status, body)
    health = json.loads(body)
    assert list(health)[:4] == ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
    assert health["healthy"] is True and health["nodeEligible"] is True
    assert health["status"]["IPv4"]["healthy"] is True
    for stamp in (health["lastUpdated"], health["currentTime"]):
        assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).year >= 2024, stamp
    status, body, _ = http_get(healthz_port, "/livez")
    assert status == 200 and json.loads(body)["healthy"] is True
    scraped = samples(metrics_port)
    assert value(scraped, "kubeproxy_proxy_healthz_total", code="200") == 1
    assert value(scraped, "kubeproxy_proxy_livez_total", code="200") == 1


def test_health_check_node_port_follows_local_endpoints(
    running: tuple[Controller, FakeApiServer],
) -> None:
    controller, api = running
    hc_port = free_port()
    svc = service(
        "lb", LB_VIP, type="LoadBalancer", externalTrafficPolicy="Local",
        healthCheckNodePort=hc_port, port_extra={"nodePort": 30040},
    )  # fmt: skip
    api.create(svc)
    api.create(endpoint_slice("lb", ["10.10.2.2", "10.10.2.3"], local=("10.10.2.3",)))
    # The port opens once the Service is synced, possibly before its slice is: wait for both.
    wait_for(lambda: port_open(hc_port), what="the health check port to open")
    wait_for(lambda: http_get(hc_port, "/")[0] == 200, what="the local endpoint to be counted")

    status, body, headers = http_get(hc_port, "/")
    assert status == 200, body
    answer = json.loads(body)
    assert answer == {
        "service": {"namespace": "default", "name": "lb"},
        "localEndpoints": 1,
        "serviceProxyHealthy": True,
    }
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
    assert controller.proxier.service_health is not None
    assert controller.proxier.service_health.listening() == {("default", "lb"): [hc_port]}

    api.update(endpoint_slice("lb", ["10.10.2.2", "10.10.2.3"]))  # the local endpoint goes
    wait_for(lambda: http_get(hc_port, "/")[0] == 503, what="503 without local endpoints")
    status, body, headers = http_get(hc_port, "/healthz")
    assert status == 503 and json.loads(body)["localEndpoints"] == 0
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"

    api.update(endpoint_slice("lb", ["10.10.2.2"], local=("10.10.2.2",)))
    wait_for(lambda: http_get(hc_port, "/")[0] == 200, what="200 again with a local endpoint")

    api.delete("services", "default", "lb")
    wait_for(lambda: not port_open(hc_port), what="the health check port to close")
    assert controller.proxier.service_health.listening() == {}
