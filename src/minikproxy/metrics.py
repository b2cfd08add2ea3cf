"""kube-proxy's Prometheus metrics, with its names, types, labels and buckets.

The metrics live in a dedicated :class:`~prometheus_client.CollectorRegistry` per
:class:`ProxyMetrics`, never in the global default registry, so tests stay isolated. Names
follow ``pkg/proxy/metrics/metrics.go`` (subsystem ``kubeproxy``), in the releases whose
labels are ``table``, ``traffic_policy`` and ``code`` (without the later ``ip_family``).

Mind the two ``*_total`` names that are *gauges* in kube-proxy
(``sync_proxy_rules_iptables_total`` and ``sync_proxy_rules_no_local_endpoints_total``), and
that prometheus-client names a counter family without its ``_total`` suffix while exposing the
sample as ``<name>_total``, exactly as kube-proxy does. ``/metrics`` is rendered by
:func:`render_text`, which writes what Go's client writes (family order, number format, no
``*_created`` series) rather than prometheus-client's own variant of the format.

:class:`MetricsServer` serves ``/metrics``, ``/proxyMode`` and ``/healthz`` like kube-proxy's
metrics server (default ``127.0.0.1:10249``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from minikproxy.httpserver import NOT_FOUND, AppServer, Response

__all__ = [
    "METRICS_CONTENT_TYPE",
    "NETWORK_PROGRAMMING_BUCKETS",
    "SUBSYSTEM",
    "SYNC_DURATION_BUCKETS",
    "MetricsServer",
    "ProxyMetrics",
    "exponential_buckets",
    "go_float",
    "linear_buckets",
    "render_text",
]

SUBSYSTEM = "kubeproxy"

# The text exposition format kube-proxy's Go client answers with.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exponential_buckets(start: float, factor: float, count: int) -> list[float]:
    """Go's ``prometheus.ExponentialBuckets``: ``count`` bounds from ``start``, times ``factor``."""
    bounds = []
    for _ in range(count):
        bounds.append(start)
        start *= factor
    return bounds


def linear_buckets(start: float, width: float, count: int) -> list[float]:
    """Go's ``prometheus.LinearBuckets``: ``count`` bounds from ``start``, ``width`` apart."""
    bounds = []
    for _ in range(count):
        bounds.append(start)
        start += width
    return bounds


# 1 ms, 2 ms, 4 ms ... 16.384 s.
SYNC_DURATION_BUCKETS = tuple(exponential_buckets(0.001, 2, 15))

# Go's MergeBuckets starts from a single 0 bound, so kube-proxy exposes an le="0" bucket.
NETWORK_PROGRAMMING_BUCKETS = (
    0.0,
    *linear_buckets(0.25, 0.25, 2),  # 0.25 s, 0.5 s
    *linear_buckets(1, 1, 59),  # 1 s ... 59 s
    *linear_buckets(60, 5, 12),  # 60 s ... 115 s
    *linear_buckets(120, 30, 7),  # 2 min ... 5 min
)


