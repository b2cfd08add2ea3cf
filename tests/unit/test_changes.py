"""``ClusterTracker``: raw objects in, ``ProxyState`` snapshots plus what changed out.

Endpoint merging follows kube-proxy's ``EndpointSliceCache.addEndpoints``
(pkg/proxy/endpointslicecache.go): one entry per ``ip:port`` per service port, a local copy
wins, and the list is sorted by ``ip:port``.
"""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION, ZONE_LABEL
from minikproxy.model.problems import ObjectProblem

Obj = dict[str, Any]
NODE = "node-a"
WEB = NamespacedName("shop", "web")
API = NamespacedName("shop", "api")
WEB_HTTP = ServicePortName("shop", "web", "http", "TCP")


def service(
    name: str = "web", *, ports: list[Obj] | None = None, cluster_ips: list[str] | None = None
) -> Obj:
    ips = cluster_ips or ["10.96.0.5"]
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": ports or [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }


def address(ip: str, node: str = "", **conditions: bool) -> Obj:
    out: Obj = {"addresses": [ip]}
    if node:
        out["nodeName"] = node
    if conditions:
        out["conditions"] = conditions
    return out


def endpoint_slice(
    name: str,
    *endpoints: Obj,
    service_name: str = "web",
    ports: list[Obj] | None = None,
    family: str = "IPv4",
    trigger_time: str = "",
) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": "shop",
        "labels": {SERVICE_NAME_LABEL: service_name},
    }
    if trigger_time:
        meta["annotations"] = {TRIGGER_TIME_ANNOTATION: trigger_time}
    return {
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": family,
        "endpoints": list(endpoints),
        "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(zone: str | None) -> Obj:
    labels = {} if zone is None else {ZONE_LABEL: zone}
    return {"kind": "Node", "metadata": {"name": NODE, "labels": labels}}


def tracker_with(*objects: Obj) -> ClusterTracker:
    tracker = ClusterTracker(NODE)
    tracker.add_objects(objects)
    return tracker


def summary(endpoints: tuple[Endpoint, ...]) -> list[tuple[str, bool, bool]]:
    return [(e.address, e.is_local, e.ready) for e in endpoints]


# --- merging and ports ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slices", "expected"),
    [
        pytest.param(
            [endpoint_slice("a", address("10.0.0.2")), endpoint_slice("b", address("10.0.0.1"))],
            [("10.0.0.1:8080", False, True), ("10.0.0.2:8080", False, True)],
            id="merged-across-slices-and-sorted",
        ),
        pytest.param(
            [endpoint_slice("a", address("10.0.0.1"), address("10.0.0.1"))],
            [("10.0.0.1:8080", False, True)],
            id="duplicate-in-one-slice",
        ),
        pytest.param(
            [endpoint_slice("a", address("10.0.0.1", "node-b")),
             endpoint_slice("b", address("10.0.0.1", NODE))],
            [("10.0.0.1:8080", True, True)],
            id="local-wins-when-later",
        ),
        pytest.param(
            [endpoint_slice("a", address("10.0.0.1", NODE)),
             endpoint_slice("b", address("10.0.0.1", "node-b"))],
            [("10.0.0.1:8080", True, True)],
            id="local-wins-when-earlier",
        ),
        pytest.param(
            [endpoint_slice("a", address("10.0.0.10"), address("10.0.0.9"), address("10.0.0.100"))],
            [("10.0.0.100:8080", False, True), ("10.0.0.10:8080", False, True),
             ("10.0.0.9:8080", False, True)],
            id="sorted-by-address-string",
        ),
        pytest.param(
            [endpoint_slice("a", address("10.0.0.1", NODE), address("10.0.0.2", "node-b"),
                            address("10.0.0.3"))],
            [("10.0.0.1:8080", True, True), ("10.0.0.2:8080", False, True),
             ("10.0.0.3:8080", False, True)],
            id="is-local-from-node-name",
        ),
    ],
)  # fmt: skip
def test_endpoints_merged(slices: list[Obj], expected: list[tuple[str, bool, bool]]) -> None:
    state = tracker_with(service(), *slices).snapshot(IPV4).state
    assert summary(state.endpoints_of(WEB_HTTP)) == expected


def test_empty_node_name_is_never_local() -> None:
    tracker = ClusterTracker("")
    tracker.add_objects([service(), endpoint_slice("a", address("10.0.0.1"))])
    assert [e.is_local for e in tracker.snapshot(IPV4).state.endpoints_of(WEB_HTTP)] == [False]


