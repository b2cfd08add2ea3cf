"""The partial compile's change detector: which :class:`ServiceRules` fields make a service
port count as changed. It must compare fields by name, so adding a field to the NamedTuple
(or reordering it) cannot silently change what "unchanged" means."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.compile import iptables
from minikproxy.compile.iptables import (
    RENDERED_FIELDS,
    SUMMARY_FIELDS,
    IptablesRuleset,
    ServiceRules,
    compile_iptables,
)
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.model.names import IPV4, ServicePortName

NODE = "node-a"
NAME = ServicePortName("ns", "web", "p", "TCP")

SERVICE: dict[str, Any] = {
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "ns"},
    "spec": {
        "type": "NodePort",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}],
    },
}
SLICE: dict[str, Any] = {
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-1",
        "namespace": "ns",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv4",
    "endpoints": [{"addresses": ["10.244.1.1"], "conditions": {"ready": True}}],
    "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
}


def compiled() -> tuple[ClusterTracker, IptablesRuleset]:
    tracker = ClusterTracker(NODE)
    tracker.add_objects([SERVICE, SLICE])
    options = iptables.IptablesOptions(
        family=IPV4,
        local_detector=make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=["10.244.0.0/16"]),
        node_ip="192.168.1.10",
    )
    return tracker, compile_iptables(tracker.snapshot(IPV4).state, options)


def different(value: Any) -> Any:
    """A value of the same type as ``value`` that compares unequal to it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-A X\n"
    if isinstance(value, tuple):
        return (*value, "KUBE-SEP-EXTRA")
    if isinstance(value, ServicePortName):
        return value
    return replace(value, local=(*value.local, None))


def test_every_field_is_either_rendered_or_a_summary() -> None:
    """A new ServiceRules field must be classified, or the detector would guess."""
    assert set(RENDERED_FIELDS).isdisjoint(SUMMARY_FIELDS)
    assert set(RENDERED_FIELDS) | set(SUMMARY_FIELDS) == set(ServiceRules._fields)


@pytest.mark.parametrize("field_name", RENDERED_FIELDS + SUMMARY_FIELDS)
def test_partial_compile_rewrites_a_port_exactly_when_a_rendered_field_changed(
    field_name: str,
) -> None:
    """Pretend the previous ruleset had a different ``field_name`` for the port; recompiling
    the unchanged service must call the port changed only for a rendered field."""
    tracker, first = compiled()
    old = first.services[NAME]
    tampered = old._replace(**{field_name: different(getattr(old, field_name))})
    previous = copy.copy(first)
    previous.services = {**first.services, NAME: tampered}
    tracker.upsert_endpoint_slice({**SLICE, "metadata": {**SLICE["metadata"], "uid": "2"}})
    tracker.delete_endpoint_slice(SLICE)
    tracker.upsert_endpoint_slice(SLICE)  # the service is dirty, its rules the same as before
    snapshot = tracker.snapshot(IPV4)
    again = compile_iptables(
        snapshot.state, first.options, previous=previous, changed_services=snapshot.changed
    )
    assert again.changed is not None
    assert (NAME in again.changed) == (field_name in RENDERED_FIELDS)
    assert again.services[NAME] == old  # either way the fresh compile is what is kept
