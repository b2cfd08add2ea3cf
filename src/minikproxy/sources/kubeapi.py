"""List-then-watch of API resources with client-go reflector semantics, as raw JSON dicts.

A :class:`Reflector` lists a resource (paginated), delivers the differences against its own
cache to an :class:`ObjectHandler`, calls ``on_synced`` once, then watches from the list's
resourceVersion. Bookmarks advance the resourceVersion silently. An error saying the
resourceVersion is unusable (``410 Gone``: compacted; the watch cache's ``504`` "Too large
resource version": the store went back in time, e.g. an etcd restore) triggers a list from
scratch reconciled against the cache, as client-go's reflector does, so deletions that
happened while the watch was down (or were undone by the restore) still reach the handler.
Any other failure (dropped stream, refused connection, 5xx) resumes the watch from the last
resourceVersion after a capped, jittered exponential backoff; an outage never makes the
handler forget objects.

The official ``kubernetes`` client does the HTTP (configuration, auth, TLS), but is asked for
raw responses (``_preload_content=False``): bodies are decoded with :func:`json.loads` and
watch streams split into lines here, so no generated model objects are ever built.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from minikproxy.gcutil import gc_paused
from minikproxy.sources.kubeclient import list_function

logger = logging.getLogger(__name__)

# kube-proxy builds one selector for its whole informer factory (cmd/kube-proxy/app/server.go):
# objects of services claimed by another proxy, and headless services' endpoints, are not
# watched at all. The endpointslice controller copies a Service's labels onto its slices.
KUBE_PROXY_LABEL_SELECTOR = (
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
)


class ObjectHandler(Protocol):
    """Receives a resource's objects. Objects are shared with the cache: do not mutate them."""

    def on_add(self, obj: dict[str, Any]) -> None:
        """A new object (or one first seen after a relist)."""

    def on_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """An object changed (``old`` is the previous state this handler saw)."""

    def on_delete(self, obj: dict[str, Any]) -> None:
        """An object is gone (its final state, or the last known one after a relist)."""

    def on_synced(self) -> None:
        """Called once, after the first complete list has been delivered."""


@dataclass(frozen=True)
class ResourceSpec:
    """What to watch: a group/version path, a plural, and server-side selectors."""

    group_path: str  # e.g. "/api/v1" or "/apis/discovery.k8s.io/v1"
    plural: str  # "services", "endpointslices", "nodes", "endpoints"
    label_selector: str = ""
    field_selector: str = ""


SERVICES = ResourceSpec("/api/v1", "services", label_selector=KUBE_PROXY_LABEL_SELECTOR)
ENDPOINT_SLICES = ResourceSpec(
    "/apis/discovery.k8s.io/v1", "endpointslices", label_selector=KUBE_PROXY_LABEL_SELECTOR
)
LEGACY_ENDPOINTS = ResourceSpec("/api/v1", "endpoints", label_selector=KUBE_PROXY_LABEL_SELECTOR)


def node_spec(node_name: str) -> ResourceSpec:
    """This node's Node object only (``fieldSelector=metadata.name=<node>``)."""
    return ResourceSpec("/api/v1", "nodes", field_selector=f"metadata.name={node_name}")


def object_key(obj: dict[str, Any]) -> str:
    """``namespace/name`` (just ``name`` for cluster-scoped objects), like client-go."""
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    name = meta.get("name", "")
    return f"{namespace}/{name}" if namespace else str(name)


def _resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class _Expired(Exception):
    """The requested resourceVersion cannot be used (410 Gone, or too large): relist."""


_TOO_LARGE = "Too large resource version"


def resource_version_unusable(status: Any) -> bool:
    """Whether an API ``Status`` says the requested resourceVersion cannot be served.

    Like client-go's ``isExpiredError`` / ``isTooLargeResourceVersionError``: 410 (reason
    ``Expired`` or ``Gone``), or a ``Timeout`` with the ``ResourceVersionTooLarge`` cause (or,
    from API servers before 1.18.6, only its message).
    """
    if not isinstance(status, dict):
        return False
    if status.get("code") == 410 or status.get("reason") in ("Expired", "Gone"):
        return True
    details = status.get("details") or {}
    causes = (details.get("causes") or []) if isinstance(details, dict) else []
    for cause in causes:
        if isinstance(cause, dict) and (
            cause.get("reason") == "ResourceVersionTooLarge" or cause.get("message") == _TOO_LARGE
        ):
            return True
    timeout = status.get("code") == 504 or status.get("reason") == "Timeout"
    return timeout and _TOO_LARGE in str(status.get("message", ""))


def _error_status(err: BaseException) -> dict[str, Any]:
    """The ``Status`` of a failed request (an ``ApiException``'s body), or {}."""
    status: dict[str, Any] = {"code": getattr(err, "status", None)}
    body = getattr(err, "body", None)
    if body:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return status
        if isinstance(parsed, dict):
            status.update(parsed)
    return status


class WatchError(Exception):
    """The server sent an ERROR event other than 410 Expired."""


_QUICK_EMPTY_WATCH = 1.0  # seconds: a watch ending this fast with no events counts as failed