def test_ports_resolved_by_slice_port_name_and_protocol() -> None:
    svc = service(
        ports=[
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"port": 9153, "protocol": "TCP"},
        ]
    )
    sl = endpoint_slice(
        "a",
        address("10.0.0.1"),
        ports=[
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
            {"name": "dns", "port": 5355, "protocol": "TCP"},  # no such service port
            {"port": 9154},
        ],
    )
    state = tracker_with(svc, sl).snapshot(IPV4).state
    by_port = {
        str(name) + "/" + name.protocol: [e.address for e in state.endpoints_of(name)]
        for name in state.services
    }
    assert by_port == {
        "shop/web:dns/UDP": ["10.0.0.1:5353"],
        "shop/web:dns-tcp/TCP": ["10.0.0.1:5354"],
        "shop/web/TCP": ["10.0.0.1:9154"],
    }
    assert state.ports_by_service[WEB] == tuple(state.services)


def test_endpoint_fields_carried_through() -> None:
    ep = address("10.0.0.1", NODE, ready=False, serving=True, terminating=True)
    ep.update(zone="zone-a", hints={"forZones": [{"name": "zone-a"}]})
    (got,) = (
        tracker_with(service(), endpoint_slice("a", ep)).snapshot(IPV4).state.endpoints_of(WEB_HTTP)
    )
    assert got == Endpoint(
        "10.0.0.1:8080",
        "10.0.0.1",
        8080,
        ready=False,
        serving=True,
        terminating=True,
        is_local=True,
        zone_hints=frozenset({"zone-a"}),
        node_hints=frozenset(),
        node_name=NODE,
        zone="zone-a",
    )


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        pytest.param(IPV4, ["10.0.0.1:8080"], id="v4"),
        pytest.param(IPV6, ["[fd00::1]:8080"], id="v6-bracketed"),
    ],
)
def test_dual_stack_slices_split_by_family(family: IPFamily, expected: list[str]) -> None:
    tracker = tracker_with(
        service(cluster_ips=["10.96.0.5", "fd00:96::5"]),
        endpoint_slice("v4", address("10.0.0.1")),
        endpoint_slice("v6", address("fd00::1"), family="IPv6"),
    )
    state = tracker.snapshot(family).state
    assert [e.address for e in state.endpoints_of(WEB_HTTP)] == expected
    assert [p.family for p in state.services.values()] == [family]


# --- legacy Endpoints ---------------------------------------------------------------------------


def legacy_endpoints() -> Obj:
    return {
        "kind": "Endpoints",
        "metadata": {"name": "web", "namespace": "shop"},
        "subsets": [
            {
                "addresses": [{"ip": "10.0.0.1", "nodeName": NODE}],
                "notReadyAddresses": [{"ip": "10.0.0.2", "nodeName": "node-b"}],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            }
        ],
    }


def test_legacy_endpoints_used_without_slices() -> None:
    state = tracker_with(service(), legacy_endpoints()).snapshot(IPV4).state
    got = [(e.address, e.ready, e.serving, e.terminating, e.is_local) for e in
           state.endpoints_of(WEB_HTTP)]  # fmt: skip
    assert got == [
        ("10.0.0.1:8080", True, True, False, True),
        ("10.0.0.2:8080", False, False, False, False),
    ]


def test_legacy_endpoints_ignored_once_the_service_has_slices() -> None:
    tracker = tracker_with(service(), legacy_endpoints())
    tracker.snapshot(IPV4)
    tracker.upsert_endpoint_slice(endpoint_slice("a", address("10.0.0.9")))
    snap = tracker.snapshot(IPV4)
    assert [e.address for e in snap.state.endpoints_of(WEB_HTTP)] == ["10.0.0.9:8080"]
    assert snap.changed == frozenset({WEB})
    # Deleting the last slice falls back to the Endpoints object again.
    tracker.delete_endpoint_slice(endpoint_slice("a"))
    snap = tracker.snapshot(IPV4)
    assert [e.address for e in snap.state.endpoints_of(WEB_HTTP)] == [
        "10.0.0.1:8080",
        "10.0.0.2:8080",
    ]


# --- change tracking ----------------------------------------------------------------------------

WEB_SLICE = endpoint_slice("web-1", address("10.0.0.1"))
API_SLICE = endpoint_slice("api-1", address("10.0.0.2"), service_name="api")


def _update_web_slice(t: ClusterTracker) -> None:
    t.upsert_endpoint_slice(endpoint_slice("web-1", address("10.0.0.1"), address("10.0.0.3")))


