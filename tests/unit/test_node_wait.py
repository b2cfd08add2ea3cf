"""The Node gate: when the configuration depends on this node's Node object (NodeCIDR
local detection, ``nodePortAddresses: [primary]``), the first sync waits for it, saying so
again and again; a missing Node is always reported. Dry-run controllers against the fake
API server, through the official client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.testing.apiserver import FakeApiServer
from tests.helpers import wait_for
from tests.unit.api_objects import endpoint_slice
from tests.unit.dry_run import dry_run_controller

pytestmark = pytest.mark.timeout(60)

NODE = "node-1"
WAITING = "waiting for the Node before the first sync: "
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "type": "NodePort",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "p", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
    },
}
SLICE = endpoint_slice("web", "10.244.1.5")


def node(pod_cidrs: list[str] | None = None) -> dict[str, Any]:
    spec = {"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs} if pod_cidrs else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "spec": spec,
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]},
    }


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    with FakeApiServer() as server:
        server.create(SERVICE)
        server.create(SLICE)
        server.create({**node(), "metadata": {"name": "node-2"}})  # some other node
        yield server, server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def start(api: tuple[FakeApiServer, Path]) -> Iterator[Any]:
    controllers: list[Controller] = []

    def start(**settings: Any) -> Controller:
        controller = dry_run_controller(api[1], NODE, **settings)
        controller.node_wait_log_interval = 0.05
        controller.start()
        controllers.append(controller)
        return controller

    yield start
    for controller in controllers:
        controller.stop()


def messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def rules(controller: Controller) -> list[str]:
    compiled = controller.proxier._families[IPV4].compiled
    assert compiled is not None
    return compiled.render().splitlines()


def nodeport_jumps(lines: list[str]) -> list[str]:
    """The destination match of each KUBE-SERVICES -> KUBE-NODEPORTS jump ("" if none)."""
    jumps = [
        line for line in lines
        if line.startswith("-A KUBE-SERVICES ") and line.endswith("-j KUBE-NODEPORTS")
    ]  # fmt: skip
    return [" ".join(line.split()[-4:-2]) if " -d " in line else "" for line in jumps]


def test_node_dependent_configuration_waits_for_the_node(
    api: tuple[FakeApiServer, Path], start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minikproxy")
    server, _ = api
    controller = start(detect_local_mode="NodeCIDR", nodeport_addresses=("primary",))
    missing = (
        f"{WAITING}Node '{NODE}' does not exist (is --hostname-override or $NODE_NAME right?) "
        "and detectLocalMode NodeCIDR (the Node's spec.podCIDRs) depends on it"
    )
    wait_for(lambda: messages(caplog, WAITING).count(missing) >= 3, what="repeated waiting logs")
    assert controller.proxier.last_sync is None, "synced without the Node"

    server.create(node())  # exists, but no pod CIDRs assigned yet
    no_cidrs = (
        f"{WAITING}Node '{NODE}' has no spec.podCIDRs yet and detectLocalMode NodeCIDR "
        "(the Node's spec.podCIDRs) depends on it"
    )
    wait_for(lambda: messages(caplog, WAITING).count(no_cidrs) >= 2, what="podCIDR waiting logs")
    assert controller.proxier.last_sync is None, "synced without the Node's pod CIDRs"

    server.update(node(["10.244.1.0/24"]))
    wait_for(lambda: controller.proxier.last_sync is not None, what="the first sync")
    assert controller.proxier.last_sync.ok
    lines = rules(controller)
    assert nodeport_jumps(lines) == ["-d 192.168.5.1"]
    masq = [line for line in lines if "KUBE-MARK-MASQ" in line and "! -s 10.244.1.0/24" in line]
    assert masq, "no masquerade rule for traffic from outside the node's pod CIDR"
    assert f"Node '{NODE}' now exists" in caplog.messages


def test_primary_nodeport_addresses_wait_for_the_node(
    api: tuple[FakeApiServer, Path], start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minikproxy")
    server, _ = api
    controller = start(cluster_cidr="10.244.0.0/16", nodeport_addresses=("primary",))
    wait_for(lambda: len(messages(caplog, WAITING)) >= 2, what="waiting logs")
    assert (
        "nodePortAddresses: [primary] (the Node's addresses) depends on it"
        in (messages(caplog, WAITING)[-1])
    )
    assert controller.proxier.last_sync is None
    server.create(node())  # no pod CIDRs needed here
    wait_for(lambda: controller.proxier.last_sync is not None, what="the first sync")
    assert nodeport_jumps(rules(controller)) == ["-d 192.168.5.1"]


def test_a_missing_node_is_reported_even_when_nothing_depends_on_it(
    api: tuple[FakeApiServer, Path], start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minikproxy")
    server, _ = api
    controller = start(cluster_cidr="10.244.0.0/16")
    wait_for(lambda: controller.proxier.last_sync is not None, what="the first sync")
    missing = (
        f"Node '{NODE}' not found: its addresses, zone and pod CIDRs are unknown (is "
        "--hostname-override or $NODE_NAME right?)"
    )
    # The first sync does not wait for the Node list here: the warning may come after it.
    wait_for(
        lambda: missing in [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING],
        what="the missing Node reported",
    )
    assert not messages(caplog, WAITING)
    server.create(node())
    wait_for(lambda: f"Node '{NODE}' now exists" in caplog.messages, what="the Node noticed")
    server.delete("nodes", "", NODE)
    wait_for(
        lambda: any(
            m.startswith(f"this node's Node '{NODE}' was deleted") for m in caplog.messages
        ),
        what="the deletion warning",
    )


def test_health_is_judged_from_the_start(tmp_path: Path) -> None:
    """kube-proxy marks every family updated when its sync loop starts: a first sync that
    never comes (here the API server is down) turns /healthz unhealthy after the timeout
    instead of leaving the families unjudged, which reads as healthy."""
    with FakeApiServer() as server, server.outage():
        ctl = dry_run_controller(server.write_kubeconfig(tmp_path / "kubeconfig"), NODE)
        ctl.start()
        try:
            _, body = ctl.health.health()
            assert body["status"] == {IPV4: {"lastUpdated": body["lastUpdated"], "healthy": True}}
            assert ctl.proxier.last_sync is None  # nothing synced: the clock started anyway
        finally:
            ctl.stop()
