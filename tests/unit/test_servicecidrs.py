"""ServiceCIDR objects -> the cluster's service CIDRs: the handler, discovery and the source,
against FakeApiServer through the real ``kubernetes`` client."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from minikproxy.model.names import IPV4, IPV6
from minikproxy.model.parse import strict_cidr
from minikproxy.sources.kubeapi import ResourceSpec
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.sources.servicecidrs import (
    SERVICE_CIDRS,
    ServiceCIDRSource,
    ServiceCIDRTracker,
    served,
)
from minikproxy.testing.apiserver import FakeApiServer

from ..helpers import wait_for
from .api_objects import service_cidr

pytestmark = pytest.mark.timeout(30)


class Changes:
    """The on_change callback: records every union it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    def __call__(self, cidrs: tuple[str, ...]) -> None:
        with self._lock:
            self.calls.append(cidrs)

    @property
    def last(self) -> tuple[str, ...] | None:
        with self._lock:
            return self.calls[-1] if self.calls else None


# --- the handler ---------------------------------------------------------------------------


def test_the_first_list_is_reported_once_as_a_whole() -> None:
    changes = Changes()
    tracker = ServiceCIDRTracker(changes)
    tracker.on_add(service_cidr("kubernetes", "fd00:96::/108", "10.96.0.0/16"))
    tracker.on_add(service_cidr("extra", "10.1.0.0/24"))
    assert changes.calls == [] and tracker.cidrs == ()  # not before the list is complete
    tracker.on_synced()
    assert changes.calls == [("10.1.0.0/24", "10.96.0.0/16", "fd00:96::/108")]
    assert tracker.family_cidrs(IPV4) == ("10.1.0.0/24", "10.96.0.0/16")
    assert tracker.family_cidrs(IPV6) == ("fd00:96::/108",)


def test_an_empty_first_list_reports_nothing() -> None:
    changes = Changes()
    tracker = ServiceCIDRTracker(changes)
    tracker.on_synced()
    assert changes.calls == []
    tracker.on_add(service_cidr("kubernetes", "10.96.0.0/16"))
    assert changes.calls == [("10.96.0.0/16",)]


def test_changes_report_the_union_only_when_it_changes() -> None:
    changes = Changes()
    tracker = ServiceCIDRTracker(changes)
    first = service_cidr("kubernetes", "10.96.0.0/16")
    tracker.on_add(first)
    tracker.on_synced()
    dual = service_cidr("kubernetes", "10.96.0.0/16", "fd00:96::/108")
    tracker.on_update(first, dual)
    # the same CIDR in a second object, written differently (host bits): same union
    same = service_cidr("copy", "10.96.7.1/16")
    tracker.on_add(same)
    relabelled = {**same, "metadata": {"name": "copy", "labels": {"a": "b"}}}
    tracker.on_update(same, relabelled)
    # a CIDR two objects share stays while one of them does (kube-proxy's set loses it)
    tracker.on_delete(dual)
    tracker.on_delete(relabelled)
    assert changes.calls == [
        ("10.96.0.0/16",),
        ("10.96.0.0/16", "fd00:96::/108"),
        ("10.96.0.0/16",),
        (),
    ]


def test_invalid_cidrs_are_skipped_naming_the_object_and_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    changes = Changes()
    tracker = ServiceCIDRTracker(changes)
    tracker.on_add(service_cidr("odd", "10.96.0.0/33", "fd00::/108"))
    tracker.on_add({**service_cidr("odder"), "spec": {"cidrs": "10.0.0.0/8"}})
    tracker.on_synced()
    assert changes.calls == [("fd00::/108",)]
    assert "ServiceCIDR odd: spec.cidrs[0]: invalid CIDR '10.96.0.0/33'" in caplog.text
    assert "ServiceCIDR odder: spec.cidrs is not a list" in caplog.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.96.0.0/16", ("10.96.0.0/16", IPV4)),
        ("10.96.3.4/16", ("10.96.0.0/16", IPV4)),  # host bits: Go's ParseCIDR too
        ("FD00:96::/108", ("fd00:96::/108", IPV6)),
        ("0.0.0.0/0", ("0.0.0.0/0", IPV4)),
        ("10.96.0.0", None),  # no prefix length
        ("10.96.0.0/255.255.0.0", None),  # netmask form
        ("10.96.0.0/33", None),
        ("fd00::/129", None),
        ("10.96.0.0/+8", None),
        (" 10.96.0.0/16", None),
        ("fe80::/64%eth0", None),
        ("fe80::%eth0/64", None),
        ("", None),
        (None, None),
    ],
)
def test_strict_cidr_is_go_parse_cidr(text: Any, expected: Any) -> None:
    assert strict_cidr(text) == expected


# --- against the fake API server -----------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def old_server() -> Iterator[FakeApiServer]:
    """An API server before 1.33: no networking.k8s.io/v1 ServiceCIDRs."""
    with FakeApiServer(unserved=["servicecidrs"]) as srv:
        yield srv


def client_for(server: FakeApiServer, directory: Path) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    return load_api_client(str(server.write_kubeconfig(directory / "kubeconfig")))


