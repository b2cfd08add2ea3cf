"""Proxy health and service health checks, answered over HTTP the way kube-proxy answers them.

- :class:`ProxierHealth` is the state machine of kube-proxy's ``ProxyHealthServer``
  (``pkg/proxy/healthcheck/proxy_health.go``): per IP family, the time of the last successful
  sync and of the oldest sync that was queued and not yet done; plus whether the Node may
  receive traffic.
- :class:`HealthzServer` serves it on ``/healthz`` and ``/livez`` (default ``0.0.0.0:10256``).
- :class:`ServiceHealthServer` opens one listener per ``healthCheckNodePort`` of the
  ``externalTrafficPolicy: Local`` Services, telling cloud load balancers whether this node
  has local endpoints (``service_health.go``).
- They run on :mod:`minikproxy.httpserver`, as the metrics server does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from minikproxy.httpserver import (
    JSON,
    NOSNIFF,
    NOT_FOUND,
    App,
    AppServer,
    BackgroundHTTPServer,
    Response,
    ServerLimits,
    json_response,
)
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPFamily, NamespacedName

__all__ = [
    "TO_BE_DELETED_TAINT",
    "HealthzServer",
    "ProxierHealth",
    "ProxyHealthChecker",
    "ServiceHealthServer",
    "TimeSource",
    "WallClock",
    "format_go_time",
]

logger = logging.getLogger(__name__)

# Taint the Cluster Autoscaler puts on a Node before deleting it.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


# -- time -------------------------------------------------------------------------------------


class TimeSource(Protocol):
    """Anything with ``now()`` returning Unix time in seconds (a runner ``FakeClock`` fits)."""

    def now(self) -> float:
        """Return the current Unix time in seconds."""
        ...


class WallClock:
    """The system wall clock (``time.time()``)."""

    def now(self) -> float:
        """Return ``time.time()``."""
        return time.time()


def format_go_time(ts: float | None) -> str:
    """Format Unix time as Go's JSON encoding of a UTC ``time.Time`` (RFC 3339, nanoseconds).

    Trailing zeros of the fraction are dropped, as Go does; ``None`` is Go's zero time.

    >>> format_go_time(1700000000.25)
    '2023-11-14T22:13:20.25Z'
    >>> format_go_time(None)
    '0001-01-01T00:00:00Z'
    """
    if ts is None:
        return "0001-01-01T00:00:00Z"
    whole = int(ts // 1)
    micros = round((ts - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    stamp = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{micros:06d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


# -- proxier health ---------------------------------------------------------------------------


class ProxyHealthChecker(Protocol):
    """What a service health server asks of the proxy health."""

    def is_healthy(self) -> bool:
        """Return whether every proxier is healthy (Node eligibility ignored)."""
        ...


class ProxierHealth:
    """Health of the proxiers (one per IP family) and eligibility of the Node.

    The proxier calls :meth:`queued_update` when a change arrives that needs a sync, and
    :meth:`updated` when a sync succeeded (and once when its loop starts). A family is
    unhealthy when an update has been queued for ``health_timeout`` seconds or more without
    a successful sync since. A family that never called :meth:`updated` is not judged at all,
    so a proxy that is still starting is healthy.

    ``clock`` gives Unix time (the default is :class:`WallClock`); ``health_timeout`` is in
    seconds (kube-proxy passes twice the sync period).
    """

    def __init__(self, clock: TimeSource | None = None, health_timeout: float = 60.0) -> None:
        self._clock: TimeSource = clock if clock is not None else WallClock()
        self.health_timeout = float(health_timeout)
        self._lock = threading.Lock()
        self._last_updated: dict[IPFamily, float] = {}
        self._oldest_pending: dict[IPFamily, float] = {}
        # Eligible while starting, until a Node event says otherwise.
        self._node_eligible = True

    @property
    def clock(self) -> TimeSource:
        """The time source of this health state."""
        return self._clock

    def queued_update(self, family: IPFamily) -> None:
        """Record that ``family``'s proxier has changes not yet written (keeps the oldest)."""
        with self._lock:
            self._oldest_pending.setdefault(family, self._clock.now())

    def updated(self, family: IPFamily) -> None:
        """Record that ``family``'s proxier has just synced successfully."""
        with self._lock:
            self._oldest_pending.pop(family, None)
            self._last_updated[family] = self._clock.now()

    def sync_node(self, node: Mapping[str, Any]) -> None:
        """Update Node eligibility from a Node object (a dict as the API returns it).

        The Node is not eligible while it is being deleted (``metadata.deletionTimestamp``
        set) or while it carries the ``ToBeDeletedByClusterAutoscaler`` taint.
        """
        metadata = node.get("metadata") or {}
        spec = node.get("spec") or {}
        taints = spec.get("taints") or []
        deleting = bool(metadata.get("deletionTimestamp"))
        tainted = any(
            isinstance(taint, Mapping) and taint.get("key") == TO_BE_DELETED_TAINT
            for taint in taints
        )
        with self._lock:
            self._node_eligible = not (deleting or tainted)

    @property
    def node_eligible(self) -> bool:
        """Whether the Node may receive load-balancer traffic."""
        with self._lock:
            return self._node_eligible

    def is_healthy(self) -> bool:
        """Return whether every proxier is healthy, ignoring the Node's eligibility."""
        return self.health()[0]

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Return the proxiers' health and kube-proxy's ``ProxyHealth`` JSON object.

        The object has ``lastUpdated`` (latest sync of any family), ``currentTime``,
        ``healthy`` and, once any family synced, ``status`` (per family: ``lastUpdated``,
        ``healthy``). Times are Go-formatted RFC 3339 strings.
        """
        with self._lock:
            now = self._clock.now()
            status: dict[str, dict[str, Any]] = {}
            healthy = True
            for family in sorted(self._last_updated):
                family_healthy = True
                queued = self._oldest_pending.get(family)
                if queued is not None and now - queued >= self.health_timeout:
                    family_healthy = False
                    healthy = False
                status[family] = {
                    "lastUpdated": format_go_time(self._last_updated[family]),
                    "healthy": family_healthy,
                }
            last = max(self._last_updated.values(), default=None)
        body: dict[str, Any] = {
            "lastUpdated": format_go_time(last),
            "currentTime": format_go_time(now),
            "healthy": healthy,
        }
        if status:
            body["status"] = status
        return healthy, body

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """Return the status code and JSON body of ``/healthz`` (503 if unhealthy or ineligible).

        ``healthy`` in the body stays the proxiers' health; ``nodeEligible`` reports the Node.
        When the answer is 200, ``lastUpdated`` is the current time (kube-proxy keeps this for
        backwards compatibility: it used to mean "the sync loop ran recently").
        """
        healthy, body = self.health()
        eligible = self.node_eligible
        ordered = {
            "lastUpdated": body["lastUpdated"],
            "currentTime": body["currentTime"],
            "nodeEligible": eligible,
            **{key: value for key, value in body.items() if key in ("healthy", "status")},
        }
        if healthy and eligible:
            ordered["lastUpdated"] = ordered["currentTime"]
            return 200, ordered
        return 503, ordered

    def livez(self) -> tuple[int, dict[str, Any]]:
        """Return the status code and JSON body of ``/livez`` (Node eligibility ignored)."""
        healthy, body = self.health()
        if healthy:
            body["lastUpdated"] = body["currentTime"]
            return 200, body
        return 503, body


# -- /healthz and /livez ------------------------------------------------------------------------


class HealthzServer(AppServer):
    """kube-proxy's proxy health server: ``/healthz`` and ``/livez`` as JSON.

    Every answer is counted in ``kubeproxy_proxy_healthz_total{code}`` or
    ``kubeproxy_proxy_livez_total{code}`` when ``metrics`` is given.
    """

    def __init__(
        self,
        bind_address: str,
        health: ProxierHealth,
        *,
        metrics: ProxyMetrics | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.health = health
        self.metrics = metrics
        super().__init__(bind_address, name="healthz", limits=limits)

    def app(self, path: str) -> Response:
        """Answer one request for ``path``."""
        if path == "/healthz":
            code, body = self.health.healthz()
            if self.metrics is not None:
                self.metrics.proxy_healthz_total.labels(code=str(code)).inc()
        elif path == "/livez":
            code, body = self.health.livez()
            if self.metrics is not None:
                self.metrics.proxy_livez_total.labels(code=str(code)).inc()
        else:
            return NOT_FOUND
        return json_response(code, body)


# -- service health check node ports -------------------------------------------------------------


ServiceKey = NamespacedName | str


def _service_name(key: ServiceKey) -> NamespacedName:
    if isinstance(key, NamespacedName):
        return key
    namespace, sep, name = key.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"service name {key!r} is not namespace/name")
    return NamespacedName(namespace, name)


@dataclass(slots=True)
class _ServiceCheck:
    name: NamespacedName
    port: int
    servers: list[BackgroundHTTPServer]
    local_endpoints: int = 0


def service_health_body(name: NamespacedName, local_endpoints: int, healthy: bool) -> bytes:
    """The JSON body kube-proxy's service health check sends (tab-indented, as Go prints it)."""
    lines = [
        "{",
        '\t"service": {',
        f'\t\t"namespace": {json.dumps(name.namespace)},',
        f'\t\t"name": {json.dumps(name.name)}',
        "\t},",
        f'\t"localEndpoints": {local_endpoints},',
        f'\t"serviceProxyHealthy": {"true" if healthy else "false"}',
        "}",
    ]
    return "\n".join(lines).encode()


