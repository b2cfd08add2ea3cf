"""Reflector against FakeApiServer, through the real ``kubernetes`` client."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from minikproxy.sources.kubeapi import (
    ENDPOINT_SLICES,
    SERVICES,
    Reflector,
    ResourceSpec,
    _abort,
    node_spec,
    resource_version_unusable,
)
from minikproxy.sources.kubeclient import KubeConfigError, load_api_client
from minikproxy.testing.apiserver import FakeApiServer

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0


def service(
    name: str, labels: dict[str, str] | None = None, ip: str = "10.96.0.10"
) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def endpoint_slice(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def with_ip(obj: dict[str, Any], ip: str) -> dict[str, Any]:
    return {**obj, "spec": {**obj["spec"], "clusterIP": ip}}


class Recorder:
    """An ObjectHandler recording ("add"|"update"|"delete", name) calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.objects: list[dict[str, Any]] = []
        self.synced = 0
        self._cond = threading.Condition()

    def _note(self, what: str, obj: dict[str, Any]) -> None:
        with self._cond:
            self.calls.append((what, obj["metadata"]["name"]))
            self.objects.append(obj)
            self._cond.notify_all()

    def on_add(self, obj: dict[str, Any]) -> None:
        self._note("add", obj)

    def on_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        assert old["metadata"]["name"] == new["metadata"]["name"]
        self._note("update", new)

    def on_delete(self, obj: dict[str, Any]) -> None:
        self._note("delete", obj)

    def on_synced(self) -> None:
        with self._cond:
            self.synced += 1
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_calls(self, n: int, timeout: float = WAIT) -> bool:
        return self.wait(lambda: len(self.calls) >= n, timeout)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[Any]:
    api_client = load_api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    yield api_client
    api_client.close()


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


Run = Callable[..., tuple[Reflector, Recorder, threading.Thread]]


@pytest.fixture
def run(api: Any, stop: threading.Event) -> Run:
    """Start a fast-retrying Reflector; wait for its first sync."""

    def start(
        spec: ResourceSpec = SERVICES, *, synced: bool = True, **kwargs: Any
    ) -> tuple[Reflector, Recorder, threading.Thread]:
        handler = Recorder()
        options: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.05}
        reflector = Reflector(api, spec, handler, **(options | kwargs))
        thread = reflector.start(stop)
        if synced:
            assert handler.wait(lambda: handler.synced == 1)
        return reflector, handler, thread

    return start