class Reflector:
    """Keeps an :class:`ObjectHandler` in step with one resource (see the module docstring).

    ``sleep`` is called with each backoff delay (default: wait on the stop event), and ``rng``
    draws the jitter (default: a fresh :class:`random.Random`); both exist for tests. The watch
    ``timeoutSeconds`` is drawn from ``[watch_timeout_seconds, 2*watch_timeout_seconds)`` to
    spread reconnections, as client-go does. The backoff delay after ``n`` consecutive failures
    is ``min(backoff_max, backoff_initial * 2**n)`` reduced by up to ``backoff_jitter`` (a
    fraction) at random; it resets after a watch that delivered events.
    """

    def __init__(
        self,
        api_client: Any,
        spec: ResourceSpec,
        handler: ObjectHandler,
        *,
        page_size: int = 500,
        backoff_initial: float = 0.8,
        backoff_max: float = 30.0,
        backoff_jitter: float = 0.5,
        watch_timeout_seconds: int = 300,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        name: str | None = None,
    ) -> None:
        if not 0.0 <= backoff_jitter < 1.0:
            raise ValueError("backoff_jitter must be in [0, 1)")
        self._list_fn = list_function(api_client, spec.group_path, spec.plural)
        self._spec = spec
        self._handler = handler
        self._page_size = page_size
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff_jitter = backoff_jitter
        self._watch_timeout = watch_timeout_seconds
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.name = name or spec.plural
        self._cache: dict[str, dict[str, Any]] = {}
        self._rv = ""
        self._synced = False
        self._failures = 0
        self._response: Any = None  # the response being read, so stop can interrupt it
        self._response_lock = threading.Lock()

    @property
    def last_resource_version(self) -> str:
        """The resourceVersion the next watch resumes from ("" before the first list)."""
        return self._rv

    @property
    def has_synced(self) -> bool:
        """Whether the first complete list has been delivered."""
        return self._synced

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a daemon thread until ``stop`` is set; return the thread."""
        thread = threading.Thread(target=self.run, args=(stop,), name=f"reflector-{self.name}")
        thread.daemon = True
        thread.start()
        return thread

    def run(self, stop: threading.Event) -> None:
        """List and watch until ``stop`` is set (setting it interrupts a blocked read)."""
        interrupter = threading.Thread(
            target=self._interrupt_when, args=(stop,), name=f"reflector-{self.name}-stop"
        )
        interrupter.daemon = True
        interrupter.start()
        sleep = self._sleep or stop.wait
        need_list = True
        while not stop.is_set():
            try:
                if need_list:
                    self._list_and_reconcile(stop)
                    need_list = False
                    continue
                need_list = self._watch(stop)
            except Exception as err:
                if stop.is_set():
                    break
                delay = self._next_delay()
                logger.warning(
                    "%s: %s failed: %s; retrying in %.2fs",
                    self.name,
                    "list" if need_list else "watch",
                    describe_error(err),
                    delay,
                )
                sleep(delay)

    # list --------------------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._spec.label_selector:
            kwargs["label_selector"] = self._spec.label_selector
        if self._spec.field_selector:
            kwargs["field_selector"] = self._spec.field_selector
        return kwargs

    def _list_page(self, limit: int, token: str) -> dict[str, Any]:
        kwargs = self._selectors()
        if limit:
            kwargs["limit"] = limit
        if token:
            kwargs["_continue"] = token
        resp = self._list_fn(
            _preload_content=False,
            _request_timeout=(self._connect_timeout, self._request_timeout),
            **kwargs,
        )
        self._set_response(resp)
        try:
            data = resp.read()
        finally:
            self._set_response(None)
            resp.release_conn()
        body: dict[str, Any] = _loads(data)
        return body

    def _list_all(self, stop: threading.Event) -> tuple[list[dict[str, Any]], str]:
        """All objects (following ``continue``) and the list's resourceVersion.

        Like client-go's pager, an expired continue token restarts the list, and a second one
        falls back to a single unpaginated list.
        """
        limit, token, restarts = self._page_size, "", 0
        items: list[dict[str, Any]] = []
        while True:
            try:
                body = self._list_page(limit, token)
            except Exception as err:
                if not token or getattr(err, "status", None) != 410:
                    raise
                restarts += 1
                logger.info("%s: continue token expired; restarting the list", self.name)
                items, token = [], ""
                if restarts > 1:
                    limit = 0
                continue
            meta = body.get("metadata") or {}
            kind = str(body.get("kind", "")).removesuffix("List")
            api_version = body.get("apiVersion", "")
            for item in body.get("items") or []:
                # list items carry no kind/apiVersion; watch objects do: make them alike
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", api_version)
                items.append(item)
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion", ""))

    def _list_and_reconcile(self, stop: threading.Event) -> None:
        items, rv = self._list_all(stop)
        if stop.is_set():
            return
        old, new = self._cache, {object_key(o): o for o in items}
        self._cache = new
        added = updated = deleted = 0
        for key, obj in new.items():
            prev = old.get(key)
            if prev is None:
                added += 1
                self._call(self._handler.on_add, obj)
            elif _resource_version(prev) != _resource_version(obj):
                updated += 1
                self._call(self._handler.on_update, prev, obj)
        for key, prev in old.items():
            if key not in new:
                deleted += 1
                self._call(self._handler.on_delete, prev)
        self._rv = rv
        self._failures = 0
        logger.info(
            "%s: listed %d objects at resourceVersion %s (%d added, %d updated, %d deleted)",
            self.name,
            len(new),
            rv,
            added,
            updated,
            deleted,
        )
        if not self._synced:
            self._synced = True
            self._call(self._handler.on_synced)

    # watch -------------------------------------------------------------------------------

    def _watch(self, stop: threading.Event) -> bool:
        """Watch until the stream ends; return True if a relist is needed (see
        :func:`resource_version_unusable`)."""
        timeout = int(self._watch_timeout * (1.0 + self._rng.random()))
        started = time.monotonic()
        try:
            resp = self._list_fn(
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=self._rv,
                timeout_seconds=timeout,
                _preload_content=False,
                _request_timeout=(self._connect_timeout, timeout + 30),
                **self._selectors(),
            )
        except Exception as err:
            status = _error_status(err)
            if resource_version_unusable(status):
                self._log_unusable(status)
                return True
            raise
        self._set_response(resp)
        events = 0
        try:
            if stop.is_set():
                return False
            pending = b""
            for chunk in resp.stream(None):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        self._dispatch(orjson.loads(line))
                        events += 1
                        self._failures = 0
        except _Expired as expired:
            self._log_unusable(expired.args[0])
            return True
        finally:
            self._set_response(None)
            resp.close()
            resp.release_conn()
        if events == 0 and time.monotonic() - started < _QUICK_EMPTY_WATCH and not stop.is_set():
            raise WatchError("watch ended immediately without events")
        logger.debug("%s: watch ended after %d events; resuming", self.name, events)
        return False

    def _dispatch(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        obj: dict[str, Any] = event.get("object") or {}
        if etype == "ERROR":
            if resource_version_unusable(obj):
                raise _Expired(obj)
            raise WatchError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        rv = _resource_version(obj)
        if etype in ("ADDED", "MODIFIED"):
            key = object_key(obj)
            prev = self._cache.get(key)
            self._cache[key] = obj
            if prev is None:
                self._call(self._handler.on_add, obj)
            else:
                self._call(self._handler.on_update, prev, obj)
        elif etype == "DELETED":
            if self._cache.pop(object_key(obj), None) is not None:
                self._call(self._handler.on_delete, obj)
        elif etype != "BOOKMARK":
            logger.warning("%s: ignoring watch event of unknown type %r", self.name, etype)
            return
        if rv:
            self._rv = rv

    # helpers -----------------------------------------------------------------------------

    def _log_unusable(self, status: dict[str, Any]) -> None:
        logger.info(
            "%s: resourceVersion %s is unusable (%s %s: %s); listing from scratch",
            self.name,
            self._rv,
            status.get("code"),
            status.get("reason", ""),
            status.get("message", ""),
        )

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("%s: handler %s failed", self.name, getattr(fn, "__name__", fn))

    def _next_delay(self) -> float:
        base = min(self._backoff_max, self._backoff_initial * 2.0 ** min(self._failures, 60))
        self._failures += 1
        return base * (1.0 - self._backoff_jitter * self._rng.random())

    def _set_response(self, resp: Any) -> None:
        with self._response_lock:
            self._response = resp

    def _interrupt_when(self, stop: threading.Event) -> None:
        stop.wait()
        with self._response_lock:
            resp = self._response
        if resp is not None:
            _abort(resp)


def _loads(data: bytes) -> Any:
    """Parse JSON (orjson: ~3x faster than ``json`` on list pages) with the cyclic GC paused.

    A list page builds ~100k small containers; letting the collector walk them again and again
    while they are created triples the cost of parsing (and the objects are acyclic anyway).
    The GC is left disabled if someone else disabled it meanwhile, and vice versa: at worst a
    concurrent parse runs with the GC on, which is only slower.
    """
    with gc_paused():
        return orjson.loads(data)


def _abort(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response) by shutting its socket down."""
    try:
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:  # urllib3 >= 2.3
            shutdown()
            return
        sock = getattr(getattr(resp, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError, RuntimeError):
        pass  # urllib3 raises the latter two once the response is closed or released: no read


def describe_error(err: BaseException) -> str:
    """One line: the HTTP status, or what broke the connection (TLS, refused, ...)."""
    status = getattr(err, "status", None)
    reason = " ".join(str(getattr(err, "reason", "") or "").split())
    if isinstance(status, int) and status > 0:
        return f"HTTP {status} {reason}".strip()
    if isinstance(status, int):  # the client's ApiException(status=0): no HTTP response
        return reason or type(err).__name__
    inner = getattr(err, "reason", None)  # urllib3's MaxRetryError: the last failure
    if isinstance(inner, BaseException):
        err = inner
    return " ".join(f"{type(err).__name__}: {err}".split())
