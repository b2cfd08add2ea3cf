"""Hypothesis strategies for random valid clusters (tests only; needs ``hypothesis``).

A cluster is a list of raw API objects (Services, EndpointSlices, one Node named
``node-a``) covering every Service type, both families, all protocols, traffic policies,
affinity, source ranges, terminating endpoints and topology hints.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from minikproxy.changes import ClusterTracker

Obj = dict[str, Any]
NODE = "node-a"
NODES = (NODE, "node-b", "node-c")
ZONES = ("zone-a", "zone-b")


def node_object() -> Obj:
    """The Node the clusters are compiled for."""
    return {
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "InternalIP", "address": "fd00:192:168:1::10"},
            ]
        },
    }


@st.composite
def endpoint(draw: st.DrawFn, family: str, index: int) -> Obj:
    """One EndpointSlice endpoint."""
    ip = f"10.244.{index // 250}.{index % 250 + 2}"
    if family == "IPv6":
        ip = f"fd00:10:244::{index + 2:x}"
    state = draw(st.sampled_from(["ready", "ready", "ready", "terminating", "not-ready"]))
    conditions = {
        "ready": {"ready": True},
        "terminating": {"ready": False, "serving": True, "terminating": True},
        "not-ready": {"ready": False, "serving": False, "terminating": False},
    }[state]
    ep: Obj = {"addresses": [ip], "conditions": conditions}
    if draw(st.booleans()):
        ep["nodeName"] = draw(st.sampled_from(NODES))
    if draw(st.integers(0, 3)) == 0:
        ep["hints"] = {"forZones": [{"name": draw(st.sampled_from(ZONES))}]}
    return ep


@st.composite
def service_with_slices(draw: st.DrawFn, index: int) -> list[Obj]:
    """A Service and its EndpointSlices (possibly none)."""
    name, namespace = f"svc{index}", draw(st.sampled_from(["default", "prod"]))
    svc_type = draw(st.sampled_from(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"]))
    dual = draw(st.integers(0, 3)) == 0
    cluster_ips = [f"10.96.{index // 250}.{index % 250 + 1}"]
    if dual:
        cluster_ips.append(f"fd00:10:96::{index + 1:x}")
    port_count = draw(st.integers(1, 2))
    ports = []
    for p in range(port_count):
        port: Obj = {
            "name": f"p{p}",
            "port": draw(st.sampled_from([53, 80, 443, 8080])) + p,
            "protocol": draw(st.sampled_from(["TCP", "TCP", "UDP", "SCTP"])),
        }
        if svc_type != "ClusterIP":
            port["nodePort"] = 30000 + index * 2 + p
        ports.append(port)
    spec: Obj = {"type": svc_type, "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips}
    spec["ports"] = ports
    if draw(st.booleans()):
        spec["externalIPs"] = [f"203.0.113.{index % 250 + 1}"]
    if svc_type != "ClusterIP" and draw(st.booleans()):
        spec["externalTrafficPolicy"] = "Local"
        if svc_type == "LoadBalancer":
            spec["healthCheckNodePort"] = 32000 + index
    if draw(st.integers(0, 3)) == 0:
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.integers(0, 3)) == 0:
        spec["sessionAffinity"] = "ClientIP"
        timeout = draw(st.integers(1, 86400))
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
    status: Obj = {}
    if svc_type == "LoadBalancer":
        status = {"loadBalancer": {"ingress": [{"ip": f"198.51.100.{index % 250 + 1}"}]}}
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = draw(
                st.sampled_from([["192.168.0.0/16"], [" 10.0.0.0/8", "172.16.0.0/12 "]])
            )
    objs: list[Obj] = [
        {
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            "status": status,
        }
    ]
    families = ["IPv4", "IPv6"] if dual else ["IPv4"]
    for s in range(draw(st.integers(0, 2))):
        family = draw(st.sampled_from(families))
        count = draw(st.integers(0, 4))
        base = index * 16 + s * 5
        objs.append(
            {
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-{s}",
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": family,
                "endpoints": [draw(endpoint(family, base + i)) for i in range(count)],
                "ports": [
                    {"name": p["name"], "port": 9000 + i, "protocol": p["protocol"]}
                    for i, p in enumerate(ports)
                ],
            }
        )
    return objs


@st.composite
def clusters(draw: st.DrawFn, max_services: int = 8) -> list[Obj]:
    """A random valid cluster: the Node plus up to ``max_services`` Services and slices."""
    objs = [node_object()]
    for i in range(draw(st.integers(0, max_services))):
        objs.extend(draw(service_with_slices(i)))
    return objs


def _owner(obj: Obj) -> str:
    """The Service an object belongs to (``svc3`` for ``svc3`` and ``svc3-1``), or ""."""
    return "" if obj["kind"] == "Node" else str(obj["metadata"]["name"]).split("-")[0]


@st.composite
def changed_cluster(draw: st.DrawFn, before: list[Obj]) -> list[Obj]:
    """``before`` after one burst of changes: per Service, kept, re-drawn (Service and slices),
    deleted, or its endpoints changed (some dropped, readiness re-drawn, new ones added);
    plus up to two new Services."""
    services = sorted({_owner(o) for o in before if o["kind"] == "Service"})
    after = [o for o in before if o["kind"] == "Node"]
    for name in services:
        own = [o for o in before if _owner(o) == name]
        index = int(name[3:])
        action = draw(
            st.sampled_from(["keep", "keep", "endpoints", "endpoints", "redraw", "delete"])
        )
        if action == "keep":
            after.extend(own)
        elif action == "redraw":
            after.extend(draw(service_with_slices(index)))
        elif action == "endpoints":
            for obj in own:
                if obj["kind"] != "EndpointSlice":
                    after.append(obj)
                    continue
                family = obj["addressType"]
                kept = []
                for e in obj["endpoints"]:
                    if draw(st.booleans()):
                        continue  # removed
                    if draw(st.booleans()):  # readiness re-drawn
                        e = {**e, "conditions": draw(endpoint(family, 0))["conditions"]}
                    kept.append(e)
                base = index * 16 + int(obj["metadata"]["name"].split("-")[1]) * 5
                used = {e["addresses"][0] for e in kept}
                for i in range(draw(st.integers(0, 2))):
                    ep = draw(endpoint(family, base + i))
                    if ep["addresses"][0] not in used:
                        used.add(ep["addresses"][0])
                        kept.append(ep)
                after.append({**obj, "endpoints": kept})
    taken = {int(n[3:]) for n in services}
    for extra in range(draw(st.integers(0, 2))):
        index = max(taken | {20}) + 1 + extra
        after.extend(draw(service_with_slices(index)))
    return after


@st.composite
def cluster_histories(
    draw: st.DrawFn, max_services: int = 6, max_changes: int = 3
) -> list[list[Obj]]:
    """A random cluster followed by 1..``max_changes`` bursts of changes
    (:func:`changed_cluster`): the states a proxy sees, in order."""
    states = [draw(clusters(max_services=max_services))]
    for _ in range(draw(st.integers(1, max_changes))):
        states.append(draw(changed_cluster(states[-1])))
    return states


def feed_change(tracker: ClusterTracker, old: list[Obj], new: list[Obj]) -> None:
    """Feed the difference between two object lists to ``tracker`` as watch events would:
    deletions of what is gone, then the objects that are new or changed."""

    def key(o: Obj) -> tuple[str, str, str]:
        return (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])

    before = {key(o): o for o in old}
    after = {key(o): o for o in new}
    for k, o in before.items():
        if k not in after and o["kind"] == "Service":
            tracker.delete_service(o)
        elif k not in after and o["kind"] == "EndpointSlice":
            tracker.delete_endpoint_slice(o)
    tracker.add_objects(o for k, o in after.items() if before.get(k) != o)
