"""FakeApiServer, driven through the official ``kubernetes`` client (never a mocked one)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from minikproxy.testing.apiserver import ApiError, FakeApiServer, parse_label_selector
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(30)


def service(name: str, ns: str = "default", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "TCP"}]},
    }


def node(name: str) -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name}}


def endpoint_slice(name: str, svc: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc, **(labels or {})},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    cfg = client.Configuration()
    config.load_kube_config(
        config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=cfg,
    )
    with client.ApiClient(cfg) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def raw_list(core: client.CoreV1Api, **kwargs: Any) -> dict[str, Any]:
    resp = core.list_service_for_all_namespaces(_preload_content=False, **kwargs)
    body: dict[str, Any] = json.loads(resp.data)
    return body


def names(items: list[Any]) -> list[str]:
    return [i.metadata.name for i in items]


class StreamThread(threading.Thread):
    """Consume a ``Watch().stream`` in the background, recording events and how it ended."""

    def __init__(self, fn: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.watch = watch.Watch()
        self.fn, self.kwargs = fn, kwargs
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def run(self) -> None:
        try:
            for ev in self.watch.stream(self.fn, **self.kwargs):
                with self._cond:
                    self.events.append(ev)
                    self._cond.notify_all()
        except BaseException as err:
            self.error = err

    def wait_events(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= n, timeout)

    def kinds(self) -> list[tuple[str, str]]:
        return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in self.events]


# --- list ----------------------------------------------------------------------------------


def test_list_is_a_typed_list_whose_items_omit_kind(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    created = server.create(service("web"))
    body = raw_list(core)
    assert body["kind"] == "ServiceList"
    assert body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == server.resource_version
    (item,) = body["items"]
    assert "kind" not in item and "apiVersion" not in item
    assert item["metadata"]["uid"] == created["metadata"]["uid"]
    assert item["metadata"]["creationTimestamp"].endswith("Z")
    # the generated model round-trips too
    assert names(core.list_service_for_all_namespaces().items) == ["web"]


def test_resource_version_is_one_global_counter(server: FakeApiServer) -> None:
    a = server.create(service("a"))
    n = server.create(node("n1"))
    b = server.update({**a, "spec": {"clusterIP": "10.96.0.11"}})
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, n, b)]
    assert rvs == [rvs[0], rvs[0] + 1, rvs[0] + 2]
    assert b["metadata"]["uid"] == a["metadata"]["uid"]
    deleted = server.delete("services", "default", "a")
    assert int(deleted["metadata"]["resourceVersion"]) == rvs[0] + 3
    assert server.get("services", "default", "a") is None


def test_update_with_stale_resource_version_conflicts(server: FakeApiServer) -> None:
    a = server.create(service("a"))
    server.update(a)
    with pytest.raises(ApiError) as err:
        server.update(a)
    assert err.value.code == 409


def test_pagination_is_a_consistent_snapshot(server: FakeApiServer, core: client.CoreV1Api) -> None:
    for i in range(7):
        server.create(service(f"s{i}"))
    first = core.list_service_for_all_namespaces(limit=3)
    assert names(first.items) == ["s0", "s1", "s2"]
    snapshot_rv = first.metadata.resource_version
    server.delete("services", "default", "s5")  # still in the snapshot
    server.create(service("s9"))  # not in the snapshot
    seen = names(first.items)
    token = first.metadata._continue
    pages = 1
    while token:
        page = core.list_service_for_all_namespaces(limit=3, _continue=token)
        assert page.metadata.resource_version == snapshot_rv
        seen += names(page.items)
        token = page.metadata._continue
        pages += 1
    assert seen == [f"s{i}" for i in range(7)]
    assert pages == 3
    assert names(core.list_service_for_all_namespaces().items)[-2:] == ["s6", "s9"]


def test_expired_continue_is_410(server: FakeApiServer, core: client.CoreV1Api) -> None:
    for i in range(4):
        server.create(service(f"s{i}"))
    first = core.list_service_for_all_namespaces(limit=2)
    server.create(service("late"))
    server.compact()
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    assert err.value.status == 410
    status = json.loads(err.value.body)
    assert status["reason"] == "Expired" and status["metadata"]["continue"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", ["a", "b", "c", "d"]),
        ("tier", ["a", "b", "c"]),
        ("!tier", ["d"]),
        ("tier=web", ["a"]),
        ("tier==web", ["a"]),
        ("tier!=web", ["b", "c", "d"]),
        ("tier in (web, db)", ["a", "b"]),
        ("tier notin (web,db)", ["c", "d"]),
        ("tier,env=prod", ["a", "c"]),
        ("!service.kubernetes.io/service-proxy-name", ["a", "b", "c"]),
    ],
)
def test_label_selectors(
    server: FakeApiServer, core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    server.create(service("a", labels={"tier": "web", "env": "prod"}))
    server.create(service("b", labels={"tier": "db"}))
    server.create(service("c", labels={"tier": "cache", "env": "prod"}))
    server.create(service("d", labels={"service.kubernetes.io/service-proxy-name": "other"}))
    got = core.list_service_for_all_namespaces(label_selector=selector)
    assert names(got.items) == expected


def test_selector_paging_and_invalid_selector(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    for i in range(6):
        server.create(service(f"s{i}", labels={"odd": str(i % 2)}))
    page = core.list_service_for_all_namespaces(label_selector="odd=1", limit=2)
    assert names(page.items) == ["s1", "s3"]
    rest = core.list_service_for_all_namespaces(
        label_selector="odd=1", limit=2, _continue=page.metadata._continue
    )
    assert names(rest.items) == ["s5"] and rest.metadata._continue is None
    with pytest.raises(ApiException) as err:
        core.list_service_for_all_namespaces(label_selector="tier in web")
    assert err.value.status == 400
    with pytest.raises(ApiError):
        parse_label_selector("=x")


def test_namespaced_paths_field_selectors_and_get(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("a", ns="one"))
    server.create(service("a", ns="two"))
    server.create(service("b", ns="two"))
    server.create(node("n1"))
    server.create(node("n2"))
    assert names(core.list_namespaced_service("two").items) == ["a", "b"]
    by_ns = core.list_service_for_all_namespaces(field_selector="metadata.namespace=one")
    assert [(s.metadata.namespace, s.metadata.name) for s in by_ns.items] == [("one", "a")]
    assert names(core.list_node(field_selector="metadata.name=n2").items) == ["n2"]
    assert core.read_node("n1").metadata.name == "n1"
    assert core.read_namespaced_service("b", "two").metadata.namespace == "two"
    with pytest.raises(ApiException) as err:
        core.read_node("missing")
    assert err.value.status == 404
    with pytest.raises(ApiException) as err:
        core.list_node(field_selector="spec.unschedulable=true")
    assert err.value.status == 400


def test_endpointslices_and_http_writes(server: FakeApiServer, api: client.ApiClient) -> None:
    discovery = client.DiscoveryV1Api(api)
    server.create(endpoint_slice("web-abc", "web"))
    got = discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=web"
    )
    assert names(got.items) == ["web-abc"]
    core = client.CoreV1Api(api)
    core.create_namespaced_service("default", service("posted"))
    assert server.get("services", "default", "posted") is not None
    with pytest.raises(ApiException) as err:
        core.create_namespaced_service("default", service("posted"))
    assert err.value.status == 409
    core.delete_namespaced_service("posted", "default")
    assert server.get("services", "default", "posted") is None


def test_events_create_and_patch_are_recorded(server: FakeApiServer, api: client.ApiClient) -> None:
    events = client.EventsV1Api(api)
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "node1.17a", "namespace": "default"},
        "eventTime": "2024-01-01T00:00:00.000000Z",
        "reason": "Starting",
        "note": "Starting minikproxy.",
        "type": "Normal",
        "action": "StartKubeProxy",
        "reportingController": "kube-proxy",
        "reportingInstance": "kube-proxy-node1",
    }
    events.create_namespaced_event("default", body)
    series = {"count": 2, "lastObservedTime": "2024-01-01T00:00:05.000000Z"}
    events.patch_namespaced_event("node1.17a", "default", {"series": series})
    (stored,) = server.objects("events")
    assert stored["series"] == series and stored["reason"] == "Starting"
    with pytest.raises(ApiException) as err:
        events.list_namespaced_event("default")
    assert err.value.status == 405
    verbs = [(r.group, r.resource, r.verb) for r in server.request_log]
    assert verbs == [
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
        ("events.k8s.io", "events", "list"),
    ]


def test_request_log_records_rbac_verbs(server: FakeApiServer, core: client.CoreV1Api) -> None:
    server.create(node("n1"))
    core.list_service_for_all_namespaces(label_selector="x")
    core.read_node("n1")
    stream = StreamThread(core.list_node, resource_version="0", timeout_seconds=30)
    stream.start()
    assert stream.wait_events(1)
    server.drop_watches()
    stream.join(5)
    log = server.request_log
    assert [(r.method, r.resource, r.verb, r.name) for r in log] == [
        ("GET", "services", "list", None),
        ("GET", "nodes", "get", "n1"),
        ("GET", "nodes", "watch", None),
    ]
    assert log[0].query == {"labelSelector": "x"} and log[0].group == ""
    assert log[2].query["resourceVersion"] == "0"


def test_version_and_discovery(server: FakeApiServer, api: client.ApiClient) -> None:
    assert client.VersionApi(api).get_code().git_version.startswith("v1.33")
    groups = client.ApisApi(api).get_api_versions()
    assert {g.name for g in groups.groups} == {
        "discovery.k8s.io",
        "events.k8s.io",
        "networking.k8s.io",
    }
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    resources = client.DiscoveryV1Api(api).get_api_resources()
    assert [r.name for r in resources.resources] == ["endpointslices"]


# --- ServiceCIDRs (networking.k8s.io/v1, cluster-scoped) -------------------------------------


def service_cidr(name: str, *cidrs: str) -> dict[str, Any]:
    return {
        "kind": "ServiceCIDR",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }


def test_servicecidrs_discovery_lists_a_cluster_scoped_list_watch_resource(
    api: client.ApiClient,
) -> None:
    (group,) = [
        g for g in client.ApisApi(api).get_api_versions().groups if g.name == "networking.k8s.io"
    ]
    assert group.preferred_version.group_version == "networking.k8s.io/v1"
    (resource,) = client.NetworkingV1Api(api).get_api_resources().resources
    assert (resource.name, resource.kind, resource.namespaced) == (
        "servicecidrs",
        "ServiceCIDR",
        False,
    )
    assert resource.singular_name == "servicecidr"
    assert {"list", "watch"} <= set(resource.verbs)


def test_servicecidrs_list_and_watch_share_the_global_resource_version(
    server: FakeApiServer, api: client.ApiClient
) -> None:
    networking = client.NetworkingV1Api(api)
    server.create(service("web"))
    created = networking.create_service_cidr(
        client.V1ServiceCIDR(
            metadata=client.V1ObjectMeta(name="kubernetes"),
            spec=client.V1ServiceCIDRSpec(cidrs=["10.96.0.0/16"]),
        )
    )
    assert created.metadata.namespace is None  # cluster-scoped
    listed = networking.list_service_cidr()
    assert names(listed.items) == ["kubernetes"]
    assert listed.items[0].spec.cidrs == ["10.96.0.0/16"]
    assert listed.metadata.resource_version == server.resource_version
    rv = server.resource_version
    stream = StreamThread(networking.list_service_cidr, resource_version=rv, timeout_seconds=30)
    stream.start()
    assert server.wait_for_watches(1, "servicecidrs")
    extra = server.create(service_cidr("extra", "10.100.0.0/16"))
    server.update({**extra, "spec": {"cidrs": ["10.100.0.0/16", "fd00:100::/108"]}})
    server.create(service("other"))  # not a ServiceCIDR: not on this watch
    server.delete("servicecidrs", "", "extra")
    assert stream.wait_events(3)
    server.drop_watches()
    stream.join(5)
    assert stream.kinds() == [("ADDED", "extra"), ("MODIFIED", "extra"), ("DELETED", "extra")]
    assert stream.events[1]["object"].spec.cidrs == ["10.100.0.0/16", "fd00:100::/108"]
    rvs = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in stream.events]
    assert rvs == sorted(rvs) and rvs[0] == int(rv) + 1
    assert [(r.group, r.resource, r.verb) for r in server.request_log] == [
        ("networking.k8s.io", "servicecidrs", "create"),
        ("networking.k8s.io", "servicecidrs", "list"),
        ("networking.k8s.io", "servicecidrs", "watch"),
    ]


@pytest.mark.parametrize(
    ("cidrs", "message"),
    [
        ([], "spec.cidrs: Required value"),
        (["10.96.0.0/16", "10.97.0.0/16"], "no more than one IP for each IP family"),
        (["10.96.0.0/16", "fd00::/108", "10.97.0.0/16"], "may only hold up to 2 values"),
        (["10.96.0.0/33"], "spec.cidrs[0]: Invalid value"),
        (["10.96.0.1"], "spec.cidrs[0]: Invalid value"),
    ],
)
def test_servicecidr_writes_are_validated(
    server: FakeApiServer, cidrs: list[str], message: str
) -> None:
    with pytest.raises(ApiError) as err:
        server.create(service_cidr("bad", *cidrs))
    assert err.value.code == 422 and message in err.value.message


def test_servicecidr_cidrs_are_immutable_but_may_become_dual_stack(server: FakeApiServer) -> None:
    obj = server.create(service_cidr("c", "10.96.0.0/16"))
    for cidrs in (["10.97.0.0/16"], ["fd00::/108", "10.96.0.0/16"]):
        with pytest.raises(ApiError, match="field is immutable"):
            server.update({**obj, "spec": {"cidrs": cidrs}})
    dual = server.update({**obj, "spec": {"cidrs": ["10.96.0.0/16", "fd00::/108"]}})
    with pytest.raises(ApiError, match="field is immutable"):
        server.update({**dual, "spec": {"cidrs": ["10.96.0.0/16"]}})


def test_an_older_server_does_not_serve_servicecidrs(tmp_path: Path) -> None:
    with FakeApiServer(unserved=["servicecidrs"]) as server:
        cfg = client.Configuration()
        config.load_kube_config(
            config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig")),
            client_configuration=cfg,
        )
        with client.ApiClient(cfg) as api:
            assert client.VersionApi(api).get_code().git_version.startswith("v1.32")
            groups = client.ApisApi(api).get_api_versions().groups
            assert "networking.k8s.io" not in {g.name for g in groups}
            networking = client.NetworkingV1Api(api)
            for call in (networking.get_api_resources, networking.list_service_cidr):
                with pytest.raises(ApiException) as err:
                    call()
                assert err.value.status == 404
            assert json.loads(err.value.body)["reason"] == "NotFound"
            # an upgraded API server serves them, and the objects another one stored
            server.create(service_cidr("kubernetes", "10.96.0.0/16"))
            server.set_served("servicecidrs", True)
            assert names(networking.list_service_cidr().items) == ["kubernetes"]
            stream = StreamThread(networking.list_service_cidr, timeout_seconds=30)
            stream.start()
            assert stream.wait_events(1)
            server.set_served("servicecidrs", False)  # and a downgrade drops its watches
            stream.join(5)
            assert not stream.is_alive()
            assert not server.served("servicecidrs")


# --- watch ---------------------------------------------------------------------------------


def test_watch_streams_changes_after_resource_version(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("before"))
    rv = server.resource_version
    stream = StreamThread(
        core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
    )
    stream.start()
    assert server.wait_for_watches(1)
    a = server.create(service("a"))
    server.update({**a, "metadata": {**a["metadata"], "labels": {"x": "y"}}})
    server.delete("services", "default", "a")
    server.create(node("unrelated"))
    assert stream.wait_events(3)
    server.drop_watches()
    stream.join(5)
    assert stream.kinds() == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert stream.events[0]["object"].kind == "Service"  # objects carry kind/apiVersion
    rvs = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in stream.events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)


def test_watch_from_old_version_replays_history(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    rv = server.resource_version
    server.create(service("a"))
    server.delete("services", "default", "a")
    stream = StreamThread(
        core.list_service_for_all_namespaces, resource_version=rv, timeout_seconds=30
    )
    stream.start()
    assert stream.wait_events(2)
    server.drop_watches()
    stream.join(5)
    assert stream.kinds() == [("ADDED", "a"), ("DELETED", "a")]


def test_watch_from_zero_sends_synthetic_adds(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("a"))
    server.create(service("b"))
    server.delete("services", "default", "b")
    stream = StreamThread(
        core.list_service_for_all_namespaces, resource_version="0", timeout_seconds=30
    )
    stream.start()
    assert server.wait_for_watches(1)
    server.create(service("c"))
    assert stream.wait_events(2)
    server.drop_watches()
    stream.join(5)
    assert stream.kinds() == [("ADDED", "a"), ("ADDED", "c")]


def test_watch_selector_transitions_become_added_and_deleted(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    a = server.create(service("a", labels={"tier": "web"}))
    stream = StreamThread(
        core.list_service_for_all_namespaces,
        resource_version=server.resource_version,
        label_selector="tier=web",
        timeout_seconds=30,
    )
    stream.start()
    assert server.wait_for_watches(1)
    out = server.update({**a, "metadata": {**a["metadata"], "labels": {"tier": "db"}}})
    server.update({**out, "metadata": {**out["metadata"], "labels": {"tier": "web"}}})
    server.create(service("b", labels={"tier": "db"}))
    assert stream.wait_events(2)
    server.drop_watches()
    stream.join(5)
    assert stream.kinds() == [("DELETED", "a"), ("ADDED", "a")]
    deleted = stream.events[0]["raw_object"]
    assert deleted["metadata"]["labels"] == {"tier": "web"}  # the last state that matched
    assert deleted["metadata"]["resourceVersion"] == out["metadata"]["resourceVersion"]


def test_bookmarks_only_when_allowed(server: FakeApiServer, core: client.CoreV1Api) -> None:
    with_bm = StreamThread(
        core.list_service_for_all_namespaces,
        resource_version=server.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    without = StreamThread(
        core.list_service_for_all_namespaces,
        resource_version=server.resource_version,
        timeout_seconds=30,
    )
    with_bm.start()
    without.start()
    assert server.wait_for_watches(2)
    server.create(node("bump"))  # another kind moves the global RV
    assert server.send_bookmarks() == 1
    assert with_bm.wait_events(1)
    server.drop_watches()
    with_bm.join(5)
    without.join(5)
    (bookmark,) = with_bm.events
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["raw_object"] == {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": server.resource_version},
    }
    assert without.events == []


def test_periodic_bookmarks() -> None:
    with FakeApiServer(bookmark_interval=0.05) as srv:
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=5))
        resp = http.request(
            "GET",
            f"{srv.url}/api/v1/nodes?watch=1&allowWatchBookmarks=true&timeoutSeconds=30",
            preload_content=False,
        )
        data = b""
        for chunk in resp.stream(None):  # until two events, however slowly the ticks come
            data += chunk
            if data.count(b"\n") >= 2:
                break
        resp.close()
    lines = [json.loads(line) for line in data.splitlines()]
    assert len(lines) >= 2 and {e["type"] for e in lines} == {"BOOKMARK"}


def test_timeout_seconds_ends_the_stream_cleanly(server: FakeApiServer) -> None:
    http = urllib3.PoolManager()
    resp = http.request(
        "GET", f"{server.url}/api/v1/services?watch=true&timeoutSeconds=0.1", preload_content=False
    )
    assert resp.status == 200
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.data == b""  # no events, and a terminating chunk (no ProtocolError)
    assert server.watch_count == 0


@pytest.mark.parametrize("timeout", [{"timeout_seconds": 30}, {}])
def test_compacted_resource_version_raises_410(
    server: FakeApiServer, core: client.CoreV1Api, timeout: dict[str, int]
) -> None:
    old = server.resource_version
    server.create(service("a"))
    server.compact()
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(
            core.list_service_for_all_namespaces, resource_version=old, **timeout
        ):
            pass
    assert err.value.status == 410
    assert "too old resource version" in str(err.value.reason)
    # watching from the compaction point itself is fine
    http = urllib3.PoolManager()
    url = f"{server.url}/api/v1/services?watch=1&timeoutSeconds=0.1&resourceVersion="
    assert http.request("GET", url + server.resource_version).data == b""


def test_rollback_restores_state_and_too_large_versions_get_the_watch_cache_error() -> None:
    with FakeApiServer(fresh_wait=0.1) as srv:
        srv.create(service("kept"))
        backup = srv.resource_version
        srv.create(service("undone"))
        srv.delete("services", "default", "kept")
        newest = srv.resource_version
        srv.rollback(backup)
        assert srv.resource_version == backup
        assert [o["metadata"]["name"] for o in srv.objects("services")] == ["kept"]
        with pytest.raises(ValueError, match="cannot roll back"):
            srv.rollback(newest)
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=10))
        url = f"{srv.url}/api/v1/services?watch=1&timeoutSeconds=5&resourceVersion={newest}"
        resp = http.request("GET", url)
        assert resp.status == 200  # the error is a watch event, as from the real watch cache
        (event,) = [json.loads(line) for line in resp.data.splitlines()]
        assert event == {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"Timeout: Too large resource version: {newest}, current: {backup}",
                "reason": "Timeout",
                "details": {
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
                "code": 504,
            },
        }
        # history resumes from the restored version: the next write reuses a lost number
        created = srv.create(service("after"))
        assert int(created["metadata"]["resourceVersion"]) == int(backup) + 1


def test_a_too_large_version_reached_while_waiting_is_watched(server: FakeApiServer) -> None:
    ahead = str(int(server.resource_version) + 1)
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=10))
    url = f"{server.url}/api/v1/services?watch=1&timeoutSeconds=1&resourceVersion={ahead}"
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(http.request("GET", url).data))
    reader.start()
    server.create(service("a"))  # reaches `ahead` (before or within the cacher's 3 s wait)
    server.create(service("b"))
    reader.join(10)
    events = [json.loads(line) for line in result[0].splitlines()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_dropped_connection_ends_the_stream(server: FakeApiServer, core: client.CoreV1Api) -> None:
    stream = StreamThread(
        core.list_service_for_all_namespaces,
        resource_version=server.resource_version,
        timeout_seconds=60,
    )
    stream.start()
    assert server.wait_for_watches(1)
    assert server.drop_watches() == 1
    stream.join(5)
    assert not stream.is_alive()
    assert isinstance(stream.error, urllib3.exceptions.HTTPError)  # broken chunked stream


def test_stop_closes_streams() -> None:
    srv = FakeApiServer().start()
    http = urllib3.PoolManager(retries=False)
    resp = http.request("GET", f"{srv.url}/api/v1/nodes?watch=1", preload_content=False)
    assert srv.wait_for_watches(1)
    srv.stop()
    with pytest.raises(urllib3.exceptions.HTTPError):
        resp.read()
    assert srv.watch_count == 0


def test_outage_503_drops_watches_and_recovers(
    server: FakeApiServer, core: client.CoreV1Api
) -> None:
    stream = StreamThread(
        core.list_service_for_all_namespaces,
        resource_version=server.resource_version,
        timeout_seconds=60,
    )
    stream.start()
    assert server.wait_for_watches(1)
    with server.outage():
        stream.join(5)
        assert not stream.is_alive() and stream.error is not None
        with pytest.raises(ApiException) as err:
            core.list_service_for_all_namespaces()
        assert err.value.status == 503
    assert core.list_service_for_all_namespaces().items == []


def test_outage_refusing_connections(server: FakeApiServer) -> None:
    http = urllib3.PoolManager(retries=False)
    with server.outage(refuse=True), pytest.raises(urllib3.exceptions.HTTPError):
        http.request("GET", f"{server.url}/api/v1/services")
    assert http.request("GET", f"{server.url}/api/v1/services").status == 200
    assert [r.verb for r in server.request_log] == ["list"]


def test_watch_of_a_departed_client_is_reaped(server: FakeApiServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /api/v1/services?watch=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert server.wait_for_watches(1)
    deadline = time.monotonic() + 5
    while server.watch_count and time.monotonic() < deadline:
        time.sleep(0.01)  # the server notices within its client-check interval (0.5 s)
    assert server.watch_count == 0


# --- HTTPS and bearer tokens (the in-cluster path) ------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from minikproxy.testing.tls import make_ca

    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "ca")
    other = make_ca(d, "other-ca")
    serving = ca.issue(d, "apiserver", ["localhost", "127.0.0.1"])
    return {"ca": ca.cert, "other": other.cert, "cert": serving.cert, "key": serving.key}


def _incluster_client(server: FakeApiServer, tmp_path: Path, token: str, ca: Path) -> Any:
    """A client configured exactly as in a pod: KUBERNETES_SERVICE_HOST/PORT, token, ca.crt."""
    from kubernetes.config.incluster_config import InClusterConfigLoader

    host, port = server.url.removeprefix("https://").rsplit(":", 1)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    cfg = client.Configuration()
    InClusterConfigLoader(
        token_filename=str(token_file),
        cert_filename=str(ca),
        environ={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
    ).load_and_set(cfg)
    cfg.retries = False
    return client.CoreV1Api(client.ApiClient(cfg))


@pytest.fixture
def secure(pki: dict[str, Path]) -> Iterator[FakeApiServer]:
    """The fake API server as the in-cluster path meets it: HTTPS and a bearer token."""
    with FakeApiServer(
        host="localhost", tls_cert=pki["cert"], tls_key=pki["key"], token="s3cret"
    ) as srv:
        yield srv


def test_https_with_token_serves_the_incluster_client(
    secure: FakeApiServer, pki: dict[str, Path], tmp_path: Path
) -> None:
    secure.create(service("web"))
    assert secure.url.startswith("https://localhost:")
    api = _incluster_client(secure, tmp_path, "s3cret", pki["ca"])
    items = api.list_service_for_all_namespaces().items
    assert [s.metadata.name for s in items] == ["web"]
    assert secure.unauthorized_count == 0


def test_wrong_token_gets_401_with_a_status_body(
    secure: FakeApiServer, pki: dict[str, Path], tmp_path: Path
) -> None:
    api = _incluster_client(secure, tmp_path, "wrong", pki["ca"])
    with pytest.raises(ApiException) as info:
        api.list_service_for_all_namespaces()
    assert info.value.status == 401
    assert json.loads(info.value.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }
    assert secure.unauthorized_count == 1


def test_a_certificate_from_another_ca_is_rejected(
    secure: FakeApiServer, pki: dict[str, Path], tmp_path: Path
) -> None:
    api = _incluster_client(secure, tmp_path, "s3cret", pki["other"])
    # kubernetes >= 35 wraps the SSL error in an ApiException with status 0
    with pytest.raises(
        (urllib3.exceptions.MaxRetryError, ApiException), match="CERTIFICATE_VERIFY_FAILED"
    ):
        api.list_service_for_all_namespaces()
    wait_for(lambda: secure.tls_failure_count >= 1, timeout=10, what="the TLS failure")


def test_https_watch_ends_when_the_client_goes(
    secure: FakeApiServer, pki: dict[str, Path], tmp_path: Path
) -> None:
    api = _incluster_client(secure, tmp_path, "s3cret", pki["ca"])
    resp = api.list_service_for_all_namespaces(watch=True, _preload_content=False)
    assert secure.wait_for_watches(1)
    secure.create(service("web"))
    line = resp.readline() if hasattr(resp, "readline") else next(resp.stream())
    assert json.loads(line)["type"] == "ADDED"
    resp.close()  # not released to the pool: the connection closes
    wait_for(lambda: secure.watch_count == 0, timeout=10, what="the watch to end")