class ServiceHealthServer:
    """One HTTP listener per Service health-check node port, on each of ``bind_addresses``.

    ``bind_addresses`` are IPs (the node addresses matching ``--nodeport-addresses``), or
    ``""`` (every address, the default), ``0.0.0.0`` (every IPv4 one) or ``::`` (every IPv6
    one); :meth:`set_bind_addresses` changes them. Each listener answers any path with 200 when
    the Service has local endpoints and the proxy is healthy, else 503, plus
    ``X-Load-Balancing-Endpoint-Weight: <local endpoints>``.
    """

    def __init__(
        self, bind_addresses: Sequence[str] = ("",), health: ProxyHealthChecker | None = None
    ) -> None:
        self.bind_addresses = list(bind_addresses) or [""]
        self.health: ProxyHealthChecker = health if health is not None else ProxierHealth()
        self._lock = threading.Lock()
        self._services: dict[NamespacedName, _ServiceCheck] = {}

    def set_bind_addresses(self, addresses: Sequence[str]) -> None:
        """Listen on ``addresses`` from now on (an empty list: nowhere). When they change,
        every open listener is closed; the next :meth:`sync_services` opens them again."""
        with self._lock:
            if list(addresses) == self.bind_addresses:
                return
            logger.info(
                "healthcheck node ports now listen on %s",
                ", ".join(a or "every address" for a in addresses) or "no address",
            )
            self.bind_addresses = list(addresses)
            closing = [server for check in self._services.values() for server in check.servers]
            self._services.clear()
        # Outside the lock: stopping waits for answers in flight, and answering takes it.
        _stop_all(closing)

    def sync_services(self, services: Mapping[ServiceKey, int]) -> None:
        """Make exactly ``services`` (name -> health check node port) listened on.

        Listeners of services gone or with a changed port are closed; new ones are opened. A
        port that cannot be bound is logged and tried again on the next call.
        """
        wanted = {_service_name(key): port for key, port in services.items()}
        closing: list[BackgroundHTTPServer] = []
        with self._lock:
            for name, check in list(self._services.items()):
                if wanted.get(name) != check.port:
                    logger.info("closing healthcheck for %s on port %d", name, check.port)
                    closing += check.servers
                    del self._services[name]
        # Outside the lock (stopping waits for answers in flight, and answering takes it), and
        # before opening: a changed port may be taken by the new listener of another service.
        _stop_all(closing)
        with self._lock:
            for name, port in sorted(wanted.items()):
                if name in self._services:
                    continue
                servers = self._open(name, port)
                if servers is not None:
                    self._services[name] = _ServiceCheck(name, port, servers)

    def _open(self, name: NamespacedName, port: int) -> list[BackgroundHTTPServer] | None:
        servers: list[BackgroundHTTPServer] = []
        for address in self.bind_addresses:
            host = f"[{address}]" if ":" in address else address
            server = BackgroundHTTPServer(
                f"{host}:{port}",
                self._app_for(name),
                name=f"healthcheck {name}",
                family_wildcards=True,
            )
            try:
                server.start()
            except OSError as err:
                logger.error("failed to start healthcheck for %s on port %d: %s", name, port, err)
                _stop_all(servers)
                return None
            servers.append(server)
        return servers

    def _app_for(self, name: NamespacedName) -> App:
        def app(path: str) -> Response:
            return self._answer(name)

        return app

    def _answer(self, name: NamespacedName) -> Response:
        with self._lock:
            check = self._services.get(name)
            count = check.local_endpoints if check is not None else None
        if count is None:
            logger.error("request for closed healthcheck of %s", name)
            return Response(503, b"")
        healthy = self.health.is_healthy()
        headers = (NOSNIFF, ("X-Load-Balancing-Endpoint-Weight", str(count)))
        status = 200 if count > 0 and healthy else 503
        return Response(status, service_health_body(name, count, healthy), JSON, headers)

    def sync_endpoints(self, local_endpoints: Mapping[ServiceKey, int]) -> None:
        """Set the local endpoint count of each open service; services not listed get 0."""
        counts = {_service_name(key): count for key, count in local_endpoints.items()}
        with self._lock:
            for name, check in self._services.items():
                check.local_endpoints = counts.get(name, 0)

    def listening(self) -> dict[NamespacedName, list[int]]:
        """The open services and the ports actually bound (one per bind address)."""
        with self._lock:
            return {
                name: [server.port for server in check.servers]
                for name, check in self._services.items()
            }

    def stop(self) -> None:
        """Close every listener."""
        with self._lock:
            closing = [server for check in self._services.values() for server in check.servers]
            self._services.clear()
        _stop_all(closing)


def _stop_all(servers: Iterable[BackgroundHTTPServer]) -> None:
    for server in servers:
        server.stop()
