"""End to end: the controller watches a fake API server through the real ``kubernetes`` client
and programs the node netns of a test topology; connections from the client netns show what
the kernel does. The controller runs in this process; its iptables commands run inside the node
namespace, and its netlink sockets (conntrack, addresses) are opened there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from minikproxy.controller import Controller
from minikproxy.dataplane.execer import ExecResult, RealExecer
from minikproxy.model.names import IPV4
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Topology

from ..helpers import wait_for
from .cluster_objects import endpoint_slice, service
from .controller_harness import BACKENDS, VIP, ControllerHarness, running_harness, syncs

pytestmark = pytest.mark.kernel


class FlakyExecer(RealExecer):
    """Runs commands in the node netns; when armed, corrupts the next iptables-restore input
    so the real tool rejects it (and must leave the old rules in place). Any other restore
    waits while ``restores`` is clear, so a test can look at the kernel before a repair."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.break_next_restore = False
        self.failed_restores = 0
        self.restores = threading.Event()
        self.restores.set()

    def run(
        self, argv: Any, *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        if "restore" in argv[0] and stdin:
            if self.break_next_restore:
                self.break_next_restore = False
                broken = stdin.replace(
                    b"COMMIT\n", b"-A KUBE-SERVICES -j NO-SUCH-CHAIN\nCOMMIT\n", 1
                )
                result = super().run(argv, stdin=broken, timeout=timeout)
                self.failed_restores += 1
                return result
            self.restores.wait()
        return super().run(argv, stdin=stdin, timeout=timeout)


class Harness(ControllerHarness):
    """The shared harness in iptables mode, over a :class:`FlakyExecer` (:attr:`execer`)."""

    def __init__(self, topo: Topology, api: FakeApiServer, kubeconfig: Path) -> None:
        super().__init__(topo, api, kubeconfig)
        self.execer = FlakyExecer(topo.namespaces["node"])

    def new_execer(self) -> FlakyExecer:
        if self.execer.closed:  # a stopped controller closed it
            self.execer = FlakyExecer(self.topo.namespaces["node"])
        return self.execer

    def start(self, **config: Any) -> Controller:
        return super().start(mode="iptables", **config)

    def stop(self) -> None:
        self.execer.restores.set()
        super().stop()


@pytest.fixture
def harness(topology: Topology, tmp_path: Path) -> Iterator[Harness]:
    topology.serve_backends(8080, protos=("tcp", "udp"), family=IPV4)
    with running_harness(Harness, topology, tmp_path) as harness:
        yield harness


def test_service_lifecycle_scaling_and_deletion(harness: Harness) -> None:
    api = harness.api
    harness.start()
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic on all backends")

    api.update(endpoint_slice("web", ["10.10.2.3"]))
    wait_for(lambda: harness.lands() == {"10.10.2.3"}, what="scaled down to one backend")

    api.update(endpoint_slice("web", []))
    wait_for(lambda: harness.outcome() == "refused", what="REJECT without endpoints")

    api.delete("services", "default", "web")
    wait_for(lambda: harness.outcome() == "unreachable", what="no rules for a deleted service")
    controller = harness.controller
    assert controller is not None and controller.proxier.last_sync is not None
    assert not controller.proxier.last_sync.full  # changes after the first go partial


def test_external_traffic_policy_local(harness: Harness) -> None:
    api = harness.api
    harness.start()
    svc = service(
        "local", "10.96.0.20", type="NodePort", externalTrafficPolicy="Local",
        port_extra={"nodePort": 30020},
    )  # fmt: skip
    api.create(svc)
    api.create(endpoint_slice("local", BACKENDS, local=("10.10.2.4",)))
    wait_for(lambda: harness.lands("10.10.1.1", 30020) == {"10.10.2.4"}, what="local endpoint")
    result = harness.topo.connect("10.10.1.1", 30020)
    assert not harness.topo.masqueraded(result)
    api.update(endpoint_slice("local", BACKENDS))  # no local endpoint left: DROP
    wait_for(lambda: harness.outcome("10.10.1.1", 30020) == "timeout", what="DROP")


def test_restart_keeps_connections_working(harness: Harness) -> None:
    api = harness.api
    harness.start()
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")
    harness.stop()
    assert harness.lands() == set(BACKENDS)  # rules left in place while the proxy is down
    controller = harness.start()
    assert harness.lands() == set(BACKENDS)
    # Not last_sync: a late Node event may already have caused a second, partial sync.
    wait_for(lambda: syncs(controller, "full") + syncs(controller, "partial") > 0, what="a sync")
    assert syncs(controller, "full") == 1, "the first sync after a restart is full"
    assert harness.lands() == set(BACKENDS)


def test_failed_restore_keeps_old_rules_then_recovers(harness: Harness) -> None:
    api = harness.api
    controller = harness.start()
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")

    harness.execer.break_next_restore = True
    harness.execer.restores.clear()  # the retry (1 s later) waits until the rules are checked
    api.update(endpoint_slice("web", ["10.10.2.2"]))
    wait_for(lambda: harness.execer.failed_restores == 1, what="the broken restore")
    assert harness.lands() == set(BACKENDS)  # the old rules are intact
    harness.execer.restores.set()
    wait_for(lambda: harness.lands() == {"10.10.2.2"}, what="retry with a full sync")
    assert controller.metrics.iptables_restore_failures_total._value.get() == 1
    assert controller.metrics.iptables_partial_restore_failures_total._value.get() == 1


def test_external_flush_is_repaired(harness: Harness) -> None:
    api = harness.api
    harness.start(sync_period=0.5)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")
    # The canary is checked every 0.5 s: flush in one transaction (a check must not see a
    # half-flushed node), and hold the repair until the breakage is seen. Waiting is needed
    # even so: the upstream netns rate-limits its no-route ICMP errors (5, then 1 per second).
    harness.execer.restores.clear()
    harness.topo.load_iptables("*nat\nCOMMIT\n*filter\nCOMMIT\n*mangle\nCOMMIT\n")
    wait_for(lambda: harness.outcome() == "unreachable", what="the flush to break traffic")
    harness.execer.restores.set()
    wait_for(lambda: harness.lands() == set(BACKENDS), what="canary noticed, full resync")


def test_udp_flows_follow_serving_endpoints_deleted_services_and_restarts(
    harness: Harness,
) -> None:
    """Live flows to an endpoint that is terminating but still serving stay; once it stops
    serving they go; a deleted Service's flows go; flows to an endpoint removed, and to a
    Service deleted, while the controller was down go at its first sync after the restart."""
    api, dns = harness.api, "10.96.0.53"
    controller = harness.start()
    api.create(service("dns", dns, proto="UDP"))
    api.create(endpoint_slice("dns", ["10.10.2.2"], proto="UDP"))
    wait_for(lambda: harness.lands(dns, proto="udp") == {"10.10.2.2"}, what="udp")

    def flows_to(ip: str, vip: str = dns) -> int:
        return harness.udp_flows(ip, vip)

    def reconciles(ctl: Controller) -> float:
        name = "kubeproxy_conntrack_reconciler_sync_duration_seconds_count"
        return ctl.metrics.registry.get_sample_value(name, {"ip_family": "IPv4"}) or 0.0

    def set_endpoints(*conditions: tuple[str, bool, bool]) -> None:
        obj = endpoint_slice("dns", [ip for ip, _, _ in conditions], proto="UDP")
        for endpoint, (_, ready, serving) in zip(obj["endpoints"], conditions, strict=True):
            endpoint["conditions"] = {"ready": ready, "serving": serving, "terminating": not ready}
        api.update(obj)

    set_endpoints(("10.10.2.2", False, True), ("10.10.2.3", True, True))
    wait_for(lambda: harness.lands(dns, proto="udp") == {"10.10.2.3"}, what="rules to .3 only")
    live = flows_to("10.10.2.2")  # no new flow goes to .2 from now on
    # A reconcile that ends from now on saw the new state: queue one and wait for it.
    done = reconciles(controller)
    controller.proxier.sync()
    wait_for(lambda: reconciles(controller) > done, what="a reconcile after the update")
    assert live > 0 and flows_to("10.10.2.2") == live  # terminating but serving: they stay

    set_endpoints(("10.10.2.2", False, False), ("10.10.2.3", True, True))
    wait_for(lambda: flows_to("10.10.2.2") == 0, what="flows to the no longer serving endpoint")
    assert flows_to("10.10.2.3") > 0

    api.delete("services", "default", "dns")
    api.delete("endpointslices", "default", "dns-1")
    wait_for(lambda: flows_to("10.10.2.3") == 0, what="the deleted Service's flows deleted")

    api.create(service("dns2", "10.96.0.54", proto="UDP"))
    api.create(endpoint_slice("dns2", ["10.10.2.2", "10.10.2.4"], proto="UDP"))
    wait_for(
        lambda: harness.lands("10.96.0.54", proto="udp") == {"10.10.2.2", "10.10.2.4"},
        what="dns2 reaches both endpoints",
    )
    assert flows_to("10.10.2.4", "10.96.0.54") > 0
    api.create(service("dns3", "10.96.0.55", proto="UDP"))
    api.create(endpoint_slice("dns3", ["10.10.2.3"], proto="UDP"))
    wait_for(lambda: harness.lands("10.96.0.55", proto="udp") == {"10.10.2.3"}, what="dns3")
    harness.stop()
    api.update(endpoint_slice("dns2", ["10.10.2.2"], proto="UDP"))
    api.delete("services", "default", "dns3")
    api.delete("endpointslices", "default", "dns3-1")
    harness.start()
    wait_for(lambda: flows_to("10.10.2.4", "10.96.0.54") == 0, what="a restart heals")
    # dns3 was deleted while the controller was down: the rules it found name it.
    wait_for(lambda: flows_to("10.10.2.3", "10.96.0.55") == 0, what="deleted while down")
    assert flows_to("10.10.2.2", "10.96.0.54") > 0