class ProxyMetrics:
    """kube-proxy's metrics, registered in ``registry`` (a new private one by default).

    Attributes mirror the Go variables of ``pkg/proxy/metrics``; the exposed name of each is
    ``kubeproxy_`` plus the name shown in its comment.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, proxy_mode: str = "iptables"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.proxy_mode = proxy_mode
        reg = self.registry

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, namespace=SUBSYSTEM, buckets=buckets, registry=reg)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "") -> Gauge:
            registry = reg if mode in ("", proxy_mode) else None
            return Gauge(name, doc, labels, namespace=SUBSYSTEM, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), mode: str = "") -> Counter:
            # A mode's own metrics are exposed in that mode only, as kube-proxy registers them.
            registry = reg if mode in ("", proxy_mode) else None
            return Counter(name, doc, labels, namespace=SUBSYSTEM, registry=registry)

        # sync_proxy_rules_duration_seconds: latency of one successful sync, full or partial,
        # the UDP conntrack reconcile after the rules included (as in kube-proxy, whose
        # syncProxyRules observes it deferred, after its conntrack cleanup).
        self.sync_proxy_rules_latency = histogram(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            SYNC_DURATION_BUCKETS,
        )
        # sync_full_proxy_rules_duration_seconds: latency of full syncs only.
        self.sync_full_proxy_rules_latency = histogram(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            SYNC_DURATION_BUCKETS,
        )
        # sync_partial_proxy_rules_duration_seconds: latency of partial syncs only.
        self.sync_partial_proxy_rules_latency = histogram(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            SYNC_DURATION_BUCKETS,
        )
        # sync_proxy_rules_last_timestamp_seconds: Unix time of the last successful sync.
        self.sync_proxy_rules_last_timestamp = gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        # sync_proxy_rules_last_queued_timestamp_seconds: Unix time a sync was last requested;
        # far ahead of the last sync timestamp means the sync loop is hung.
        self.sync_proxy_rules_last_queued_timestamp = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        # network_programming_duration_seconds: from an EndpointSlice's trigger time to the
        # sync that programmed it.
        self.network_programming_latency = histogram(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            NETWORK_PROGRAMMING_BUCKETS,
        )
        # sync_proxy_rules_endpoint_changes_pending / _total
        self.endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes"
        )
        self.endpoint_changes_total = counter(
            "sync_proxy_rules_endpoint_changes_total", "Cumulative proxy rules Endpoint changes"
        )
        # sync_proxy_rules_service_changes_pending / _total
        self.service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes"
        )
        self.service_changes_total = counter(
            "sync_proxy_rules_service_changes_total", "Cumulative proxy rules Service changes"
        )
        # conntrack_reconciler_sync_duration_seconds{ip_family}: one family's UDP conntrack
        # reconcile (list, select, delete).
        self.conntrack_reconciler_latency = Histogram(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            ("ip_family",),
            namespace=SUBSYSTEM,
            buckets=SYNC_DURATION_BUCKETS,
            registry=reg,
        )
        # conntrack_reconciler_deleted_entries_total{ip_family}
        self.conntrack_reconciler_deleted_total = counter(
            "conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            ("ip_family",),
        )
        # conntrack_reconciler_failures_total{ip_family}: minikproxy's own (kube-proxy only
        # logs): reconciles that failed to list or delete; the next sync retries.
        self.conntrack_reconciler_failures_total = counter(
            "conntrack_reconciler_failures_total",
            "Cumulative conntrack reconciles that failed",
            ("ip_family",),
        )
        # sync_proxy_rules_iptables_restore_failures_total
        self.iptables_restore_failures_total = counter(
            "sync_proxy_rules_iptables_restore_failures_total",
            "Cumulative proxy iptables restore failures",
            mode="ipvs" if proxy_mode == "ipvs" else "iptables",  # kube-proxy's ipvs mode too
        )
        # sync_proxy_rules_iptables_partial_restore_failures_total: partial restores that
        # failed and fell back to a full one.
        self.iptables_partial_restore_failures_total = counter(
            "sync_proxy_rules_iptables_partial_restore_failures_total",
            "Cumulative proxy iptables partial restore failures",
            mode="iptables",
        )
        # sync_proxy_rules_nftables_sync_failures_total: transactions nft rejected.
        self.nftables_sync_failures_total = counter(
            "sync_proxy_rules_nftables_sync_failures_total",
            "Cumulative proxy nftables sync failures",
            mode="nftables",
        )
        # sync_proxy_rules_iptables_total{table}: a gauge, despite its name.
        self.iptables_rules_total = gauge(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ("table",),
            mode="iptables",
        )
        # sync_proxy_rules_iptables_last{table}: rules written by the last sync.
        self.iptables_rules_last_sync = gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ("table",),
            mode="iptables",
        )
        # sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal"|"external"}:
        # a gauge, recounted each sync.
        self.sync_proxy_rules_no_local_endpoints_total = gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ("traffic_policy",),
        )
        # proxy_healthz_total{code} / proxy_livez_total{code}: answers of the health server.
        self.proxy_healthz_total = counter(
            "proxy_healthz_total", "Cumulative proxy healthz HTTP status", ("code",)
        )
        self.proxy_livez_total = counter(
            "proxy_livez_total", "Cumulative proxy livez HTTP status", ("code",)
        )

    def collect(self) -> Iterator[Metric]:
        """Yield this registry's metric families (the ``Collector`` protocol)."""
        yield from self.registry.collect()

    def exposition(self) -> bytes:
        """Render the metrics in the Prometheus text format, as ``/metrics`` serves them."""
        return render_text(self.registry.collect()).encode()


