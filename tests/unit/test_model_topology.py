"""``categorize_endpoints``: every branch of kube-proxy's ``CategorizeEndpoints``.

Reference: pkg/proxy/topology.go (``CategorizeEndpoints``, ``topologyModeFromHints``). Endpoint
sets are compared by address; ``reachable`` is the union of ``cluster`` and ``local`` sorted
by address (kube-proxy builds it from a map, so its order is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from minikproxy.model.endpoint import Endpoint, make_endpoint
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.parse import ZONE_LABEL, NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import (
    PREFER_SAME_NODE,
    PREFER_SAME_ZONE,
    categorize_endpoints,
)

NODE = "node-a"
ZONE = "zone-a"
NAME = ServicePortName("shop", "web", "http", "TCP")


def port(**kwargs: Any) -> ServicePort:
    """A service port of shop/web with the given traffic-policy settings."""
    return ServicePort(name=NAME, family=IPV4, cluster_ip="10.96.0.5", port=80, **kwargs)


CLUSTER = port()
ETP_LOCAL = port(node_port=30080, external_policy_local=True)
ETP_LOCAL_LB = port(load_balancer_vips=("203.0.113.1",), external_policy_local=True)
ETP_LOCAL_CLUSTER_IP_ONLY = port(external_policy_local=True)
ITP_LOCAL = port(internal_policy_local=True)
ITP_LOCAL_ETP_CLUSTER = port(internal_policy_local=True, node_port=30080)


def ep(
    last_octet: int,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    local: bool = False,
    zones: tuple[str, ...] = (),
    nodes: tuple[str, ...] = (),
) -> Endpoint:
    """Endpoint 10.0.0.<last_octet>:8080."""
    return make_endpoint(
        f"10.0.0.{last_octet}",
        8080,
        ready=ready,
        serving=serving,
        terminating=terminating,
        is_local=local,
        zone_hints=frozenset(zones),
        node_hints=frozenset(nodes),
        node_name=NODE if local else "node-x",
    )


def terminating(last_octet: int, *, local: bool = False, serving: bool = True) -> Endpoint:
    return ep(last_octet, ready=False, serving=serving, terminating=True, local=local)


def not_ready(last_octet: int, *, local: bool = False) -> Endpoint:
    return ep(last_octet, ready=False, local=local)


def ips(endpoints: tuple[Endpoint, ...]) -> list[int]:
    """The last octets of ``endpoints``, in order."""
    return [int(e.ip.rsplit(".", 1)[1]) for e in endpoints]


@dataclass(frozen=True)
class Case:
    port: ServicePort
    endpoints: list[Endpoint]
    cluster: list[int]
    local: list[int]
    reachable: list[int]
    has_any: bool
    mode: str = ""
    zone: str = ZONE
    node: str = NODE


CASES = {
    # --- Cluster traffic policy only ------------------------------------------------------
    "no-endpoints": Case(CLUSTER, [], [], [], [], False),
    "cluster-all-ready": Case(CLUSTER, [ep(1), ep(2, local=True)], [1, 2], [], [1, 2], True),
    "cluster-ready-only": Case(
        CLUSTER, [ep(1), not_ready(2), terminating(3), ep(4)], [1, 4], [], [1, 4], True
    ),
    "cluster-terminating-fallback": Case(
        CLUSTER,
        [terminating(1), not_ready(2), terminating(3, serving=False), terminating(4, local=True)],
        [1, 4],
        [],
        [1, 4],
        True,
    ),
    "cluster-nothing-usable": Case(
        CLUSTER, [not_ready(1), terminating(2, serving=False)], [], [], [], False
    ),
    # --- External traffic policy Local (cluster endpoints kept for short-circuiting) ------
    "etp-local-ready": Case(
        ETP_LOCAL, [ep(1), ep(2, local=True), terminating(3, local=True)], [1, 2], [2], [1, 2], True
    ),
    "etp-local-lb-ready": Case(ETP_LOCAL_LB, [ep(1), ep(2, local=True)], [1, 2], [2], [1, 2], True),
    "etp-local-terminating-fallback": Case(
        ETP_LOCAL,
        [ep(1), terminating(2, local=True), terminating(3, local=True, serving=False)],
        [1],
        [2],
        [1, 2],
        True,
    ),
    "etp-local-no-local": Case(ETP_LOCAL, [ep(1), ep(3)], [1, 3], [], [1, 3], True),
    "etp-local-only-terminating-anywhere": Case(
        ETP_LOCAL, [terminating(1), terminating(2, local=True)], [1, 2], [2], [1, 2], True
    ),
    "etp-local-nothing-usable": Case(ETP_LOCAL, [not_ready(1, local=True)], [], [], [], False),
    "etp-local-without-external-access-is-cluster": Case(
        ETP_LOCAL_CLUSTER_IP_ONLY, [ep(1), ep(2, local=True)], [1, 2], [], [1, 2], True
    ),
    # --- Internal traffic policy Local ----------------------------------------------------
    "itp-local-ready": Case(ITP_LOCAL, [ep(1), ep(2, local=True)], [], [2], [2], True),
    "itp-local-none-local": Case(ITP_LOCAL, [ep(1), ep(3)], [], [], [], True),
    "itp-local-terminating-fallback": Case(
        ITP_LOCAL, [ep(1), terminating(2, local=True)], [], [2], [2], True
    ),
    "itp-local-remote-terminating-only": Case(ITP_LOCAL, [terminating(1)], [], [], [], True),
    "itp-local-nothing-usable": Case(ITP_LOCAL, [not_ready(1, local=True)], [], [], [], False),
    "itp-local-with-etp-cluster": Case(
        ITP_LOCAL_ETP_CLUSTER, [ep(1), ep(2, local=True), ep(3)], [1, 2, 3], [2], [1, 2, 3], True
    ),
    # --- Topology hints --------------------------------------------------------------------
    "prefer-same-zone": Case(
        CLUSTER,
        [ep(1, zones=(ZONE,)), ep(2, zones=("zone-b",)), ep(3, zones=(ZONE, "zone-c"))],
        [1, 3],
        [],
        [1, 3],
        True,
        PREFER_SAME_ZONE,
    ),
    "prefer-same-zone-not-ready-without-hint-ignored": Case(
        CLUSTER,
        [ep(1, zones=(ZONE,)), ep(2, zones=("zone-b",)), not_ready(3)],
        [1],
        [],
        [1],
        True,
        PREFER_SAME_ZONE,
    ),
    "hints-ignored-one-ready-without-hint": Case(
        CLUSTER, [ep(1, zones=(ZONE,)), ep(2)], [1, 2], [], [1, 2], True
    ),
    "hints-ignored-node-has-no-zone": Case(
        CLUSTER, [ep(1, zones=(ZONE,)), ep(2, zones=("zone-b",))], [1, 2], [], [1, 2], True, zone=""
    ),
    "hints-ignored-no-hint-for-zone": Case(
        CLUSTER, [ep(1, zones=("zone-b",)), ep(2, zones=("zone-c",))], [1, 2], [], [1, 2], True
    ),
    "prefer-same-node": Case(
        CLUSTER,
        [ep(1, nodes=(NODE,), zones=("zone-b",)), ep(2, nodes=("node-b",), zones=(ZONE,))],
        [1],
        [],
        [1],
        True,
        PREFER_SAME_NODE,
    ),
    "node-hints-not-for-us-fall-back-to-zone": Case(
        CLUSTER,
        [ep(1, nodes=("node-b",), zones=(ZONE,)), ep(2, nodes=("node-c",), zones=("zone-b",))],
        [1],
        [],
        [1],
        True,
        PREFER_SAME_ZONE,
    ),
    "node-hints-incomplete-fall-back-to-zone": Case(
        CLUSTER,
        [ep(1, nodes=(NODE,), zones=("zone-b",)), ep(2, zones=(ZONE,))],
        [2],
        [],
        [2],
        True,
        PREFER_SAME_ZONE,
    ),
    "topology-ignored-when-nothing-ready": Case(
        CLUSTER, [terminating(1), terminating(2)], [1, 2], [], [1, 2], True
    ),
    "itp-local-ignores-topology": Case(
        ITP_LOCAL,
        [ep(1, zones=(ZONE,)), ep(2, local=True, zones=("zone-b",))],
        [],
        [2],
        [2],
        True,
    ),
    "etp-local-zone-filtered-cluster-merged-with-local": Case(
        ETP_LOCAL,
        [ep(1, zones=(ZONE,)), ep(2, local=True, zones=("zone-b",)), ep(3, zones=("zone-b",))],
        [1],
        [2],
        [1, 2],
        True,
        PREFER_SAME_ZONE,
    ),
    "etp-local-terminating-local-merged-with-cluster": Case(
        ETP_LOCAL, [ep(10), terminating(2, local=True), ep(3)], [10, 3], [2], [10, 2, 3], True
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_categorize_endpoints(case: Case) -> None:
    endpoints = sorted(case.endpoints, key=lambda e: e.address)
    result = categorize_endpoints(endpoints, case.port, case.node, case.zone)
    assert ips(result.cluster) == case.cluster
    assert ips(result.local) == case.local
    assert ips(result.reachable) == case.reachable
    assert [e.address for e in result.reachable] == sorted(e.address for e in result.reachable)
    assert result.has_any is case.has_any
    assert result.topology_mode == case.mode


@pytest.mark.parametrize(
    ("endpoints", "zone", "reason_part"),
    [
        pytest.param([ep(1, zones=(ZONE,)), ep(2)], ZONE, "no hint", id="missing-hint"),
        pytest.param([ep(1, zones=(ZONE,))], "", ZONE_LABEL, id="missing-zone-label"),
        pytest.param([ep(1, zones=("zone-b",))], ZONE, "zone-a", id="no-hint-for-zone"),
        pytest.param([ep(1, nodes=("node-b",))], ZONE, "node-a", id="no-hint-for-node"),
        pytest.param([terminating(1)], ZONE, "no ready", id="no-ready-endpoints"),
    ],
)
def test_reason_explains_ignored_hints(
    endpoints: list[Endpoint], zone: str, reason_part: str
) -> None:
    result = categorize_endpoints(endpoints, CLUSTER, NODE, zone)
    assert result.topology_mode == ""
    assert reason_part in result.topology_reason


def test_reason_is_empty_when_topology_applies() -> None:
    result = categorize_endpoints([ep(1, zones=(ZONE,))], CLUSTER, NODE, ZONE)
    assert (result.topology_mode, result.topology_reason) == (PREFER_SAME_ZONE, "")


@pytest.mark.parametrize(
    ("sp", "uses_cluster", "uses_local", "externally_accessible"),
    [
        pytest.param(CLUSTER, True, False, False, id="cluster"),
        pytest.param(ETP_LOCAL, True, True, True, id="etp-local-nodeport"),
        pytest.param(ETP_LOCAL_LB, True, True, True, id="etp-local-lb"),
        pytest.param(port(external_ips=("203.0.113.1",), external_policy_local=True), True, True,
                     True, id="etp-local-external-ip"),
        pytest.param(ETP_LOCAL_CLUSTER_IP_ONLY, True, False, False, id="etp-local-no-external"),
        pytest.param(ITP_LOCAL, False, True, False, id="itp-local"),
        pytest.param(ITP_LOCAL_ETP_CLUSTER, True, True, True, id="itp-local-etp-cluster"),
    ],
)  # fmt: skip
def test_policy_flags(
    sp: ServicePort, uses_cluster: bool, uses_local: bool, externally_accessible: bool
) -> None:
    assert sp.uses_cluster_endpoints is uses_cluster
    assert sp.uses_local_endpoints is uses_local
    assert sp.externally_accessible is externally_accessible


def test_proxy_state_categorize_uses_node_name_and_zone() -> None:
    endpoints = (ep(1, zones=(ZONE,)), ep(2, zones=("zone-b",)))
    state = ProxyState(
        IPV4,
        NodeInfo(name=NODE, labels={ZONE_LABEL: ZONE}),
        services={NAME: CLUSTER},
        endpoints={NAME: endpoints},
    )
    result = state.categorize(CLUSTER)
    assert result.topology_mode == PREFER_SAME_ZONE
    assert ips(result.cluster) == [1]
    assert state.endpoints_of(NAME) == endpoints
    assert state.endpoints_of(ServicePortName("shop", "other", "", "TCP")) == ()
    assert state.total_endpoints == 2