def test_discovery_says_whether_the_resource_is_served(
    server: FakeApiServer, old_server: FakeApiServer, tmp_path: Path
) -> None:
    assert served(client_for(server, tmp_path / "new"))
    assert not served(client_for(old_server, tmp_path / "old"))  # 404 on the group version
    # a served group version that does not list the resource
    elsewhere = ResourceSpec("/apis/discovery.k8s.io/v1", "servicecidrs")
    assert not served(client_for(server, tmp_path / "new"), elsewhere)
    assert [r.path.rstrip("/") for r in server.request_log] == [
        "/apis/networking.k8s.io/v1",
        "/apis/discovery.k8s.io/v1",
    ]
    assert all(r.resource is None for r in server.request_log)  # discovery, not a resource
    with server.outage(), pytest.raises(ApiException) as err:
        served(client_for(server, tmp_path / "new"))
    assert err.value.status == 503


def run_source(source: ServiceCIDRSource) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    return stop, source.start(stop)


def stop_source(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def requests_for_servicecidrs(server: FakeApiServer) -> list[tuple[str, str]]:
    return [
        (r.path.rstrip("/"), r.verb) for r in server.request_log if "networking.k8s.io" in r.path
    ]


def test_the_source_lists_and_watches_when_served(server: FakeApiServer, tmp_path: Path) -> None:
    server.create(service_cidr("kubernetes", "10.96.0.0/16"))
    changes = Changes()
    source = ServiceCIDRSource(client_for(server, tmp_path), changes)
    stop, thread = run_source(source)
    try:
        wait_for(lambda: changes.last == ("10.96.0.0/16",), what="the first list")
        assert server.wait_for_watches(1, "servicecidrs")
        obj = server.get("servicecidrs", "", "kubernetes")
        assert obj is not None
        server.update({**obj, "spec": {"cidrs": ["10.96.0.0/16", "fd00:96::/108"]}})
        wait_for(lambda: changes.last == ("10.96.0.0/16", "fd00:96::/108"), what="the update")
        server.create(service_cidr("extra", "10.100.0.0/24"))
        want = ("10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108")
        wait_for(lambda: changes.last == want, what="the new object")
        server.delete("servicecidrs", "", "kubernetes")
        wait_for(lambda: changes.last == ("10.100.0.0/24",), what="the deletion")
        # a 410 relist reconciles deletions missed meanwhile, as for every resource
        with server.outage():
            server.delete("servicecidrs", "", "extra")
            server.compact()
        wait_for(lambda: changes.last == (), what="the relist")
    finally:
        stop_source(stop, thread)
    assert source.served is True
    paths = requests_for_servicecidrs(server)
    assert paths[:3] == [
        ("/apis/networking.k8s.io/v1", "get"),
        ("/apis/networking.k8s.io/v1/servicecidrs", "list"),
        ("/apis/networking.k8s.io/v1/servicecidrs", "watch"),
    ]
    assert ("/apis/networking.k8s.io/v1", "get") not in paths[1:]  # discovered once
    watches = [r for r in server.request_log if r.verb == "watch"]
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in watches)
    assert all(not r.query.get("labelSelector") for r in watches)  # every object counts


def test_not_served_is_logged_once_and_rechecked_quietly(
    old_server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minikproxy.sources.servicecidrs")
    old_server.create(service_cidr("kubernetes", "10.96.0.0/16"))  # stored, not served
    changes = Changes()
    source = ServiceCIDRSource(client_for(old_server, tmp_path), changes, recheck_interval=0.05)
    stop, thread = run_source(source)
    try:
        wait_for(lambda: len(old_server.request_log) >= 3, what="three discovery readings")
        assert source.served is False and changes.calls == []
        assert {(r.path.rstrip("/"), r.verb) for r in old_server.request_log} == {
            ("/apis/networking.k8s.io/v1", "get")
        }
        assert caplog.text.count("are not served by this API server") == 1
        old_server.set_served("servicecidrs", True)  # the API server was upgraded
        wait_for(lambda: changes.last == ("10.96.0.0/16",), what="the upgrade noticed")
        assert source.served is True
        assert "are now served: watching" in caplog.text
    finally:
        stop_source(stop, thread)


def test_discovery_failures_are_retried_with_backoff(
    server: FakeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.create(service_cidr("kubernetes", "10.96.0.0/16"))
    delays: list[float] = []
    stop = threading.Event()

    def sleep(delay: float) -> None:
        delays.append(delay)
        stop.wait(0.01)

    changes = Changes()
    options = {"backoff_initial": 0.1, "backoff_max": 0.4, "backoff_jitter": 0.0, "sleep": sleep}
    source = ServiceCIDRSource(client_for(server, tmp_path), changes, reflector_options=options)
    server.set_outage(True)
    thread = source.start(stop)
    try:
        wait_for(lambda: len(delays) >= 4, what="four retries")
        assert source.served is None and changes.calls == []
        server.set_outage(False)
        wait_for(lambda: changes.last == ("10.96.0.0/16",), what="the list after the outage")
    finally:
        stop_source(stop, thread)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4]  # doubled, capped
    assert f"discovery of {SERVICE_CIDRS.group_path} failed: HTTP 503" in caplog.text
