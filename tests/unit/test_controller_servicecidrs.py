"""The service CIDRs of a running controller: ServiceCIDR objects (when the API server serves
them) or ``--service-cidr``, reaching ``Proxier.service_cidrs`` and forcing a full sync in
nftables mode. Dry-run controllers against the fake API server, through the official client."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.proxier import SyncResult
from minikproxy.testing.apiserver import FakeApiServer
from tests.helpers import wait_for
from tests.unit.api_objects import endpoint_slice, service, service_cidr
from tests.unit.dry_run import dry_run_controller

pytestmark = pytest.mark.timeout(60)

NODE = "node-1"
NODE_OBJECT = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": NODE},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]},
}


class Syncs:
    """Every sync's result, in order (the proxier's ``on_sync``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: list[SyncResult] = []

    def __call__(self, result: SyncResult) -> None:
        with self._lock:
            self.results.append(result)

    def since(self, start: int) -> list[SyncResult]:
        with self._lock:
            return self.results[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self.results)


Start = Callable[..., tuple[Controller, Syncs]]


def drop_rule(controller: Controller) -> list[str]:
    """The IPv4 table's "drop traffic to unallocated ClusterIPs" rule, as last compiled."""
    compiled = controller.proxier._families[IPV4].compiled
    assert compiled is not None
    return [line for line in compiled.render().splitlines() if line.endswith("} drop")]


def serve(server: FakeApiServer, tmp_path: Path) -> Path:
    server.create(NODE_OBJECT)
    server.create(service("web", "10.96.0.10"))
    server.create(endpoint_slice("web", "10.244.1.5"))
    return server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def start() -> Iterator[Start]:
    controllers: list[Controller] = []

    def start(kubeconfig: Path, **settings: Any) -> tuple[Controller, Syncs]:
        controller = dry_run_controller(kubeconfig, NODE, **settings)
        syncs = Syncs()
        controller.proxier.on_sync = syncs
        controller.start()
        controllers.append(controller)
        wait_for(lambda: len(syncs) >= 1, what="the first sync")
        return controller, syncs

    yield start
    for controller in controllers:
        controller.stop()


def test_servicecidr_objects_reach_the_proxier_and_force_full_syncs(
    tmp_path: Path, start: Start
) -> None:
    with FakeApiServer() as server:
        server.create(service_cidr("kubernetes", "10.96.0.0/16"))
        controller, syncs = start(serve(server, tmp_path), mode="nftables")
        proxier = controller.proxier
        wait_for(lambda: proxier.service_cidrs == ("10.96.0.0/16",), what="the first list")
        assert server.wait_for_watches(4)
        wait_for(lambda: syncs.since(0)[-1].ok, what="the syncs settled")
        wait_for(
            lambda: (
                drop_rule(controller)
                == ["add rule ip minikproxy cluster-ips-check ip daddr { 10.96.0.0/16 } drop"]
            ),
            what="the drop rule compiled",
        )

        def changed_to(cidrs: tuple[str, ...], act: Callable[[], Any]) -> None:
            """``act``, then wait for the CIDRs and for a full sync after them."""
            before = len(syncs)
            act()
            wait_for(lambda: proxier.service_cidrs == cidrs, what=f"service CIDRs {cidrs}")
            wait_for(lambda: any(s.full for s in syncs.since(before)), what="a full sync")

        obj = server.get("servicecidrs", "", "kubernetes")
        assert obj is not None
        dual = {**obj, "spec": {"cidrs": ["10.96.0.0/16", "fd00:96::/108"]}}
        changed_to(("10.96.0.0/16", "fd00:96::/108"), lambda: server.update(dual))
        changed_to(
            ("10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108"),
            lambda: server.create(service_cidr("extra", "10.100.0.0/24")),
        )
        changed_to(("10.100.0.0/24",), lambda: server.delete("servicecidrs", "", "kubernetes"))
        assert drop_rule(controller) == [
            "add rule ip minikproxy cluster-ips-check ip daddr { 10.100.0.0/24 } drop"
        ]
        # an endpoint change alone is a partial sync: the full ones above were the CIDRs'
        before = len(syncs)
        server.update(endpoint_slice("web", "10.244.1.6"))
        wait_for(lambda: len(syncs.since(before)) >= 1, what="the endpoint's sync")
        assert [s.full for s in syncs.since(before)] == [False]
        # a ServiceCIDR change that leaves the union alone syncs nothing
        extra = server.get("servicecidrs", "", "extra")
        assert extra is not None
        before = len(syncs)
        server.update({**extra, "metadata": {**extra["metadata"], "labels": {"a": "b"}}})
        server.update(endpoint_slice("web", "10.244.1.7"))
        wait_for(lambda: len(syncs.since(before)) >= 1, what="the next endpoint's sync")
        assert [s.full for s in syncs.since(before)] == [False]


