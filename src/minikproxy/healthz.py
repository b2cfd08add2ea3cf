"""Proxy health and service health checks, answered over HTTP the way kube-proxy answers them.

- :class:`ProxierHealth` is the state machine of kube-proxy's ``ProxyHealthServer``
  (``pkg/proxy/healthcheck/proxy_health.go``): per IP family, the time of the last successful
  sync and of the oldest sync that was queued and not yet done; plus whether the Node may
  receive traffic.
- :class:`HealthzServer` serves it on ``/healthz`` and ``/livez`` (default ``0.0.0.0:10256``).
- :class:`ServiceHealthServer` opens one listener per ``healthCheckNodePort`` of the
  ``externalTrafficPolicy: Local`` Services, telling cloud load balancers whether this node
  has local endpoints (``service_health.go``).
- :class:`BackgroundHTTPServer` is the small threaded HTTP server all of them (and the metrics
  server) run on.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from minikproxy.model.names import IPFamily, NamespacedName

if TYPE_CHECKING:
    from minikproxy.metrics import ProxyMetrics

__all__ = [
    "TO_BE_DELETED_TAINT",
    "BackgroundHTTPServer",
    "HealthzServer",
    "ProxierHealth",
    "ProxyHealthChecker",
    "Response",
    "ServiceHealthServer",
    "TimeSource",
    "WallClock",
    "format_go_time",
    "split_host_port",
]

logger = logging.getLogger(__name__)

# Taint the Cluster Autoscaler puts on a Node before deleting it.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
NOSNIFF = ("X-Content-Type-Options", "nosniff")


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


# -- HTTP plumbing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = field(default=(NOSNIFF,))


# An application maps a request path (query string removed) to a response.
App = Callable[[str], Response]

NOT_FOUND = Response(404, b"404 page not found\n")


def json_response(status: int, body: Mapping[str, Any]) -> Response:
    """A compact JSON response, serialized as Go's ``encoding/json`` would."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Response(status, text.encode(), JSON)


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or ``:port`` into host and port.

    >>> split_host_port("[::1]:10256")
    ('::1', 10256)
    >>> split_host_port(":10249")
    ('', 10249)
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bind address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 bind address {address!r} needs brackets: [addr]:port")
    number = int(port)
    if number > 65535:
        raise ValueError(f"port {number} of {address!r} is out of range")
    return host, number


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


class _Handler(BaseHTTPRequestHandler):
    server: _AppServer
    server_version = "minikproxy"

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            response = self.server.app(path)
        except Exception:
            logger.exception("%s: handler for %s failed", self.server.label, path)
            response = Response(500, b"internal error\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if with_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, self.server.label, *args)


class _AppServer(ThreadingHTTPServer):
    """A threaded HTTP server answering with an :data:`App`; stops without polling."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], family: socket.AddressFamily, app: App, label: str
    ):
        self.address_family = family
        self.app = app
        self.label = label
        self._wake_r, self._wake_w = socket.socketpair()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        host = self.server_address[0]
        if self.address_family == socket.AF_INET6 and isinstance(host, str) and _is_wildcard(host):
            # Like Go, a wildcard listener serves both IPv4 and IPv6.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def serve_until_woken(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    self.handle_request()

    def wake(self) -> None:
        self._wake_w.send(b"x")

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Load balancers often probe with a bare TCP connect and close: not worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            logger.debug("%s: %s dropped the connection: %s", self.label, client_address, error)
        else:
            logger.exception("%s: request from %s failed", self.label, client_address)

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()


def _make_server(host: str, port: int, app: App, label: str) -> _AppServer:
    if ":" in host or host in ("", "0.0.0.0"):
        bind_host = "::" if _is_wildcard(host) else host
        try:
            return _AppServer((bind_host, port), socket.AF_INET6, app, label)
        except OSError:
            if not _is_wildcard(host):
                raise
            # No IPv6 on this host: fall back to IPv4 only.
    return _AppServer((host or "0.0.0.0", port), socket.AF_INET, app, label)


class BackgroundHTTPServer:
    """An HTTP server for ``app`` on ``bind_address``, served from a daemon thread.

    ``bind_address`` is ``host:port`` (``[v6]:port`` for IPv6); port 0 picks a free port,
    readable from :attr:`port` after :meth:`start`. A wildcard host (``0.0.0.0``, ``::`` or
    empty) listens on all IPv4 and IPv6 addresses, as Go does.
    """

    def __init__(self, bind_address: str, app: App, *, name: str = "http") -> None:
        self.bind_address = bind_address
        self.name = name
        self._app = app
        self._server: _AppServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start serving; raises ``OSError`` if the address cannot be bound."""
        if self._server is not None:
            return
        host, port = split_host_port(self.bind_address)
        server = _make_server(host, port, self._app, self.name)
        thread = threading.Thread(
            target=server.serve_until_woken, name=f"{self.name}-{self.port_of(server)}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        logger.info(
            "%s: serving on %s (port %d)", self.name, self.bind_address, self.port_of(server)
        )

    @staticmethod
    def port_of(server: _AppServer) -> int:
        """The port ``server`` is bound to."""
        return int(server.server_address[1])

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError(f"{self.name}: not started")
        return self.port_of(self._server)

    @property
    def running(self) -> bool:
        """Whether the server is started and not stopped."""
        return self._server is not None

    def stop(self) -> None:
        """Stop serving and close the listening socket. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.wake()
        thread.join()
        server.server_close()
        logger.info("%s: stopped serving on %s", self.name, self.bind_address)


class AppServer:
    """A server whose routes are its :meth:`app` method, served in the background."""

    def __init__(self, bind_address: str, *, name: str) -> None:
        self._http = BackgroundHTTPServer(bind_address, self.app, name=name)

    def app(self, path: str) -> Response:
        """Answer one request for ``path`` (subclasses define the routes)."""
        raise NotImplementedError

    def start(self) -> None:
        """Bind and serve in the background; raises ``OSError`` on bind failure."""
        self._http.start()

    def stop(self) -> None:
        """Stop serving."""
        self._http.stop()

    @property
    def port(self) -> int:
        """The bound port."""
        return self._http.port


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
    ) -> None:
        self.health = health
        self.metrics = metrics
        super().__init__(bind_address, name="healthz")

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

    ``bind_addresses`` are IPs (the node addresses matching ``--nodeport-addresses``); the
    default ``[""]`` listens on every address. Each listener answers any path with 200 when
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

    def sync_services(self, services: Mapping[ServiceKey, int]) -> None:
        """Make exactly ``services`` (name -> health check node port) listened on.

        Listeners of services gone or with a changed port are closed; new ones are opened. A
        port that cannot be bound is logged and tried again on the next call.
        """
        wanted = {_service_name(key): port for key, port in services.items()}
        with self._lock:
            for name, check in list(self._services.items()):
                if wanted.get(name) != check.port:
                    logger.info("closing healthcheck for %s on port %d", name, check.port)
                    _stop_all(check.servers)
                    del self._services[name]
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
                f"{host}:{port}", self._app_for(name), name=f"healthcheck {name}"
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
            for check in self._services.values():
                _stop_all(check.servers)
            self._services.clear()


def _stop_all(servers: Iterable[BackgroundHTTPServer]) -> None:
    for server in servers:
        server.stop()
