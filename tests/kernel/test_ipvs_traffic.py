"""Real traffic through IPVS mode: render's four sections loaded with ipset restore, ipvsadm -R,
ip addr add and iptables-restore into the node namespace of an IPVS kernel.

Marked ``ipvs``: this machine's kernel has no IPVS, so these run inside the VM that
``test_ipvs_vm.py`` boots (``scripts/ipvs-vm.sh``); elsewhere they skip saying so. The node is
``node-1`` at 10.10.1.1; backends 10.10.2.2-4 are pods (cluster CIDR 10.10.2.0/24), so the
client 10.10.1.2 is off-cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import load_manifests
from minikproxy.testing.ipvsload import ipvsadm_save, load_ipvs
from minikproxy.testing.netns import Topology

from .traffic import (
    BACKENDS,
    NODE_IP,
    SHARED_SCENARIOS,
    Load,
    landings,
    payload,
    scenario_id,
    service,
    slice_,
)

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]

DATA = Path(__file__).parent.parent / "data"
POD_CIDR = "10.10.2.0/24"


def load(topo: Topology, objs: list[Any], family: IPFamily = IPV4, **config: Any) -> None:
    config.setdefault("cluster_cidr", f"{POD_CIDR},fd00:10:2::/64")
    text = payload(objs, family, mode="ipvs", **config)
    load_ipvs(topo.namespaces["node"], text, family)


def loader(topo: Topology) -> Load:
    def run(objs: list[Any], family: IPFamily, cluster_cidr: str) -> None:
        load(topo, objs, family, cluster_cidr=cluster_cidr)

    return run


@pytest.mark.parametrize("scenario", SHARED_SCENARIOS, ids=scenario_id)
def test_shared_scenarios(topo: Topology, scenario: Callable[[Topology, Load], None]) -> None:
    scenario(topo, loader(topo))


def test_render_loads_and_reads_back_identically(shared_topology: Topology) -> None:
    """kube-proxy's overall test cluster: every section loads; ipvsadm -S gives the same
    virtual and real servers back."""
    objects = load_manifests([str(DATA / "overall-cluster.yaml")], [])
    config = ProxyConfig(mode="ipvs", cluster_cidr="10.0.0.0/8", ipvs_scheduler="mh")
    result = render_objects(objects, config, families=(IPV4,), node_addresses=("192.168.0.2",))
    netns = shared_topology.namespaces["node"]
    sections = load_ipvs(netns, result.payloads[IPV4])
    assert sorted(ipvsadm_save(netns).splitlines()) == sorted(sections["ipvs"].splitlines())
    saved = shared_topology.node_exec(["ipset", "save"]).stdout
    for line in sections["ipset"].splitlines():
        if line.startswith("add "):
            assert line in saved


def test_cluster_ip_masquerades_off_cluster_clients_only(topo: Topology) -> None:
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    load(topo, objs)
    assert set(landings(topo, "10.96.0.10", 80, 30)) == set(BACKENDS)
    result = topo.connect("10.96.0.10", 80)
    assert result.ok and topo.masqueraded(result)
    load(topo, objs, cluster_cidr="10.10.0.0/16")  # the client is now a "pod"
    result = topo.connect("10.96.0.10", 80)
    assert result.ok and not topo.masqueraded(result)
    # KUBE-IPVS-FILTER: other ports of a bound address are rejected (#72236)
    assert topo.connect("10.96.0.10", 81).outcome == "refused"


def test_load_balancer_source_ranges(topo: Topology) -> None:
    def lb(ranges: list[str]) -> list[Any]:
        svc = service(
            "lb",
            "10.96.0.30",
            type="LoadBalancer",
            loadBalancerSourceRanges=ranges,
            port_extra={"nodePort": 30030},
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.30"}]}},
        )
        return [svc, slice_("lb", BACKENDS)]

    load(topo, lb(["10.10.1.0/24"]))
    assert topo.connect("203.0.113.30", 80).ok
    load(topo, lb(["192.0.2.0/24"]))
    assert topo.connect("203.0.113.30", 80, timeout=1.0).outcome == "timeout"
    assert topo.connect("10.96.0.30", 80).ok  # the cluster IP is not filtered


def test_session_affinity_sticks_to_one_backend(topo: Topology) -> None:
    svc = service(
        "sticky",
        "10.96.0.50",
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
    )
    load(topo, [svc, slice_("sticky", BACKENDS)])
    assert len(landings(topo, "10.96.0.50", 80, 12)) == 1


def test_internal_policy_local(topo: Topology) -> None:
    svc = service("itp", "10.96.0.60", internalTrafficPolicy="Local")
    load(topo, [svc, slice_("itp", BACKENDS, local=("10.10.2.4",))])
    assert set(landings(topo, "10.96.0.60", 80, 12)) == {"10.10.2.4"}
    assert topo.connect(NODE_IP, 80).outcome in ("refused", "timeout", "unreachable")


def test_nodeport_is_masqueraded(topo: Topology) -> None:
    """A NodePort reached on the node IP is masqueraded (KUBE-NODE-PORT-TCP)."""
    svc = service("np", "10.96.0.70", type="NodePort", port_extra={"nodePort": 30070})
    load(topo, [svc, slice_("np", BACKENDS)])
    result = topo.connect(NODE_IP, 30070)
    assert result.ok and topo.masqueraded(result)