def _same_web_slice(t: ClusterTracker) -> None:
    t.upsert_endpoint_slice(endpoint_slice("web-1", address("10.0.0.1")))


def _add_web_slice(t: ClusterTracker) -> None:
    t.upsert_endpoint_slice(endpoint_slice("web-2", address("10.0.0.4")))


def _delete_web_slice(t: ClusterTracker) -> None:
    t.delete_endpoint_slice(WEB_SLICE)


def _delete_unknown_slice(t: ClusterTracker) -> None:
    t.delete_endpoint_slice(endpoint_slice("nope"))


def _update_api_service(t: ClusterTracker) -> None:
    t.upsert_service(service("api", ports=[{"name": "http", "port": 81}]))


def _same_api_service(t: ClusterTracker) -> None:
    t.upsert_service(service("api"))


def _delete_web_service(t: ClusterTracker) -> None:
    t.delete_service(service())


def _add_new_service(t: ClusterTracker) -> None:
    t.upsert_service(service("new"))


def _move_slice_to_api(t: ClusterTracker) -> None:
    t.upsert_endpoint_slice(endpoint_slice("web-1", address("10.0.0.1"), service_name="api"))


def _both(t: ClusterTracker) -> None:
    _update_web_slice(t)
    _update_api_service(t)


def _same_zone(t: ClusterTracker) -> None:
    t.set_node(node("zone-a"))


def _nothing(_: ClusterTracker) -> None:
    pass


@pytest.mark.parametrize(
    ("action", "changed"),
    [
        pytest.param(_nothing, set(), id="nothing"),
        pytest.param(_update_web_slice, {WEB}, id="slice-updated"),
        pytest.param(_same_web_slice, set(), id="slice-unchanged"),
        pytest.param(_add_web_slice, {WEB}, id="slice-added"),
        pytest.param(_delete_web_slice, {WEB}, id="slice-deleted"),
        pytest.param(_delete_unknown_slice, set(), id="unknown-slice-deleted"),
        pytest.param(_update_api_service, {API}, id="service-updated"),
        pytest.param(_same_api_service, set(), id="service-unchanged"),
        pytest.param(_delete_web_service, {WEB}, id="service-deleted"),
        pytest.param(_add_new_service, {NamespacedName("shop", "new")}, id="service-added"),
        pytest.param(_move_slice_to_api, {WEB, API}, id="slice-moved-to-other-service"),
        pytest.param(_both, {WEB, API}, id="two-services"),
        pytest.param(_same_zone, set(), id="node-zone-unchanged"),
    ],
)
def test_changed_reports_touched_services(action: Any, changed: set[NamespacedName]) -> None:
    tracker = tracker_with(node("zone-a"), service(), service("api"), WEB_SLICE, API_SLICE)
    assert tracker.snapshot(IPV4).changed is None  # the first snapshot is full
    action(tracker)
    assert tracker.pending_services(IPV4) == len(changed)
    assert tracker.snapshot(IPV4).changed == frozenset(changed)
    assert tracker.snapshot(IPV4).changed == frozenset()


def test_first_snapshot_of_each_family_is_full() -> None:
    tracker = tracker_with(service(), WEB_SLICE)
    assert tracker.snapshot(IPV4).changed is None
    assert tracker.snapshot(IPV6).changed is None
    _update_web_slice(tracker)
    assert tracker.snapshot(IPV4).changed == frozenset({WEB})
    assert tracker.snapshot(IPV6).changed == frozenset({WEB})


def test_deletions_remove_ports_and_endpoints() -> None:
    tracker = tracker_with(service(), service("api"), WEB_SLICE, API_SLICE)
    tracker.snapshot(IPV4)
    tracker.delete_endpoint_slice(WEB_SLICE)
    state = tracker.snapshot(IPV4).state
    assert WEB_HTTP in state.services
    assert state.endpoints_of(WEB_HTTP) == ()
    tracker.delete_service(service())
    state = tracker.snapshot(IPV4).state
    assert WEB_HTTP not in state.services
    assert WEB not in state.ports_by_service
    assert [str(n) for n in state.services] == ["shop/api:http"]
    assert [e.address for eps in state.endpoints.values() for e in eps] == ["10.0.0.2:8080"]


def test_snapshots_are_independent() -> None:
    tracker = tracker_with(service(), WEB_SLICE)
    before = tracker.snapshot(IPV4).state
    _update_web_slice(tracker)
    after = tracker.snapshot(IPV4).state
    assert [e.address for e in before.endpoints_of(WEB_HTTP)] == ["10.0.0.1:8080"]
    assert [e.address for e in after.endpoints_of(WEB_HTTP)] == ["10.0.0.1:8080", "10.0.0.3:8080"]


