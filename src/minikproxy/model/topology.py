"""kube-proxy's endpoint categorisation (``CategorizeEndpoints``), written once for every mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from minikproxy.model.endpoint import Endpoint
from minikproxy.model.serviceport import ServicePort

PREFER_SAME_NODE = "PreferSameNode"
PREFER_SAME_ZONE = "PreferSameZone"


@dataclass(frozen=True, slots=True)
class CategorizedEndpoints:
    """The endpoints each kind of traffic to a service port may use on this node.

    - ``cluster``: for Cluster traffic policy: ready endpoints filtered by topology, or, when no
      endpoint is ready anywhere, the serving-and-terminating ones.
    - ``local``: for Local traffic policy: this node's ready endpoints, or, when none is ready,
      this node's serving-and-terminating ones.
    - ``reachable``: the union of the two that this node can route to (sorted by address).
    - ``has_any``: some endpoint anywhere in the cluster can serve traffic.
    - ``topology_mode``: ``PreferSameNode``, ``PreferSameZone`` or "" (no filtering), and
      ``topology_reason`` explains why hints were ignored, for ``explain`` output.
    """

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    reachable: tuple[Endpoint, ...]
    has_any: bool
    topology_mode: str = ""
    topology_reason: str = ""


def topology_mode_from_hints(
    endpoints: Sequence[Endpoint], node_name: str, zone: str
) -> tuple[str, str]:
    """Choose the topology mode from the ready endpoints' hints; return (mode, reason)."""
    has_for_node = has_for_zone = False
    all_node_hints = all_zone_hints = True
    any_ready = False
    for ep in endpoints:
        if not ep.ready:
            continue
        any_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            has_for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone in ep.zone_hints:
            has_for_zone = True
    if not any_ready:
        return "", "no ready endpoints"
    if all_node_hints and has_for_node:
        return PREFER_SAME_NODE, ""
    if all_zone_hints:
        if has_for_zone:
            return PREFER_SAME_ZONE, ""
        if not zone:
            return "", "zone hints ignored: node has no topology.kubernetes.io/zone label"
        return "", f"zone hints ignored: no endpoint is hinted for zone {zone!r}"
    if all_node_hints:
        return "", f"node hints ignored: no endpoint is hinted for node {node_name!r}"
    return "", "hints ignored: one or more ready endpoints has no hint"


def _available_for_topology(ep: Endpoint, mode: str, node_name: str, zone: str) -> bool:
    if mode == PREFER_SAME_NODE:
        return node_name in ep.node_hints
    if mode == PREFER_SAME_ZONE:
        return zone in ep.zone_hints
    return True


def categorize_endpoints(
    endpoints: Sequence[Endpoint], port: ServicePort, node_name: str, zone: str
) -> CategorizedEndpoints:
    """Split ``endpoints`` (sorted by address) into the sets each traffic policy uses."""
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    has_any = False
    mode = reason = ""

    if port.uses_cluster_endpoints:
        mode, reason = topology_mode_from_hints(endpoints, node_name, zone)
        if mode:
            cluster = tuple(
                ep
                for ep in endpoints
                if ep.ready and _available_for_topology(ep, mode, node_name, zone)
            )
        else:
            ready = [ep for ep in endpoints if ep.ready]
            cluster = tuple(endpoints) if len(ready) == len(endpoints) else tuple(ready)
        if not cluster:
            # No ready endpoint anywhere (topology never filters everything away).
            cluster = tuple(ep for ep in endpoints if ep.serving and ep.terminating)
        has_any = bool(cluster)

    if not port.uses_local_endpoints:
        return CategorizedEndpoints(cluster, (), cluster, has_any, mode, reason)

    local_ready = local_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or ep.is_local
        elif ep.serving and ep.terminating:
            has_any = True
            local_terminating = local_terminating or ep.is_local
    if local_ready:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.ready)
    elif local_terminating:
        local = tuple(ep for ep in endpoints if ep.is_local and ep.serving and ep.terminating)

    if not port.uses_cluster_endpoints:
        return CategorizedEndpoints((), local, local, has_any, mode, reason)
    if not local:
        reachable = cluster
    elif not cluster:
        reachable = local
    else:
        merged = {ep.address: ep for ep in cluster}
        merged.update((ep.address, ep) for ep in local)
        reachable = tuple(merged[a] for a in sorted(merged))
    return CategorizedEndpoints(cluster, local, reachable, has_any, mode, reason)
