"""An in-process fake Kubernetes API server, faithful at the HTTP level for what kube-proxy uses.

:class:`FakeApiServer` listens on 127.0.0.1 (ephemeral port) and serves core/v1 ``services``,
``endpoints`` and ``nodes``, discovery.k8s.io/v1 ``endpointslices``, networking.k8s.io/v1
``servicecidrs`` (cluster-scoped; Kubernetes 1.33+) and events.k8s.io/v1 ``events`` (create
and patch only), with the real server's discovery documents (``/api``, ``/apis``, each group
version's resource list) and list and watch semantics:

- one global resourceVersion counter across all kinds (etcd-like, strings of integers);
- LIST with ``limit``/``continue`` pagination over a consistent snapshot, label selectors
  (``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``) and field
  selectors (``metadata.name``, ``metadata.namespace``); list items carry no kind/apiVersion;
- WATCH as a chunked stream of JSON lines, starting after ``resourceVersion`` (or with synthetic
  ADDED events for ``""``/``"0"``), ``410 Expired`` ERROR events for compacted versions,
  the watch cache's ``504 Timeout`` ERROR event (cause ``ResourceVersionTooLarge``) for a
  resourceVersion newer than the store's after waiting for it a while (e.g. after an etcd
  restore, :meth:`FakeApiServer.rollback`), BOOKMARK events, ``timeoutSeconds``, and selector
  transitions delivered as ADDED/DELETED.

``unserved=("servicecidrs",)`` (or :meth:`FakeApiServer.set_served`) makes it an older API
server that does not serve a resource: its group version is gone from discovery when nothing
else of it is served, and its paths answer ``404 NotFound`` (the test controls still store
its objects, as another, newer API server of the cluster would). ServiceCIDR writes are
validated as the real server does (one or two CIDRs of different families; ``spec.cidrs``
immutable but for adding the second family, 1.33+).

It serves plain HTTP on 127.0.0.1 by default. Given ``tls_cert``/``tls_key`` it serves HTTPS
(the in-cluster path: the client checks the certificate against the service account's
``ca.crt``), on any ``host``/``port`` (the address of a test network namespace, bind it from a
thread in that namespace); given ``token`` every request must carry ``Authorization: Bearer
TOKEN`` or is answered ``401 Unauthorized`` with a ``Status`` body, as the real server does.

Tests drive it through controls (:meth:`FakeApiServer.create`, :meth:`~FakeApiServer.update`,
:meth:`~FakeApiServer.delete`, :meth:`~FakeApiServer.compact`, :meth:`~FakeApiServer.drop_watches`,
:meth:`~FakeApiServer.outage`, :meth:`~FakeApiServer.rollback`...) and read
:attr:`~FakeApiServer.request_log` to check which RBAC verbs a component used. Only the
standard library is used.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime
import ipaddress
import json
import queue
import re
import secrets
import select
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "RESOURCES",
    "ApiError",
    "FakeApiServer",
    "RequestRecord",
    "ResourceType",
    "parse_field_selector",
    "parse_label_selector",
]

_SERVER_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-minikproxy-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


@dataclass(frozen=True)
class ResourceType:
    """One served resource: API group/version, plural, kind, scope and the verbs it allows."""

    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    verbs: frozenset[str]

    @property
    def api_version(self) -> str:
        """The ``apiVersion`` of objects of this kind (``v1``, ``discovery.k8s.io/v1``)."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_path(self) -> str:
        """The URL prefix of this group/version (``/api/v1``, ``/apis/discovery.k8s.io/v1``)."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


_RW_VERBS = frozenset({"get", "list", "watch", "create", "update", "patch", "delete"})

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "services", "Service", True, _RW_VERBS),
    ResourceType("", "v1", "endpoints", "Endpoints", True, _RW_VERBS),
    ResourceType("", "v1", "nodes", "Node", False, _RW_VERBS),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, _RW_VERBS),
    ResourceType("networking.k8s.io", "v1", "servicecidrs", "ServiceCIDR", False, _RW_VERBS),
    ResourceType("events.k8s.io", "v1", "events", "Event", True, frozenset({"create", "patch"})),
)
_BY_PLURAL = {rt.plural: rt for rt in RESOURCES}
_BY_KIND = {rt.kind: rt for rt in RESOURCES}
_BY_GVR = {(rt.group, rt.version, rt.plural): rt for rt in RESOURCES}


class ApiError(Exception):
    """An API error, answered as a ``Status`` object (also raised by the test controls)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message

    def status(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``Status`` object the real API server sends for this error."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": dict(metadata or {}),
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered, in RBAC terms (``verb`` on ``group``/``resource``)."""

    method: str
    path: str
    resource: str | None  # plural, None for non-resource URLs (/version, /api, /apis)
    group: str | None  # "" for the core group
    verb: str  # get, list, watch, create, update, patch, delete
    namespace: str | None
    name: str | None
    query: Mapping[str, str]


# --- selectors -------------------------------------------------------------------------------

_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_EXISTS_RE = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_EQUALITY_RE = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*")
_SET_RE = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*")


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``key op values`` (op: exists, !, =, !=, in, notin)."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a label (or field) map satisfies this requirement, with Kubernetes rules."""
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # "!=", "notin"


def _split_terms(text: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a label selector; raise :class:`ApiError` (400) if it is malformed."""
    if not text.strip():
        return ()
    reqs: list[Requirement] = []
    for term in _split_terms(text):
        if m := _EXISTS_RE.fullmatch(term):
            reqs.append(Requirement(m[2], "!" if m[1] else "exists"))
        elif m := _EQUALITY_RE.fullmatch(term):
            op = "!=" if m[2] == "!=" else "="
            reqs.append(Requirement(m[1], op, frozenset({m[3]})))
        elif m := _SET_RE.fullmatch(term):
            values = [v.strip() for v in m[3].split(",")]
            if not all(re.fullmatch(_VALUE, v) for v in values):
                raise ApiError(400, "BadRequest", f"invalid label selector values: {term!r}")
            reqs.append(Requirement(m[1], m[2], frozenset(values)))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term.strip()!r}")
    return tuple(reqs)


_FIELD_RE = re.compile(r"\s*([A-Za-z.]+)\s*(==|=|!=)\s*([^,]*?)\s*")
_SUPPORTED_FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str) -> tuple[Requirement, ...]:
    """Parse a field selector on ``metadata.name`` / ``metadata.namespace``; 400 otherwise."""
    if not text.strip():
        return ()
    reqs: list[Requirement] = []
    for term in text.split(","):
        m = _FIELD_RE.fullmatch(term)
        if m is None:
            raise ApiError(400, "BadRequest", f"invalid field selector: {term.strip()!r}")
        if m[1] not in _SUPPORTED_FIELDS:
            raise ApiError(400, "BadRequest", f'field label not supported: "{m[1]}"')
        reqs.append(Requirement(m[1], "!=" if m[2] == "!=" else "=", frozenset({m[3]})))
    return tuple(reqs)


@dataclass(frozen=True)
class _Filter:
    namespace: str | None
    labels: tuple[Requirement, ...]
    fields: tuple[Requirement, ...]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "")
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.labels:
            labels = meta.get("labels") or {}
            if not all(r.matches(labels) for r in self.labels):
                return False
        if self.fields:
            fields = {"metadata.name": meta.get("name", ""), "metadata.namespace": namespace}
            if not all(r.matches(fields) for r in self.fields):
                return False
        return True


# --- storage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A stored object and its two encodings (list item without kind/apiVersion; full)."""

    obj: dict[str, Any]
    item_json: bytes
    full_json: bytes

    @classmethod
    def of(cls, obj: dict[str, Any]) -> _Entry:
        item = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
        item_json = json.dumps(item, separators=(",", ":")).encode()
        head = json.dumps({"kind": obj["kind"], "apiVersion": obj["apiVersion"]}).encode()
        return cls(obj, item_json, head[:-1] + b"," + item_json[1:])

    def with_rv(self, rv: int) -> _Entry:
        obj = json.loads(self.full_json)
        obj["metadata"]["resourceVersion"] = str(rv)
        return _Entry.of(obj)


@dataclass(frozen=True)
class _Event:
    rv: int
    rt: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    key: str
    entry: _Entry  # the new object, or the final state of a deleted one
    prev: _Entry | None


def _event_line(event_type: str, full_json: bytes) -> bytes:
    return b'{"type":"' + event_type.encode() + b'","object":' + full_json + b"}\n"


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic merge patches)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


class _Signal:
    """Out-of-band markers put on a watch queue."""

    def __init__(self, name: str) -> None:
        self.name = name


_CLOSE = _Signal("close")  # end the stream cleanly (terminating chunk)
_DROP = _Signal("drop")  # abort the connection


class _Watch:
    def __init__(
        self, rt: ResourceType, flt: _Filter, bookmarks: bool, sock: socket.socket
    ) -> None:
        self.rt = rt
        self.filter = flt
        self.bookmarks = bookmarks
        self.sock = sock
        self.queue: queue.SimpleQueue[bytes | _Signal] = queue.SimpleQueue()

    def line_for(self, ev: _Event) -> bytes | None:
        """The event this watch sees, after selector transitions (or None)."""
        matches_now = self.filter.matches(ev.entry.obj)
        if ev.type == "DELETED":
            return _event_line("DELETED", ev.entry.full_json) if matches_now else None
        matched_before = ev.prev is not None and self.filter.matches(ev.prev.obj)
        if matches_now:
            return _event_line("MODIFIED" if matched_before else "ADDED", ev.entry.full_json)
        if matched_before and ev.prev is not None:
            return _event_line("DELETED", ev.prev.with_rv(ev.rv).full_json)
        return None

    def abort(self) -> None:
        self.queue.put(_DROP)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


# --- HTTP plumbing ---------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: FakeApiServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return not self.api.refusing

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients going away and failed TLS handshakes (a client rejecting the certificate)
        are part of the tests: count the handshake failures, print nothing."""
        if isinstance(sys.exc_info()[1], ssl.SSLError):
            self.api._count_tls_failure()
        elif not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.api._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log."""

    def do_GET(self) -> None:
        self.server.api._serve(self, "GET")

    def do_POST(self) -> None:
        self.server.api._serve(self, "POST")

    def do_PUT(self) -> None:
        self.server.api._serve(self, "PUT")

    def do_PATCH(self) -> None:
        self.server.api._serve(self, "PATCH")

    def do_DELETE(self) -> None:
        self.server.api._serve(self, "DELETE")

    def send_json(self, code: int, body: bytes) -> None:
        """Send a complete JSON response."""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_chunk(self, data: bytes) -> None:
        """Send one chunk of a chunked response (empty data ends the stream)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


@dataclass(frozen=True)
class _Route:
    rt: ResourceType | None
    namespace: str | None
    name: str | None
    nonresource: str | None = None  # "version", "api", "apis", or a group/version path


def _route(path: str) -> _Route:
    parts = [p for p in path.split("/") if p]
    if parts in (["version"], ["api"], ["apis"]):
        return _Route(None, None, None, parts[0])
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if not rest:
        return _Route(None, None, None, "/".join(parts))
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if len(rest) > 2 or rest[0] == "namespaces":
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    rt = _BY_GVR.get((group, version, rest[0]))
    name = rest[1] if len(rest) == 2 else None
    if rt is None or (namespace is not None and not rt.namespaced):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    if name is not None and rt.namespaced and namespace is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return _Route(rt, namespace, name)


def _verb(method: str, route: _Route, query: Mapping[str, str]) -> str:
    if method == "GET":
        if route.name is not None:
            return "get"
        return "watch" if query.get("watch") in ("true", "1") else "list"
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    if (verb == "create") != (route.name is None):
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on this path")
    return verb


# --- the server ------------------------------------------------------------------------------


class FakeApiServer:
    """An in-process HTTP fake of the Kubernetes API server (see the module docstring).

    Use as a context manager or call :meth:`start` / :meth:`stop`. All methods are thread-safe.
    ``bookmark_interval`` (seconds) sends BOOKMARK events periodically to watches that asked
    for them; ``None`` (the default) sends them only when :meth:`send_bookmarks` is called.
    ``fresh_wait`` (seconds) is how long a watch from a resourceVersion newer than the store's
    waits for it before the watch cache's "Too large resource version" error (the real
    cacher blocks up to 3 s). ``unserved`` names resources (plurals) this server does not
    serve, as an older API server (see :meth:`set_served`).
    """

    def __init__(
        self,
        *,
        bookmark_interval: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
        fresh_wait: float = 3.0,
        unserved: Collection[str] = (),
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self._unserved = {self._plural(plural).plural for plural in unserved}
        self._host = host
        self._port = port
        self._tls_files = (tls_cert, tls_key) if tls_cert is not None else None
        self._token = token
        self._unauthorized = 0
        self._tls_failures = 0
        self._lock = threading.RLock()
        self._watches_changed = threading.Condition(self._lock)
        self._written = threading.Condition(self._lock)  # notified on every write
        self._fresh_wait = fresh_wait
        self._rv = 1
        self._compacted = 0  # watches/continues from an RV below this get 410
        self._objects: dict[str, dict[str, _Entry]] = {rt.plural: {} for rt in RESOURCES}
        self._sorted_keys: dict[str, list[str] | None] = {rt.plural: None for rt in RESOURCES}
        self._history: list[_Event] = []
        self._watches: set[_Watch] = set()
        self._connections: set[socket.socket] = set()
        self._log: list[RequestRecord] = []
        self._outage: str | None = None  # None, "503" or "refuse"
        self._bookmark_interval = bookmark_interval
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    # lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeApiServer:
        """Bind the address (default 127.0.0.1, an ephemeral port) and serve in background
        threads. The listening socket belongs to the calling thread's network namespace."""
        if self._httpd is not None:
            raise RuntimeError("FakeApiServer already started")
        httpd = _HTTPServer((self._host, self._port), _Handler)
        httpd.api = self
        if self._tls_files is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self._tls_files[0]), str(self._tls_files[1]))
            # The handshake happens on the connection's own thread, at its first read.
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        self._stopped.clear()
        serve = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name="fake-apiserver", daemon=True
        )
        serve.start()
        self._threads = [serve]
        if self._bookmark_interval is not None:
            ticker = threading.Thread(
                target=self._bookmark_loop, name="fake-bookmarks", daemon=True
            )
            ticker.start()
            self._threads.append(ticker)
        return self

    def stop(self) -> None:
        """Stop serving: abort every watch and close every connection."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopped.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            watches, self._watches = list(self._watches), set()
            connections = list(self._connections)
        for w in watches:
            w.abort()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http(s)://<host>:<port>`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("FakeApiServer is not running")
        scheme = "https" if self._tls_files is not None else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._httpd.server_address[1]}"

    @property
    def unauthorized_count(self) -> int:
        """How many requests were refused with 401 (missing or wrong bearer token)."""
        with self._lock:
            return self._unauthorized

    @property
    def tls_failure_count(self) -> int:
        """How many connections failed their TLS handshake (e.g. the client rejected the
        certificate)."""
        with self._lock:
            return self._tls_failures

    def _count_tls_failure(self) -> None:
        with self._lock:
            self._tls_failures += 1

    def write_kubeconfig(self, path: str | Path, *, ca_file: str | Path | None = None) -> Path:
        """Write a kubeconfig for this server (with its token, if any; for HTTPS, pass the CA
        certificate in ``ca_file``); return its path."""
        cluster: dict[str, Any] = {"server": self.url}
        if ca_file is not None:
            cluster["certificate-authority"] = str(ca_file)
        user = {"token": self._token} if self._token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        out = Path(path)
        out.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML
        return out

    # test controls ------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion."""
        with self._lock:
            return str(self._rv)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Store a new object (its ``kind`` picks the resource); return it as stored."""
        rt = self._kind_of(obj)
        with self._lock:
            return json.loads(self._create(rt, obj).full_json)  # type: ignore[no-any-return]

    def update(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Replace an existing object (409 if a given resourceVersion is stale)."""
        rt = self._kind_of(obj)
        with self._lock:
            return json.loads(self._update(rt, obj).full_json)  # type: ignore[no-any-return]

    def delete(self, kind_plural: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete an object; return its final state (with the deletion's resourceVersion)."""
        rt = self._plural(kind_plural)
        with self._lock:
            return json.loads(self._delete(rt, namespace, name).full_json)  # type: ignore[no-any-return]

    def get(self, kind_plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object, or None."""
        rt = self._plural(kind_plural)
        with self._lock:
            entry = self._objects[rt.plural].get(_key(self._ns(rt, namespace), name))
        return None if entry is None else json.loads(entry.full_json)

    def objects(self, kind_plural: str) -> list[dict[str, Any]]:
        """All stored objects of a resource, in key order (e.g. ``objects("events")``)."""
        rt = self._plural(kind_plural)
        with self._lock:
            entries = [self._objects[rt.plural][k] for k in self._keys(rt)]
        return [json.loads(e.full_json) for e in entries]

    def compact(self) -> str:
        """Forget all history up to now: older resourceVersions now answer 410 Gone."""
        with self._lock:
            self._compacted = self._rv
            self._history.clear()
            return str(self._rv)

    def rollback(self, resource_version: str) -> None:
        """Restore every resource as it was at ``resource_version`` (an etcd restore from a
        backup, an API server rolled back): later history is lost and the global
        resourceVersion goes back to ``resource_version``; open watches are dropped (the API
        servers restart). Clients still holding a newer resourceVersion then get the watch
        cache's "Too large resource version" error until the store catches up."""
        rv = int(resource_version)
        with self._lock:
            if not self._compacted <= rv <= self._rv:
                raise ValueError(
                    f"cannot roll back to {rv}: history is {self._compacted}..{self._rv}"
                )
            for rt in RESOURCES:
                past, _ = self._snapshot(rt, rv)
                self._objects[rt.plural] = dict(past)
                self._sorted_keys[rt.plural] = None
            start = bisect.bisect_right(self._history, rv, key=lambda e: e.rv)
            del self._history[start:]
            self._rv = rv
        self.drop_watches()

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection; return how many were open."""
        with self._lock:
            watches, self._watches = list(self._watches), set()
        for w in watches:
            w.abort()
        return len(watches)

    def send_bookmarks(self) -> int:
        """Send a BOOKMARK at the current resourceVersion to every watch that allows them."""
        with self._lock:
            sent = 0
            for w in self._watches:
                if w.bookmarks:
                    w.queue.put(self._bookmark_line(w.rt))
                    sent += 1
            return sent

    def set_outage(self, on: bool, *, refuse: bool = False) -> None:
        """Start or end an outage; starting one drops all watches.

        During an outage requests are answered ``503 ServiceUnavailable``, or with ``refuse``
        connections are closed without an answer (new connections are not even read).
        """
        with self._lock:
            self._outage = ("refuse" if refuse else "503") if on else None
        if on:
            self.drop_watches()

    @contextlib.contextmanager
    def outage(self, *, refuse: bool = False) -> Iterator[None]:
        """Context manager form of :meth:`set_outage`."""
        self.set_outage(True, refuse=refuse)
        try:
            yield
        finally:
            self.set_outage(False)

    def set_served(self, plural: str, served: bool) -> None:
        """Serve a resource or stop serving it (an API server up- or downgraded). Unserved, it
        is missing from discovery and its paths answer 404; open watches of it are dropped."""
        rt = self._plural(plural)
        with self._lock:
            if served:
                self._unserved.discard(rt.plural)
                return
            self._unserved.add(rt.plural)
            watches = [w for w in self._watches if w.rt is rt]
            self._watches -= set(watches)
        for w in watches:
            w.abort()

    def served(self, plural: str) -> bool:
        """Whether the resource is served (see :meth:`set_served`)."""
        with self._lock:
            return self._plural(plural).plural not in self._unserved

    @property
    def refusing(self) -> bool:
        """Whether the server currently refuses connections (an outage with ``refuse``)."""
        return self._outage == "refuse"

    @property
    def request_log(self) -> list[RequestRecord]:
        """A copy of the requests answered so far, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_request_log(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._log.clear()

    @property
    def watch_count(self) -> int:
        """How many watch streams are open."""
        with self._lock:
            return len(self._watches)

    def wait_for_watches(self, count: int, plural: str | None = None, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` watches (of ``plural``, if given) are open."""

        def enough() -> bool:
            return sum(1 for w in self._watches if plural in (None, w.rt.plural)) >= count

        with self._watches_changed:
            return self._watches_changed.wait_for(enough, timeout)

    # storage (call with the lock held) -----------------------------------------------------

    @staticmethod
    def _kind_of(obj: Mapping[str, Any]) -> ResourceType:
        rt = _BY_KIND.get(obj.get("kind", ""))
        if rt is None:
            raise ApiError(400, "BadRequest", f"unsupported kind {obj.get('kind')!r}")
        return rt

    @staticmethod
    def _plural(plural: str) -> ResourceType:
        rt = _BY_PLURAL.get(plural)
        if rt is None:
            raise ApiError(404, "NotFound", f"unknown resource {plural!r}")
        return rt

    @staticmethod
    def _ns(rt: ResourceType, namespace: str | None) -> str:
        return (namespace or "default") if rt.namespaced else ""

    def _keys(self, rt: ResourceType) -> list[str]:
        keys = self._sorted_keys[rt.plural]
        if keys is None:
            keys = sorted(self._objects[rt.plural])
            self._sorted_keys[rt.plural] = keys
        return keys

    def _prepare(self, rt: ResourceType, obj: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        new: dict[str, Any] = json.loads(json.dumps(obj))
        if new.get("kind", rt.kind) != rt.kind:
            raise ApiError(400, "BadRequest", f"kind {new['kind']!r} does not match {rt.kind}")
        new["kind"], new["apiVersion"] = rt.kind, rt.api_version
        meta = new.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{rt.kind}: metadata.name: Required value")
        if rt.namespaced:
            meta["namespace"] = self._ns(rt, meta.get("namespace"))
        else:
            meta.pop("namespace", None)
        return new, _key(meta.get("namespace", ""), meta["name"])

    def _record(self, ev: _Event) -> None:
        self._history.append(ev)
        self._written.notify_all()
        for w in self._watches:
            if w.rt is ev.rt and (line := w.line_for(ev)) is not None:
                w.queue.put(line)

    def _create(self, rt: ResourceType, obj: Mapping[str, Any]) -> _Entry:
        new, key = self._prepare(rt, obj)
        store = self._objects[rt.plural]
        if rt.plural == "servicecidrs":
            _validate_service_cidr(new, None)
        if key in store:
            name = new["metadata"]["name"]
            raise ApiError(409, "AlreadyExists", f'{rt.plural} "{name}" already exists')
        self._rv += 1
        meta = new["metadata"]
        meta["resourceVersion"] = str(self._rv)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        entry = _Entry.of(new)
        store[key] = entry
        self._sorted_keys[rt.plural] = None
        self._record(_Event(self._rv, rt, "ADDED", key, entry, None))
        return entry

    def _update(self, rt: ResourceType, obj: Mapping[str, Any]) -> _Entry:
        new, key = self._prepare(rt, obj)
        store = self._objects[rt.plural]
        old = store.get(key)
        meta = new["metadata"]
        if old is None:
            raise ApiError(404, "NotFound", f'{rt.plural} "{meta["name"]}" not found')
        if rt.plural == "servicecidrs":
            _validate_service_cidr(new, old.obj)
        old_meta = old.obj["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != old_meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rt.plural} "{meta["name"]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["uid"] = old_meta["uid"]
        meta["creationTimestamp"] = old_meta["creationTimestamp"]
        entry = _Entry.of(new)
        store[key] = entry
        self._record(_Event(self._rv, rt, "MODIFIED", key, entry, old))
        return entry

    def _delete(self, rt: ResourceType, namespace: str | None, name: str) -> _Entry:
        key = _key(self._ns(rt, namespace), name)
        old = self._objects[rt.plural].pop(key, None)
        if old is None:
            raise ApiError(404, "NotFound", f'{rt.plural} "{name}" not found')
        self._sorted_keys[rt.plural] = None
        self._rv += 1
        entry = old.with_rv(self._rv)
        self._record(_Event(self._rv, rt, "DELETED", key, entry, old))
        return entry

    def _snapshot(self, rt: ResourceType, rv: int) -> tuple[dict[str, _Entry], list[str]]:
        """The objects of ``rt`` as they were at ``rv`` (undoing later history)."""
        store = self._objects[rt.plural]
        start = bisect.bisect_right(self._history, rv, key=lambda e: e.rv)
        later = [e for e in self._history[start:] if e.rt is rt]
        if not later:
            return store, self._keys(rt)
        past = dict(store)
        for ev in reversed(later):
            if ev.prev is None:
                past.pop(ev.key, None)
            else:
                past[ev.key] = ev.prev
        return past, sorted(past)

    def _bookmark_line(self, rt: ResourceType) -> bytes:
        obj: dict[str, Any] = {
            "kind": rt.kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
        }
        return _event_line("BOOKMARK", json.dumps(obj, separators=(",", ":")).encode())

    def _bookmark_loop(self) -> None:
        assert self._bookmark_interval is not None
        while not self._stopped.wait(self._bookmark_interval):
            self.send_bookmarks()

    # HTTP ----------------------------------------------------------------------------------

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _serve(self, h: _Handler, method: str) -> None:
        if self._outage == "refuse":
            h.close_connection = True
            return
        url = urlsplit(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            if self._token is not None and not self._authorized(h.headers.get("Authorization")):
                with self._lock:
                    self._unauthorized += 1
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if self._outage == "503":
                raise ApiError(503, "ServiceUnavailable", "the server is currently unavailable")
            route = _route(url.path)
            if route.rt is None:
                self._log_request(method, url.path, route, "get", query)
                h.send_json(200, json.dumps(self._discovery(route)).encode())
                return
            verb = _verb(method, route, query)
            self._log_request(method, url.path, route, verb, query)
            if route.rt.plural in self._unserved:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if verb not in route.rt.verbs:
                raise ApiError(
                    405, "MethodNotAllowed", f"{verb} is not supported on {route.rt.plural}"
                )
            if verb == "watch":
                self._serve_watch(h, route, query)
                return
            code, payload = self._handle(route, verb, query, body, h.headers.get("Content-Type"))
            h.send_json(code, payload)
        except ApiError as err:
            h.send_json(err.code, json.dumps(err.status()).encode())
        except (ValueError, KeyError, TypeError) as err:
            bad = ApiError(400, "BadRequest", f"bad request: {err}")
            h.send_json(400, json.dumps(bad.status()).encode())

    def _authorized(self, header: str | None) -> bool:
        # As the API server's bearer-token authenticator: the scheme is case-insensitive
        # (the kubernetes client sends "bearer").
        parts = (header or "").strip().split(" ", 2)
        return len(parts) >= 2 and parts[0].lower() == "bearer" and parts[1] == self._token

    def _log_request(
        self, method: str, path: str, route: _Route, verb: str, query: Mapping[str, str]
    ) -> None:
        rt = route.rt
        record = RequestRecord(
            method=method,
            path=path,
            resource=rt.plural if rt else None,
            group=rt.group if rt else None,
            verb=verb,
            namespace=route.namespace,
            name=route.name,
            query=dict(query),
        )
        with self._lock:
            self._log.append(record)

    def _discovery(self, route: _Route) -> dict[str, Any]:
        what = route.nonresource
        with self._lock:
            resources = [rt for rt in RESOURCES if rt.plural not in self._unserved]
        if what == "version":
            if "servicecidrs" in self._unserved:  # networking.k8s.io/v1 ServiceCIDR: 1.33
                return {**_SERVER_VERSION, "minor": "32", "gitVersion": "v1.32.0-minikproxy-fake"}
            return dict(_SERVER_VERSION)
        if what == "api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if what == "apis":
            groups = sorted({(rt.group, rt.version) for rt in resources if rt.group})
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in groups
                ],
            }
        served = [rt for rt in resources if rt.group_path.lstrip("/") == what]
        if not served:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": served[0].api_version,
            "resources": [
                {
                    "name": rt.plural,
                    "singularName": rt.kind.lower(),
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": sorted(rt.verbs),
                }
                for rt in served
            ],
        }

    def _handle(
        self,
        route: _Route,
        verb: str,
        query: Mapping[str, str],
        body: bytes,
        content_type: str | None,
    ) -> tuple[int, bytes]:
        rt = route.rt
        assert rt is not None
        if verb == "list":
            return 200, self._list(rt, route.namespace, query)
        assert route.name is not None or verb == "create"
        with self._lock:
            if verb == "get":
                entry = self._objects[rt.plural].get(
                    _key(self._ns(rt, route.namespace), route.name or "")
                )
                if entry is None:
                    raise ApiError(404, "NotFound", f'{rt.plural} "{route.name}" not found')
                return 200, entry.full_json
            if verb == "delete":
                return 200, self._delete(rt, route.namespace, route.name or "").full_json
            data = json.loads(body or b"null")
            if verb == "patch":
                return 200, self._patch(rt, route, data, content_type).full_json
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the request body must be a JSON object")
            meta = data.setdefault("metadata", {})
            if rt.namespaced:
                if meta.get("namespace", route.namespace) != route.namespace:
                    raise ApiError(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace "
                        "sent on the request",
                    )
                meta["namespace"] = route.namespace
            if verb == "create":
                return 201, self._create(rt, data).full_json
            if meta.get("name", route.name) != route.name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
            meta["name"] = route.name
            return 200, self._update(rt, data).full_json

    def _patch(
        self, rt: ResourceType, route: _Route, patch: Any, content_type: str | None
    ) -> _Entry:
        ctype = (content_type or "").split(";")[0].strip()
        if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
        current = self._objects[rt.plural].get(
            _key(self._ns(rt, route.namespace), route.name or "")
        )
        if current is None:
            raise ApiError(404, "NotFound", f'{rt.plural} "{route.name}" not found')
        merged = _merge_patch(json.loads(current.full_json), patch)
        merged["metadata"]["name"] = route.name
        if rt.namespaced:
            merged["metadata"]["namespace"] = current.obj["metadata"]["namespace"]
        return self._update(rt, merged)

    def _list(self, rt: ResourceType, namespace: str | None, query: Mapping[str, str]) -> bytes:
        flt = _Filter(
            namespace,
            parse_label_selector(query.get("labelSelector", "")),
            parse_field_selector(query.get("fieldSelector", "")),
        )
        limit = int(query["limit"]) if query.get("limit") else 0
        token = query.get("continue", "")
        with self._lock:
            if token:
                snapshot_rv, after = self._decode_continue(token)
                if snapshot_rv < self._compacted:
                    fresh = self._encode_continue(self._rv, after)
                    raise _ExpiredContinue(fresh)
            else:
                snapshot_rv, after = self._rv, ""
            entries, keys = self._snapshot(rt, snapshot_rv)
            start = bisect.bisect_right(keys, after) if after else 0
            items: list[bytes] = []
            next_token = ""
            for i in range(start, len(keys)):
                entry = entries[keys[i]]
                if not flt.matches(entry.obj):
                    continue
                if limit and len(items) == limit:
                    next_token = self._encode_continue(snapshot_rv, keys[i - 1])
                    break
                items.append(entry.item_json)
        meta: dict[str, str] = {"resourceVersion": str(snapshot_rv)}
        if next_token:
            meta["continue"] = next_token
        head = {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta}
        return json.dumps(head).encode()[:-1] + b',"items":[' + b",".join(items) + b"]}"

    @staticmethod
    def _encode_continue(rv: int, after: str) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": after}).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, str]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            return int(data["rv"]), str(data["start"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "BadRequest", "continue key is not valid") from None

    def _serve_watch(self, h: _Handler, route: _Route, query: Mapping[str, str]) -> None:
        rt = route.rt
        assert rt is not None
        flt = _Filter(
            route.namespace,
            parse_label_selector(query.get("labelSelector", "")),
            parse_field_selector(query.get("fieldSelector", "")),
        )
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        rv_text = query.get("resourceVersion", "")
        since = int(rv_text) if rv_text not in ("", "0") else None
        watch = _Watch(rt, flt, bookmarks, h.connection)
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            # register only once the client has its 200: a watch a test sees as open is one
            # the client is reading, so dropping it cannot be mistaken for a failed request
            if self._register(watch, since):
                self._pump(h, watch, timeout)
            else:
                h.close_connection = True
        except OSError:
            h.close_connection = True
        finally:
            self._unregister(watch)

    def _register(self, watch: _Watch, since: int | None) -> bool:
        """Queue the watch's backlog and make it live; False if it must be dropped now."""
        rt, flt = watch.rt, watch.filter
        with self._lock:
            if self._outage is not None or self._httpd is None:
                return False
            if since is not None and since < self._compacted:
                err = ApiError(
                    410, "Expired", f"too old resource version: {since} ({self._compacted})"
                )
                watch.queue.put(_event_line("ERROR", json.dumps(err.status()).encode()))
                watch.queue.put(_CLOSE)
                return True
            if since is not None and since > self._rv:
                # the watch cache blocks until it has seen `since`, then gives up
                self._written.wait_for(lambda: self._rv >= since, self._fresh_wait)
                if self._outage is not None or self._httpd is None:
                    return False
            if since is not None and since > self._rv:
                status = _TooLargeResourceVersion(since, self._rv).status()
                watch.queue.put(_event_line("ERROR", json.dumps(status).encode()))
                watch.queue.put(_CLOSE)
                return True
            if since is None:
                for key in self._keys(rt):
                    entry = self._objects[rt.plural][key]
                    if flt.matches(entry.obj):
                        watch.queue.put(_event_line("ADDED", entry.full_json))
            else:
                start = bisect.bisect_right(self._history, since, key=lambda e: e.rv)
                for ev in self._history[start:]:
                    if ev.rt is rt and (line := watch.line_for(ev)) is not None:
                        watch.queue.put(line)
            self._watches.add(watch)
            self._watches_changed.notify_all()
            return True

    def _unregister(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _pump(self, h: _Handler, watch: _Watch, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                item: bytes | _Signal = _CLOSE
            else:
                try:
                    wait = _CLIENT_CHECK if remaining is None else min(remaining, _CLIENT_CHECK)
                    item = watch.queue.get(timeout=wait)
                except queue.Empty:
                    if _client_gone(watch.sock):
                        item = _DROP
                    else:
                        continue
            if item is _DROP:
                h.close_connection = True
                return
            if item is _CLOSE:
                self._unregister(watch)  # before the client can see the end of the stream
                h.send_chunk(b"")
                return
            assert isinstance(item, bytes)
            h.send_chunk(item)


def _validate_service_cidr(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> None:
    """The API server's ServiceCIDR validation (``ValidateServiceCIDR`` and, for an update,
    ``ValidateServiceCIDRUpdate``): 422 Invalid naming the field."""
    name = new["metadata"]["name"]

    def invalid(detail: str) -> ApiError:
        return ApiError(
            422, "Invalid", f'ServiceCIDR.networking.k8s.io "{name}" is invalid: {detail}'
        )

    cidrs = (new.get("spec") or {}).get("cidrs") or []
    if not isinstance(cidrs, list) or not cidrs:
        raise invalid("spec.cidrs: Required value: at least one CIDR required")
    if len(cidrs) > 2:
        raise invalid("spec.cidrs: Invalid value: may only hold up to 2 values")
    families = []
    for i, cidr in enumerate(cidrs):
        try:
            families.append(ipaddress.ip_network(str(cidr), strict=False).version)
        except ValueError:
            raise invalid(
                f"spec.cidrs[{i}]: Invalid value: {cidr!r}: must be a valid CIDR value, "
                "(e.g. 10.9.8.0/24 or 2001:db8::/64)"
            ) from None
        if "/" not in str(cidr):
            raise invalid(f"spec.cidrs[{i}]: Invalid value: {cidr!r}: must be a CIDR")
    if len(families) == 2 and families[0] == families[1]:
        raise invalid(
            "spec.cidrs: Invalid value: may specify no more than one IP for each IP family"
        )
    if old is not None:
        before = (old.get("spec") or {}).get("cidrs") or []
        # 1.33+ (k/k#131263): a single-stack ServiceCIDR may become dual-stack, keeping its CIDR
        if cidrs != before and not (len(before) == 1 and len(cidrs) == 2 and cidrs[0] == before[0]):
            raise invalid("spec.cidrs: Invalid value: field is immutable")


_CLIENT_CHECK = 0.5  # seconds between checks that an idle watch's client is still there


def _client_gone(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (a watch client sends nothing while reading)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        # The raw socket's recv, also for a TLS socket (whose own recv refuses flags): an
        # orderly close reads as b"" below the TLS layer too.
        return bool(readable) and socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _ExpiredContinue(ApiError):
    """A continue token older than the compaction point (410, with a fresh token)."""

    def __init__(self, fresh_token: str) -> None:
        super().__init__(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. "
            "You can start a new list without the continue parameter, or use the continue token "
            "in this response to retrieve the remainder of the results.",
        )
        self.fresh_token = fresh_token

    def status(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Status, carrying a fresh continue token as the real server does."""
        return super().status({"continue": self.fresh_token, **(metadata or {})})


class _TooLargeResourceVersion(ApiError):
    """The watch cache's answer to a resourceVersion it has not reached (apiserver's
    ``storage.NewTooLargeResourceVersionError``: a 504 Timeout with a
    ``ResourceVersionTooLarge`` cause)."""

    def __init__(self, requested: int, current: int) -> None:
        super().__init__(
            504, "Timeout", f"Timeout: Too large resource version: {requested}, current: {current}"
        )

    def status(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The Status, with the cause and retry hint the real server sends."""
        status = super().status(metadata)
        status["details"] = {
            "causes": [
                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
            ],
            "retryAfterSeconds": 1,
        }
        return status