@pytest.mark.parametrize(
    ("first_zone", "second_zone", "full"),
    [
        pytest.param("zone-a", "zone-b", True, id="zone-changed"),
        pytest.param(None, "zone-a", True, id="zone-added"),
        pytest.param("zone-a", None, True, id="zone-removed"),
        pytest.param("zone-a", "zone-a", False, id="zone-same"),
    ],
)
def test_zone_label_change_forces_full_snapshot(
    first_zone: str | None, second_zone: str | None, full: bool
) -> None:
    tracker = tracker_with(node(first_zone), service(), WEB_SLICE)
    tracker.snapshot(IPV4)
    tracker.snapshot(IPV6)
    tracker.set_node(node(second_zone))
    for family in (IPV4, IPV6):
        snap = tracker.snapshot(family)
        assert (snap.changed is None) is full
        assert snap.state.node.zone == (second_zone or "")


def test_other_nodes_are_ignored() -> None:
    tracker = tracker_with(node("zone-a"))
    tracker.snapshot(IPV4)
    tracker.set_node({"kind": "Node", "metadata": {"name": "node-b", "labels": {ZONE_LABEL: "z"}}})
    assert tracker.node.zone == "zone-a"
    assert tracker.snapshot(IPV4).changed == frozenset()


def test_trigger_times_collected_once() -> None:
    tracker = tracker_with(
        service(),
        service("api"),
        endpoint_slice("web-1", address("10.0.0.1"), trigger_time="2026-01-01T00:00:00Z"),
        endpoint_slice("api-1", address("10.0.0.2"), service_name="api"),
    )
    assert tracker.snapshot(IPV4).trigger_times == {WEB: ("2026-01-01T00:00:00Z",)}
    tracker.upsert_endpoint_slice(
        endpoint_slice("web-1", address("10.0.0.3"), trigger_time="2026-01-01T00:00:05Z")
    )
    tracker.upsert_endpoint_slice(
        endpoint_slice("web-2", address("10.0.0.4"), trigger_time="2026-01-01T00:00:06Z")
    )
    snap = tracker.snapshot(IPV4)
    assert snap.trigger_times == {WEB: ("2026-01-01T00:00:05Z", "2026-01-01T00:00:06Z")}
    assert tracker.snapshot(IPV4).trigger_times == {}


def test_trigger_times_belong_to_the_slice_family() -> None:
    """Like kube-proxy's per-family change trackers: an IPv6 slice's trigger time is
    reported by the IPv6 snapshot, not consumed by the IPv4 one."""
    tracker = tracker_with(service(cluster_ips=["10.96.0.5", "fd00:96::5"]))
    tracker.snapshot(IPV4)
    tracker.snapshot(IPV6)
    tracker.upsert_endpoint_slice(
        endpoint_slice("v6", address("fd00::1"), family="IPv6", trigger_time="t6")
    )
    tracker.upsert_endpoint_slice(endpoint_slice("v4", address("10.0.0.1"), trigger_time="t4"))
    assert tracker.snapshot(IPV4).trigger_times == {WEB: ("t4",)}
    assert tracker.snapshot(IPV6).trigger_times == {WEB: ("t6",)}


def test_unchanged_slice_adds_no_trigger_time() -> None:
    tracker = tracker_with(service(), endpoint_slice("w", address("10.0.0.1"), trigger_time="t1"))
    tracker.snapshot(IPV4)
    tracker.upsert_endpoint_slice(endpoint_slice("w", address("10.0.0.1"), trigger_time="t1"))
    assert tracker.snapshot(IPV4).trigger_times == {}


def test_problems_reported_and_unknown_kinds_ignored() -> None:
    problems: list[ObjectProblem] = []
    tracker = ClusterTracker(NODE, report=problems.append)
    bad = service("bad")
    bad["spec"]["clusterIP"] = bad["spec"]["clusterIPs"][0] = "10.96.0.999"
    tracker.add_objects([bad, {"kind": "ConfigMap", "metadata": {"name": "x"}}, service()])
    state = tracker.snapshot(IPV4).state
    assert [str(n) for n in state.services] == ["shop/web:http"]
    # One problem per family the Service was parsed for.
    assert {(p.namespace, p.name, p.field) for p in problems} == {
        ("shop", "bad", "spec.clusterIPs[0]")
    }