def go_float(value: float) -> str:
    """Format a float as Go's ``strconv.FormatFloat(v, 'g', -1, 64)``, as Go's exposition does.

    >>> [go_float(v) for v in (1.0, 0.25, 16.384, 1700000000.0, 0.0)]
    ['1', '0.25', '16.384', '1.7e+09', '0']
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digit_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # digits before the decimal point
    minus = "-" if sign else ""
    exp = point - 1
    if exp < -4 or exp >= 6:  # Go's shortest 'g' switches to %e outside [1e-4, 1e6)
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{minus}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{minus}{digits}{'0' * (point - len(digits))}"
    return f"{minus}{digits[:point]}.{digits[point:]}"


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_line(sample: Sample) -> str:
    names = sorted(name for name in sample.labels if name != "le")
    if "le" in sample.labels:
        names.append("le")  # Go writes the bucket bound last
    pairs = []
    for name in names:
        value = sample.labels[name]
        if name == "le":
            value = go_float(float(value))
        pairs.append(f'{name}="{_escape_label_value(value)}"')
    labels = "{" + ",".join(pairs) + "}" if pairs else ""
    return f"{sample.name}{labels} {go_float(sample.value)}\n"


_SUFFIX_ORDER = {"_bucket": 0, "_sum": 1, "_count": 2}


def render_text(families: Iterable[Metric]) -> str:
    """Render metric families as Go's ``expfmt`` text format (version 0.0.4) does.

    Unlike prometheus-client's own renderer, this sorts families by name and series by label
    values, writes histogram buckets, ``_sum`` then ``_count``, formats numbers (and ``le``)
    the Go way, leaves out families without series, and drops the ``*_created`` series
    kube-proxy does not have.
    """
    rendered: list[tuple[str, str]] = []
    for family in families:
        exposed = family.name + "_total" if family.type == "counter" else family.name
        samples = [s for s in family.samples if s.name != family.name + "_created"]
        if not samples:
            continue

        def order(sample: Sample, base: str = family.name) -> tuple[object, ...]:
            series = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            suffix = _SUFFIX_ORDER.get(sample.name[len(base) :], 0)
            bound = float(sample.labels.get("le", "0"))
            return (series, suffix, bound)

        doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        text = f"# HELP {exposed} {doc}\n# TYPE {exposed} {family.type}\n"
        text += "".join(_sample_line(sample) for sample in sorted(samples, key=order))
        rendered.append((exposed, text))
    return "".join(text for _, text in sorted(rendered))


class MetricsServer(AppServer):
    """kube-proxy's metrics server: ``/metrics``, ``/proxyMode`` and ``/healthz``.

    ``proxy_mode`` is the mode name ``/proxyMode`` returns (``iptables``, ``ipvs``,
    ``nftables``). ``/healthz`` (and ``/healthz/ping``) answer ``ok``.
    """

    def __init__(self, bind_address: str, metrics: ProxyMetrics, proxy_mode: str) -> None:
        self.metrics = metrics
        self.proxy_mode = proxy_mode
        super().__init__(bind_address, name="metrics")

    def app(self, path: str) -> Response:
        """Answer one request for ``path``."""
        if path == "/metrics":
            return Response(200, self.metrics.exposition(), METRICS_CONTENT_TYPE)
        if path == "/proxyMode":
            return Response(200, self.proxy_mode.encode())
        if path in ("/healthz", "/healthz/ping"):
            return Response(200, b"ok")
        return NOT_FOUND