def test_iptables_mode_keeps_them_without_resyncing(tmp_path: Path, start: Start) -> None:
    """kube-proxy's iptables mode ignores ServiceCIDRs: a change is stored, not synced."""
    with FakeApiServer() as server:
        controller, syncs = start(serve(server, tmp_path))
        proxier = controller.proxier
        assert server.wait_for_watches(4)
        before = len(syncs)
        server.create(service_cidr("kubernetes", "10.96.0.0/16"))
        wait_for(lambda: proxier.service_cidrs == ("10.96.0.0/16",), what="the ServiceCIDR")
        server.update(endpoint_slice("web", "10.244.1.6"))
        wait_for(lambda: len(syncs.since(before)) >= 1, what="the endpoint's sync")
        assert [s.full for s in syncs.since(before)] == [False]


def test_the_flag_overrides_and_servicecidrs_are_never_requested(
    tmp_path: Path, start: Start
) -> None:
    with FakeApiServer() as server:
        server.create(service_cidr("kubernetes", "10.96.0.0/16"))
        controller, syncs = start(
            serve(server, tmp_path), mode="nftables", service_cidrs=("10.0.0.0/16", "fd00::/108")
        )
        assert controller.service_cidr_source is None
        assert server.wait_for_watches(3)
        server.create(service_cidr("extra", "10.100.0.0/24"))
        server.update(endpoint_slice("web", "10.244.1.6"))
        wait_for(lambda: len(syncs) >= 2, what="the endpoint's sync")
        controller.stop()
        assert controller.proxier.service_cidrs == ("10.0.0.0/16", "fd00::/108")
        assert drop_rule(controller) == [
            "add rule ip minikproxy cluster-ips-check ip daddr { 10.0.0.0/16 } drop"
        ]
        seen = {(r.path, r.resource) for r in server.request_log}
        assert not [p for p, resource in seen if "networking.k8s.io" in p], seen
        assert {resource for _, resource in seen} == {"services", "endpointslices", "nodes"}


def test_an_api_server_without_servicecidrs_is_no_obstacle(tmp_path: Path, start: Start) -> None:
    """Before 1.33: the discovery document answers 404; the proxy runs without them, and the
    first sync never waited for them (kube-proxy's initialized gate is Services and
    EndpointSlices only)."""
    with FakeApiServer(unserved=["servicecidrs"]) as server:
        controller, syncs = start(serve(server, tmp_path), mode="nftables")
        assert syncs.since(0)[0].ok and syncs.since(0)[0].full
        source = controller.service_cidr_source
        assert source is not None
        wait_for(lambda: source.served is False, what="discovery")
        server.update(endpoint_slice("web", "10.244.1.6"))
        wait_for(lambda: len(syncs) >= 2, what="the endpoint's sync")
        assert controller.proxier.service_cidrs == ()
        networking = [
            (r.path.rstrip("/"), r.verb) for r in server.request_log if "networking" in r.path
        ]
        assert networking == [("/apis/networking.k8s.io/v1", "get")]