def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll for a state no handler call announces (e.g. a bookmark's resourceVersion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def watch_requests(server: FakeApiServer, plural: str = "services") -> list[dict[str, str]]:
    return [dict(r.query) for r in server.request_log if r.verb == "watch" and r.resource == plural]


# --- list and sync ---------------------------------------------------------------------------


def test_initial_list_then_synced(server: FakeApiServer, run: Run) -> None:
    server.create(service("a"))
    server.create(service("b"))
    server.create(service("claimed", {"service.kubernetes.io/service-proxy-name": "other"}))
    reflector, handler, _ = run()
    assert handler.calls == [("add", "a"), ("add", "b")]
    assert handler.synced == 1 and reflector.has_synced
    assert reflector.last_resource_version == server.resource_version
    # list items are normalised to carry kind/apiVersion like watch objects
    assert {(o["kind"], o["apiVersion"]) for o in handler.objects} == {("Service", "v1")}
    (list_request,) = [r for r in server.request_log if r.verb == "list"]
    assert list_request.query["labelSelector"] == SERVICES.label_selector
    assert server.wait_for_watches(1)
    (watch,) = watch_requests(server)
    assert watch["resourceVersion"] == server.resource_version
    assert watch["allowWatchBookmarks"] == "true"
    assert 300 <= int(watch["timeoutSeconds"]) < 600


def test_synced_fires_for_an_empty_list(server: FakeApiServer, run: Run) -> None:
    reflector, handler, _ = run()
    assert handler.calls == [] and reflector.has_synced


def test_paginated_list(server: FakeApiServer, run: Run) -> None:
    for i in range(5):
        server.create(service(f"s{i}"))
    _, handler, _ = run(page_size=2)
    assert handler.calls == [("add", f"s{i}") for i in range(5)]
    lists = [r.query for r in server.request_log if r.verb == "list"]
    assert [q.get("limit") for q in lists] == ["2", "2", "2"]
    assert [bool(q.get("continue")) for q in lists] == [False, True, True]


def test_headless_slices_are_excluded(server: FakeApiServer, run: Run) -> None:
    server.create(endpoint_slice("web-1", {"kubernetes.io/service-name": "web"}))
    server.create(endpoint_slice("hl-1", {"service.kubernetes.io/headless": ""}))
    _, handler, _ = run(ENDPOINT_SLICES)
    assert handler.calls == [("add", "web-1")]
    server.create(endpoint_slice("hl-2", {"service.kubernetes.io/headless": ""}))
    server.create(endpoint_slice("web-2"))
    assert handler.wait_calls(2)
    assert handler.calls[1:] == [("add", "web-2")]


def test_node_spec_watches_only_this_node(server: FakeApiServer, run: Run) -> None:
    server.create({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"}})
    server.create({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2"}})
    _, handler, _ = run(node_spec("n2"))
    assert handler.calls == [("add", "n2")]


# --- watch -----------------------------------------------------------------------------------


def test_add_update_delete_through_the_watch(server: FakeApiServer, run: Run) -> None:
    _, handler, _ = run()
    a = server.create(service("a"))
    server.update(with_ip(a, "10.96.0.99"))
    server.delete("services", "default", "a")
    server.create(service("claimed", {"service.kubernetes.io/service-proxy-name": "x"}))
    server.create(service("b"))
    assert handler.wait_calls(4)
    assert handler.calls == [("add", "a"), ("update", "a"), ("delete", "a"), ("add", "b")]
    assert handler.objects[1]["spec"]["clusterIP"] == "10.96.0.99"


def test_relabelled_out_of_the_selector_is_a_delete(server: FakeApiServer, run: Run) -> None:
    a = server.create(service("a"))
    _, handler, _ = run()
    claimed = {"service.kubernetes.io/service-proxy-name": "other"}
    server.update({**a, "metadata": {**a["metadata"], "labels": claimed}})
    assert handler.wait_calls(2)
    assert handler.calls == [("add", "a"), ("delete", "a")]


def test_bookmark_advances_resource_version_silently(server: FakeApiServer, run: Run) -> None:
    reflector, handler, _ = run()
    assert server.wait_for_watches(1)
    server.create({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1"}})
    assert reflector.last_resource_version != server.resource_version
    server.send_bookmarks()
    target = server.resource_version
    assert eventually(lambda: reflector.last_resource_version == target)
    assert handler.calls == []


def test_dropped_watch_resumes_without_duplicates(server: FakeApiServer, run: Run) -> None:
    server.create(service("a"))
    reflector, handler, _ = run()
    rv_before_drop = server.create(service("b"))["metadata"]["resourceVersion"]
    assert handler.wait_calls(2)
    # the handler is called before the resourceVersion advances
    assert eventually(lambda: reflector.last_resource_version == rv_before_drop)
    assert server.wait_for_watches(1)
    server.drop_watches()
    server.create(service("c"))
    assert handler.wait_calls(3)
    assert server.wait_for_watches(1)
    server.create(service("d"))
    assert handler.wait_calls(4)
    assert handler.calls == [("add", "a"), ("add", "b"), ("add", "c"), ("add", "d")]
    assert watch_requests(server)[-1]["resourceVersion"] == rv_before_drop
    assert len([r for r in server.request_log if r.verb == "list"]) == 1  # no relist


def test_410_relist_reconciles_changes_made_during_the_gap(server: FakeApiServer, run: Run) -> None:
    a = server.create(service("a"))
    b = server.create(service("b"))
    server.create(service("gone"))
    reflector, handler, _ = run()
    assert server.wait_for_watches(1)
    with server.outage(refuse=True):
        server.delete("services", "default", "gone")
        server.update(with_ip(a, "10.96.0.42"))
        server.create(service("new"))
        server.compact()
    assert handler.wait_calls(6)
    assert handler.calls[:3] == [("add", "a"), ("add", "b"), ("add", "gone")]
    assert sorted(handler.calls[3:]) == [("add", "new"), ("delete", "gone"), ("update", "a")]
    assert handler.synced == 1
    assert len([r for r in server.request_log if r.verb == "list"]) == 2
    assert server.wait_for_watches(1)
    assert reflector.last_resource_version == server.resource_version
    server.delete("services", "default", b["metadata"]["name"])
    assert handler.wait_calls(7)
    assert handler.calls[-1] == ("delete", "b")


def test_resource_version_rolled_back_relists_from_scratch(
    server: FakeApiServer, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """An etcd restore: the store goes back to an older resourceVersion, the watch cache
    answers the reflector's newer one with 504 "Too large resource version"; the reflector
    must list from scratch, not retry that resourceVersion forever."""
    caplog.set_level(logging.INFO, logger="minikproxy")
    server.create(service("a"))
    backup = server.resource_version
    reflector, handler, _ = run()
    server.create(service("undone"))
    assert handler.wait_calls(2)
    assert eventually(lambda: reflector.last_resource_version == server.resource_version)
    server.rollback(backup)  # "undone" never existed; the watches are dropped
    assert handler.wait_calls(3, timeout=15)  # the watch cache waits 3 s before answering
    assert handler.calls[2] == ("delete", "undone")
    assert [r.verb for r in server.request_log].count("list") == 2
    assert reflector.last_resource_version == backup
    assert any(
        "is unusable (504 Timeout: Timeout: Too large resource version" in m
        for m in caplog.messages
    ), caplog.messages
    server.create(service("new"))  # reuses the resourceVersion the reflector had seen
    server.delete("services", "default", "a")
    assert handler.wait_calls(5)
    assert handler.calls[3:] == [("add", "new"), ("delete", "a")]


@pytest.mark.parametrize(
    ("status", "unusable"),
    [
        ({"code": 410, "reason": "Expired", "message": "too old resource version: 1 (5)"}, True),
        ({"code": 410, "reason": "Gone"}, True),  # API servers up to 1.17
        (
            {
                "code": 504,
                "reason": "Timeout",
                "details": {"causes": [{"reason": "ResourceVersionTooLarge"}]},
            },
            True,
        ),
        (  # 1.17.0 to 1.18.5: the cause's message only
            {"code": 504, "details": {"causes": [{"message": "Too large resource version"}]}},
            True,
        ),
        (  # before 1.17: the Status message only
            {
                "code": 504,
                "reason": "Timeout",
                "message": "Too large resource version: 9, current: 5",
            },
            True,
        ),
        ({"code": 504, "reason": "Timeout", "message": "request did not complete"}, False),
        ({"code": 500, "reason": "InternalError", "message": "etcd is down"}, False),
        ("not a status", False),
    ],
)
def test_which_errors_make_the_resource_version_unusable(status: Any, unusable: bool) -> None:
    assert resource_version_unusable(status) is unusable


def test_outage_then_recovery_forgets_nothing(server: FakeApiServer, run: Run) -> None:
    for name in ("a", "b", "c"):
        server.create(service(name))
    _, handler, _ = run()
    assert server.wait_for_watches(1)
    with server.outage():
        server.delete("services", "default", "b")
        server.create(service("d"))
        assert not handler.wait(lambda: len(handler.calls) > 3, timeout=0.2)
    assert handler.wait_calls(5)
    assert handler.calls[3:] == [("delete", "b"), ("add", "d")]
    assert len([r for r in server.request_log if r.verb == "list"]) == 1  # resumed, no relist


def test_server_down_at_startup(server: FakeApiServer, run: Run) -> None:
    server.create(service("a"))
    with server.outage():
        _, handler, _ = run(synced=False)
        assert not handler.wait(lambda: handler.synced > 0, timeout=0.2)
    assert handler.wait(lambda: handler.synced == 1)
    assert handler.calls == [("add", "a")]


def test_stop_interrupts_a_blocked_watch(
    server: FakeApiServer, run: Run, stop: threading.Event
) -> None:
    _, _, thread = run()
    assert server.wait_for_watches(1)
    stop.set()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_abort_unblocks_a_reader_and_tolerates_a_closed_response(server: FakeApiServer) -> None:
    """Stopping races with the reader closing the response: either way, nothing raises."""
    http = urllib3.PoolManager()
    resp = http.request(
        "GET", f"{server.url}/api/v1/services?watch=1", preload_content=False
    )  # fmt: skip
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(resp.read())
        except Exception as err:  # the interrupted read fails (IncompleteRead): expected
            outcome.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    assert server.wait_for_watches(1)
    _abort(resp)
    reader.join(WAIT)
    assert not reader.is_alive() and outcome, "the blocked read was not interrupted"
    resp.close()
    _abort(resp)  # urllib3 raises ValueError from shutdown() once closed
    resp.release_conn()
    _abort(resp)


def test_handler_exceptions_are_logged_not_fatal(
    server: FakeApiServer, api: Any, stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding(Recorder):
        def on_add(self, obj: dict[str, Any]) -> None:
            super().on_add(obj)
            if obj["metadata"]["name"].startswith("boom"):
                raise RuntimeError("handler bug")

    server.create(service("boom"))
    server.create(service("ok"))
    handler = Exploding()
    with caplog.at_level(logging.ERROR, logger="minikproxy.sources.kubeapi"):
        Reflector(api, SERVICES, handler, backoff_initial=0.01).start(stop)
        assert handler.wait(lambda: handler.synced == 1)
        server.create(service("boom-2"))
        server.create(service("after"))
        assert handler.wait_calls(4)
    assert handler.calls == [("add", "boom"), ("add", "ok"), ("add", "boom-2"), ("add", "after")]
    failures = [r for r in caplog.records if "on_add failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
    assert len([r for r in server.request_log if r.verb == "list"]) == 1


def test_unknown_objects_in_watch_events(api: Any) -> None:
    handler = Recorder()
    reflector = Reflector(api, SERVICES, handler)
    obj = {"metadata": {"name": "x", "namespace": "default", "resourceVersion": "7"}}
    reflector._dispatch({"type": "DELETED", "object": obj})  # unknown: ignored
    reflector._dispatch({"type": "MODIFIED", "object": obj})  # unknown: an add
    reflector._dispatch({"type": "ADDED", "object": obj})  # known: an update
    assert handler.calls == [("add", "x"), ("update", "x")]
    assert reflector.last_resource_version == "7"


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_is_capped_and_jittered(server: FakeApiServer, api: Any) -> None:
    stop = threading.Event()
    delays: list[float] = []

    def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 10:
            stop.set()

    reflector = Reflector(
        api,
        SERVICES,
        Recorder(),
        backoff_initial=1.0,
        backoff_max=8.0,
        backoff_jitter=0.5,
        sleep=sleep,
        rng=random.Random(7),
    )
    with server.outage():
        reflector.run(stop)  # returns once sleep() has set stop
    bases = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert all(b * 0.5 <= d <= b for d, b in zip(delays, bases, strict=True)), delays
    assert len(set(delays[3:])) == len(delays[3:])  # capped, yet jittered
    assert not reflector.has_synced


def test_backoff_resets_after_a_healthy_watch(server: FakeApiServer, api: Any) -> None:
    stop = threading.Event()
    delays: list[float] = []
    sleeping = threading.Condition()

    def sleep(delay: float) -> None:
        # Ends the outage from the reflector's own thread: ended from the test thread, the
        # reflector (this sleep returns at once) could fail again before the test gets to it.
        if len(delays) >= 2:
            server.set_outage(False)
        with sleeping:
            delays.append(delay)
            sleeping.notify_all()

    handler = Recorder()
    reflector = Reflector(
        api, SERVICES, handler, backoff_initial=1.0, backoff_jitter=0.0, sleep=sleep
    )
    thread = reflector.start(stop)
    try:
        assert handler.wait(lambda: handler.synced == 1)
        assert server.wait_for_watches(1)
        server.set_outage(True)  # the watch fails three times, then comes back
        with sleeping:
            assert sleeping.wait_for(lambda: len(delays) >= 3, WAIT)
        assert server.wait_for_watches(1)
        server.create(service("a"))  # an event: the watch is healthy
        assert handler.wait_calls(1)
        server.set_outage(True)  # fails once, then comes back
        with sleeping:
            assert sleeping.wait_for(lambda: len(delays) >= 4, WAIT)
        assert server.wait_for_watches(1)
    finally:
        stop.set()
        thread.join(WAIT)
    assert delays == [1.0, 2.0, 4.0, 1.0]
    assert len([r for r in server.request_log if r.verb == "list"]) == 1


# --- kubeconfig ------------------------------------------------------------------------------


def test_load_api_client_sources(
    server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeConfigError, match="no cluster configuration"):
        load_api_client(None)
    with pytest.raises(KubeConfigError, match="no such file"):
        load_api_client(str(tmp_path / "missing"))
    (tmp_path / ".kube").mkdir()
    server.write_kubeconfig(tmp_path / ".kube" / "config")
    assert load_api_client(None).configuration.host == server.url
    other = tmp_path / "env-config"
    other.write_text((tmp_path / ".kube" / "config").read_text().replace(server.url, "http://h:1"))
    monkeypatch.setenv("KUBECONFIG", str(other))
    assert load_api_client(None).configuration.host == "http://h:1"
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    with pytest.raises(KubeConfigError, match="invalid"):
        load_api_client(str(broken))


def test_unsupported_resource_is_rejected(api: Any) -> None:
    with pytest.raises(ValueError, match="unsupported resource"):
        Reflector(api, ResourceSpec("/api/v1", "pods"), Recorder())


def test_describe_is_one_line_naming_the_failure() -> None:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from minikproxy.sources.kubeapi import describe_error as _describe

    assert _describe(ApiException(status=401, reason="Unauthorized")) == "HTTP 401 Unauthorized"
    tls = ApiException(status=0, reason="SSLError\n[SSL: CERTIFICATE_VERIFY_FAILED] failed")
    assert _describe(tls) == "SSLError [SSL: CERTIFICATE_VERIFY_FAILED] failed"
    retries = urllib3.exceptions.MaxRetryError(
        None, "/api/v1/services", urllib3.exceptions.SSLError("certificate\nverify failed")
    )
    assert _describe(retries) == "SSLError: certificate verify failed"
