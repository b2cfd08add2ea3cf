"""An etcd restore under a running (dry-run) controller: the store goes back to an older
resourceVersion, the watch cache answers the controller's newer one with 504 "Too large
resource version"; the controller lists from scratch, so a Service the restore removed
disappears from the rules and a Service created afterwards appears."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.testing.apiserver import FakeApiServer
from tests.helpers import wait_for
from tests.unit.api_objects import endpoint_slice, service
from tests.unit.dry_run import dry_run_controller

pytestmark = pytest.mark.timeout(60)

NODE = "node-1"


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(fresh_wait=0.2) as srv:
        srv.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        yield srv


@pytest.fixture
def controller(server: FakeApiServer, tmp_path: Path) -> Iterator[Controller]:
    ctl = dry_run_controller(server.write_kubeconfig(tmp_path / "kubeconfig"), NODE)
    ctl.start()
    yield ctl
    ctl.stop()


def programmed(controller: Controller) -> set[str]:
    """The Services (``ns/name``) whose ClusterIP rules the last sync compiled."""
    compiled = controller.proxier._families[IPV4].compiled
    if compiled is None:
        return set()
    text = compiled.render()
    return {name for name in ("default/kept", "default/undone", "default/new") if name in text}


def test_rules_follow_the_store_back_in_time(server: FakeApiServer, controller: Controller) -> None:
    server.create(service("kept", "10.96.0.10"))
    server.create(endpoint_slice("kept", "10.244.1.5"))
    wait_for(lambda: programmed(controller) == {"default/kept"}, what="the first Service")
    backup = server.resource_version
    server.create(service("undone", "10.96.0.11"))
    server.create(endpoint_slice("undone", "10.244.1.6"))
    wait_for(lambda: "default/undone" in programmed(controller), what="the second Service")
    assert server.wait_for_watches(4)  # services, slices, the Node, ServiceCIDRs

    before = len(server.request_log)
    server.rollback(backup)  # the restore: "undone" never existed
    wait_for(lambda: programmed(controller) == {"default/kept"}, what="the restore reconciled")

    def relisted() -> set[str]:
        return {r.resource for r in server.request_log[before:] if r.verb == "list"}

    # Each reflector lists from scratch on its own: the Service list alone already removes
    # "undone" from the rules, so wait for the EndpointSlice relist too.
    wait_for(lambda: relisted() >= {"services", "endpointslices"}, what="both kinds relisted")
    wait_for(lambda: server.watch_count == 4, what="the watches resumed")
    server.create(service("new", "10.96.0.12"))
    server.create(endpoint_slice("new", "10.244.1.7"))
    wait_for(lambda: programmed(controller) == {"default/kept", "default/new"}, what="new Service")
