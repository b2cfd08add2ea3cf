"""kube-proxy metric names, types, labels and buckets, scraped over HTTP from the metrics server."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from minikproxy.metrics import (
    NETWORK_PROGRAMMING_BUCKETS,
    MetricsServer,
    ProxyMetrics,
    go_float,
)

# Exposed family name -> type, as kube-proxy's pkg/proxy/metrics registers them.
KUBE_PROXY_METRICS = {
    "kubeproxy_sync_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_full_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds": "gauge",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds": "gauge",
    "kubeproxy_network_programming_duration_seconds": "histogram",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_service_changes_pending": "gauge",
    "kubeproxy_sync_proxy_rules_service_changes_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total": "counter",
    "kubeproxy_sync_proxy_rules_iptables_total": "gauge",
    "kubeproxy_sync_proxy_rules_iptables_last": "gauge",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total": "gauge",
    "kubeproxy_proxy_healthz_total": "counter",
    "kubeproxy_proxy_livez_total": "counter",
}


def fetch(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, dict(resp.headers.items()), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read().decode()


@pytest.fixture
def metrics() -> ProxyMetrics:
    m = ProxyMetrics()
    # Touch every labelled metric so each family has series.
    m.iptables_rules_total.labels(table="nat").set(12)
    m.iptables_rules_total.labels(table="filter").set(3)
    m.iptables_rules_last_sync.labels(table="nat").set(4)
    m.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy="internal").set(1)
    m.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy="external").set(2)
    m.proxy_healthz_total.labels(code="200").inc()
    m.proxy_livez_total.labels(code="503").inc(2)
    m.endpoint_changes_total.inc(5)
    m.sync_proxy_rules_latency.observe(0.003)
    m.network_programming_latency.observe(1.5)
    m.sync_proxy_rules_last_timestamp.set(1_700_000_000.5)
    return m


@pytest.fixture
def base_url(metrics: ProxyMetrics) -> Iterator[str]:
    server = MetricsServer("127.0.0.1:0", metrics, "iptables")
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def scrape(base_url: str) -> str:
    status, headers, text = fetch(base_url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return text


def test_exposed_names_and_types_are_kube_proxys(base_url: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape(base_url))}
    exposed = {}
    for family in families.values():
        sample_names = {s.name for s in family.samples}
        if family.type == "counter":
            assert sample_names == {family.name + "_total"}, "no _created series"
            exposed[family.name + "_total"] = family.type
        else:
            exposed[family.name] = family.type
    assert exposed == KUBE_PROXY_METRICS


def test_labels(base_url: str) -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(scrape(base_url))
        for s in f.samples
    }
    assert samples[("kubeproxy_sync_proxy_rules_iptables_total", (("table", "nat"),))] == 12
    assert samples[("kubeproxy_sync_proxy_rules_iptables_total", (("table", "filter"),))] == 3
    assert samples[("kubeproxy_sync_proxy_rules_iptables_last", (("table", "nat"),))] == 4
    no_local = "kubeproxy_sync_proxy_rules_no_local_endpoints_total"
    assert samples[(no_local, (("traffic_policy", "internal"),))] == 1
    assert samples[(no_local, (("traffic_policy", "external"),))] == 2
    assert samples[("kubeproxy_proxy_healthz_total", (("code", "200"),))] == 1
    assert samples[("kubeproxy_proxy_livez_total", (("code", "503"),))] == 2
    assert samples[("kubeproxy_sync_proxy_rules_endpoint_changes_total", ())] == 5
    assert samples[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ())] == 1_700_000_000.5


def bucket_bounds(text: str, family: str) -> list[str]:
    return [
        s.labels["le"]
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if s.name.endswith("_bucket")
    ]


def test_buckets_are_written_as_go_writes_them(base_url: str) -> None:
    text = scrape(base_url)
    assert bucket_bounds(text, "kubeproxy_sync_proxy_rules_duration_seconds") == [
        "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128",
        "0.256", "0.512", "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf",
    ]  # fmt: skip
    network = bucket_bounds(text, "kubeproxy_network_programming_duration_seconds")
    expected = (
        ["0", "0.25", "0.5"]
        + [str(s) for s in range(1, 60)]
        + [str(s) for s in range(60, 120, 5)]
        + [str(s) for s in range(120, 301, 30)]
        + ["+Inf"]
    )
    assert network == expected
    assert len(NETWORK_PROGRAMMING_BUCKETS) == 81
    # Histogram series in Go's order, and Go's number format.
    lines = text.splitlines()
    i = lines.index('kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="+Inf"} 1')
    assert lines[i + 1] == "kubeproxy_sync_proxy_rules_duration_seconds_sum 0.003"
    assert lines[i + 2] == "kubeproxy_sync_proxy_rules_duration_seconds_count 1"
    assert "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.7000000005e+09" in lines


def test_families_are_sorted_and_empty_vectors_left_out() -> None:
    text = ProxyMetrics().exposition().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)
    assert "kubeproxy_proxy_healthz_total" not in names  # no series yet, as in Go
    assert "kubeproxy_sync_proxy_rules_service_changes_total" in names


def test_registries_are_isolated() -> None:
    registry = CollectorRegistry()
    first, second = ProxyMetrics(registry), ProxyMetrics()
    first.service_changes_total.inc()
    assert registry.get_sample_value("kubeproxy_sync_proxy_rules_service_changes_total") == 1
    assert second.registry.get_sample_value("kubeproxy_sync_proxy_rules_service_changes_total") == 0


def test_proxy_mode_and_healthz(base_url: str) -> None:
    status, headers, text = fetch(base_url + "/proxyMode")
    assert (status, text) == (200, "iptables")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert fetch(base_url + "/healthz")[::2] == (200, "ok")
    assert fetch(base_url + "/missing")[0] == 404


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"),
        (1.0, "1"),
        (300.0, "300"),
        (0.25, "0.25"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (123456.0, "123456"),
        (1234567.0, "1.234567e+06"),
        (-2.5, "-2.5"),
        (float("inf"), "+Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_go_float(value: float, text: str) -> None:
    assert go_float(value) == text
