"""The small HTTP servers kube-proxy's endpoints run on (health, health-check node ports,
metrics): a selector-based server with bounded connections, request size and time, whose
applications map a path to a :class:`Response`."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
NOSNIFF = ("X-Content-Type-Options", "nosniff")


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
    """Answers one request whose head the server has already read (``request`` is a
    :class:`_Request`); HTTP/1.0, so the connection closes after the answer."""

    server: _AppServer  # type: ignore[assignment]
    request: _Request
    server_version = "minikproxy"

    def setup(self) -> None:
        self.connection = self.request.sock
        self.rfile = io.BytesIO(self.request.head)
        self.wfile = _SocketWriter(self.request.sock)

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


class _SocketWriter(io.BufferedIOBase):
    """A write-only file over a socket that never writes partially (``sendall``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


@dataclass(slots=True, eq=False)
class _Request:
    """An accepted connection and the bytes received on it so far."""

    sock: socket.socket
    address: Any
    deadline: float
    head: bytes = b""


MAX_CONNECTIONS = 1024
"""Open connections per listener (waiting for their request or being answered). Beyond it
the oldest one still waiting for its request is closed, so a new probe always gets in."""

REQUEST_TIMEOUT = 10.0
"""Seconds a client has to send its whole request head, and per send of the answer."""

WORKERS = 4
"""Threads per listener answering complete requests (started on demand)."""

MAX_REQUEST_HEAD = 16384
"""Bytes of request line and headers accepted; a longer head closes the connection."""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one listener may spend on clients (see :class:`_AppServer`)."""

    max_connections: int = MAX_CONNECTIONS
    request_timeout: float = REQUEST_TIMEOUT
    workers: int = WORKERS


class _AppServer:
    """An HTTP/1.0 server answering with an :data:`App`, hard to starve.

    One thread accepts connections (backlog ``SOMAXCONN``) and reads request heads without
    blocking (``selectors``), so idle or slow clients cost a socket, not a thread; each gets
    ``request_timeout`` seconds in all to send its head. Complete requests are answered by a
    pool of at most ``workers`` threads. At most ``max_connections`` connections are open:
    beyond that, the oldest still waiting for its request is closed.
    """

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        app: App,
        label: str,
        *,
        limits: ServerLimits,
        v6only: bool | None = None,
    ) -> None:
        self.app = app
        self.label = label
        self.max_connections = max(1, limits.max_connections)
        self.request_timeout = limits.request_timeout
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6only is not None:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            self.socket.bind(address)
            self.socket.listen(socket.SOMAXCONN)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._wake_r, self._wake_w = socket.socketpair()
        self._waiting: dict[socket.socket, _Request] = {}  # oldest first
        self._lock = threading.Lock()
        self._answering = 0
        self._accept_backoff = 0.0  # seconds; > 0 while accept() keeps failing
        self._accept_resume: float | None = None  # when to watch the listening socket again
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, limits.workers), thread_name_prefix=label
        )

    @property
    def open_connections(self) -> int:
        """Connections waiting for their request or being answered."""
        with self._lock:
            return len(self._waiting) + self._answering

    def serve_until_woken(self) -> None:
        """Serve until :meth:`wake` is called; then close every open connection."""
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select(self._select_timeout()):
                        if key.fileobj is self._wake_r:
                            return
                        if key.fileobj is self.socket:
                            self._accept(selector)
                        else:
                            self._read(selector, key.data)
                    self._expire(selector)
                    self._resume_accepting(selector)
            finally:
                for request in list(self._waiting.values()):
                    self._drop(selector, request)

    def _select_timeout(self) -> float | None:
        oldest = next(iter(self._waiting.values()), None)
        wake_at = [] if oldest is None else [oldest.deadline]
        if self._accept_resume is not None:
            wake_at.append(self._accept_resume)
        return max(0.0, min(wake_at) - time.monotonic()) if wake_at else None

    def _accept(self, selector: selectors.BaseSelector) -> None:
        for _ in range(64):  # a burst, then give the waiting connections a turn
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # e.g. out of file descriptors: make room
                if not self._evict_oldest(selector):
                    self._pause_accepting(selector, err)
                return
            self._accept_backoff = 0.0
            sock.setblocking(False)
            if self.open_connections >= self.max_connections and not self._evict_oldest(selector):
                sock.close()  # every slot is being answered
                continue
            request = _Request(sock, address, time.monotonic() + self.request_timeout)
            with self._lock:
                self._waiting[sock] = request
            selector.register(sock, selectors.EVENT_READ, request)

    def _pause_accepting(self, selector: selectors.BaseSelector, err: OSError) -> None:
        """Stop watching the listening socket for a while (5 ms, doubling to 1 s while accept
        keeps failing, as Go's net/http does): it stays readable, so retrying at once would
        spin a core and flood the log."""
        self._accept_backoff = min(1.0, max(0.005, 2 * self._accept_backoff))
        if self._accept_backoff >= 1.0 or self._accept_backoff == 0.005:
            logger.warning(
                "%s: cannot accept a connection (%s); retrying in %.3f s",
                self.label,
                err,
                self._accept_backoff,
            )
        selector.unregister(self.socket)
        self._accept_resume = time.monotonic() + self._accept_backoff

    def _resume_accepting(self, selector: selectors.BaseSelector) -> None:
        if self._accept_resume is not None and time.monotonic() >= self._accept_resume:
            self._accept_resume = None
            selector.register(self.socket, selectors.EVENT_READ)

    def _evict_oldest(self, selector: selectors.BaseSelector) -> bool:
        oldest = next(iter(self._waiting.values()), None)
        if oldest is None:
            return False
        logger.debug("%s: too many connections, closing %s's", self.label, oldest.address)
        self._drop(selector, oldest)
        return True

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._waiting:
            oldest = next(iter(self._waiting.values()))
            if oldest.deadline > now:
                return
            logger.debug("%s: %s sent no request in time", self.label, oldest.address)
            self._drop(selector, oldest)

    def _read(self, selector: selectors.BaseSelector, request: _Request) -> None:
        try:
            data = request.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            logger.debug("%s: %s dropped the connection: %s", self.label, request.address, err)
            self._drop(selector, request)
            return
        if not data:
            self._drop(selector, request)
            return
        request.head += data
        if b"\r\n\r\n" in request.head or b"\n\n" in request.head:
            selector.unregister(request.sock)
            with self._lock:
                del self._waiting[request.sock]
                self._answering += 1
            self._pool.submit(self._answer, request)
        elif len(request.head) > MAX_REQUEST_HEAD:
            logger.debug("%s: request head from %s too long", self.label, request.address)
            self._drop(selector, request)

    def _drop(self, selector: selectors.BaseSelector, request: _Request) -> None:
        selector.unregister(request.sock)
        with self._lock:
            self._waiting.pop(request.sock, None)
        request.sock.close()

    def _answer(self, request: _Request) -> None:
        sock = request.sock
        try:
            sock.settimeout(self.request_timeout)
            _Handler(request, request.address, self)  # type: ignore[arg-type]
        except Exception:
            self.handle_error(request.address)
        finally:
            with self._lock:
                self._answering -= 1
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.close()

    def handle_error(self, client_address: Any) -> None:
        # Load balancers often probe with a bare TCP connect and close: not worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("%s: %s dropped the connection: %s", self.label, client_address, error)
        else:
            logger.exception("%s: request from %s failed", self.label, client_address)

    def wake(self) -> None:
        """Make :meth:`serve_until_woken` return."""
        self._wake_w.send(b"x")

    def server_close(self) -> None:
        """Close the listening socket (after the loop returned) and wait for the answers."""
        self.socket.close()
        self._pool.shutdown(wait=True)
        self._wake_r.close()
        self._wake_w.close()


def _make_server(
    host: str,
    port: int,
    app: App,
    label: str,
    limits: ServerLimits,
    *,
    family_wildcards: bool = False,
) -> _AppServer:
    """A server on ``host:port``. A wildcard host listens on IPv4 and IPv6, as Go does; with
    ``family_wildcards``, ``0.0.0.0`` means IPv4 only and ``::`` IPv6 only ("" both)."""
    if family_wildcards and host == "0.0.0.0":
        return _AppServer((host, port), socket.AF_INET, app, label, limits=limits)
    if family_wildcards and host == "::":
        return _AppServer((host, port), socket.AF_INET6, app, label, limits=limits, v6only=True)
    if ":" in host or host in ("", "0.0.0.0"):
        wildcard = _is_wildcard(host)
        try:
            return _AppServer(
                ("::" if wildcard else host, port),
                socket.AF_INET6,
                app,
                label,
                limits=limits,
                v6only=False if wildcard else None,
            )
        except OSError:
            if not wildcard:
                raise
            # No IPv6 on this host: fall back to IPv4 only.
    return _AppServer((host or "0.0.0.0", port), socket.AF_INET, app, label, limits=limits)


class BackgroundHTTPServer:
    """An HTTP server for ``app`` on ``bind_address``, served from a daemon thread.

    ``bind_address`` is ``host:port`` (``[v6]:port`` for IPv6); port 0 picks a free port,
    readable from :attr:`port` after :meth:`start`. A wildcard host (``0.0.0.0``, ``::`` or
    empty) listens on all IPv4 and IPv6 addresses, as Go does; with ``family_wildcards``,
    ``0.0.0.0`` and ``::`` are each one family's. ``limits`` bound what clients may hold.
    """

    def __init__(
        self,
        bind_address: str,
        app: App,
        *,
        name: str = "http",
        limits: ServerLimits | None = None,
        family_wildcards: bool = False,
    ) -> None:
        self.bind_address = bind_address
        self.name = name
        self.limits = limits if limits is not None else ServerLimits()
        self.family_wildcards = family_wildcards
        self._app = app
        self._server: _AppServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and start serving; raises ``OSError`` if the address cannot be bound."""
        if self._server is not None:
            return
        host, port = split_host_port(self.bind_address)
        server = _make_server(
            host, port, self._app, self.name, self.limits, family_wildcards=self.family_wildcards
        )
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
    def open_connections(self) -> int:
        """Client connections open now (0 when not started)."""
        server = self._server
        return 0 if server is None else server.open_connections

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

    def __init__(self, bind_address: str, *, name: str, limits: ServerLimits | None = None) -> None:
        self._http = BackgroundHTTPServer(bind_address, self.app, name=name, limits=limits)

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

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return self._http.open_connections
