"""End to end in ipvs mode (``ipvs``-marked: run in the VM by test_ipvs_vm.py): the controller
watches a fake API server and programs the node namespace over netlink; traffic from the client
namespace shows the result. Then ``cleanup`` removes everything, twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from minikproxy.dataplane.execer import RealExecer
from minikproxy.model.names import IPV4
from minikproxy.modes.leftovers import remove_ipvs_leftovers
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.ipvsload import ipvsadm_save, reset_ipvs
from minikproxy.testing.netns import Probe, Topology

from ..helpers import wait_for
from .cluster_objects import NODE_OBJ, endpoint_slice, service, start_controller

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]

BACKENDS = ["10.10.2.2", "10.10.2.3", "10.10.2.4"]
VIP = "10.96.0.10"


@pytest.fixture
def api(topology: Topology) -> Iterator[FakeApiServer]:
    topology.serve_backends(8080, protos=("tcp",), family=IPV4)
    reset_ipvs(topology.namespaces["node"])
    with FakeApiServer() as server:
        server.create(NODE_OBJ)
        yield server


def lands(topo: Topology, count: int = 30) -> set[str]:
    results = topo.connect_many([Probe(VIP, 80, "tcp")] * count, timeout=2.0)
    return {r.server_ip for r in results if r.ok}


def test_service_lifecycle_then_cleanup_twice(
    topology: Topology, api: FakeApiServer, tmp_path: Path
) -> None:
    netns = topology.namespaces["node"]
    execer = RealExecer(netns)
    controller = start_controller(
        api.write_kubeconfig(tmp_path / "kubeconfig"), execer, mode="ipvs"
    )
    try:
        api.create(service("web", VIP))
        api.create(endpoint_slice("web", BACKENDS))
        wait_for(lambda: lands(topology) == set(BACKENDS), timeout=60, what="all backends")
        assert f"-A -t {VIP}:80 -s rr" in ipvsadm_save(netns)
        api.update(endpoint_slice("web", ["10.10.2.3"]))
        wait_for(lambda: lands(topology) == {"10.10.2.3"}, timeout=60, what="one backend left")
        registry = controller.metrics.registry

        def partial_syncs() -> float:
            name = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            return registry.get_sample_value(name) or 0.0

        # The kernel changes before the sync records its duration: wait for that too.
        wait_for(lambda: partial_syncs() > 0, timeout=60, what="a partial sync recorded")
        api.delete("services", "default", "web")
        wait_for(
            lambda: topology.connect(VIP, 80, timeout=0.5).outcome == "unreachable",
            timeout=60,
            what="the VIP gone with its Service",
        )
        assert VIP not in topology.node_exec(["ip", "-o", "addr"]).stdout
    finally:
        controller.stop()
    removed = remove_ipvs_leftovers(RealExecer(netns))
    assert "link kube-ipvs0" in removed
    assert ipvsadm_save(netns) == ""
    assert "KUBE-" not in topology.node_exec(["iptables-save"]).stdout
    assert "KUBE-" not in topology.node_exec(["ipset", "list", "-n"]).stdout
    assert remove_ipvs_leftovers(RealExecer(netns)) == []
