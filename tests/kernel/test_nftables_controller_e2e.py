"""End to end in nftables mode: the controller watches a fake API server through the real
``kubernetes`` client and programs the node netns of a test topology through its long-lived
libnftables context, in both layouts (``flat``: our ``minikproxy`` table; ``kube-proxy``:
kube-proxy's ``kube-proxy`` table); connections from the client netns show what the kernel
does. The twin of test_controller_e2e.py (iptables mode; both on the shared harness of
controller_harness.py, whose scenarios alike in every mode are in
test_controller_modes_e2e.py), plus what only nftables mode has:
element-only updates, the table canary, mode and layout switches, the nftables cleanup,
ClientIP affinity across full syncs, UDP flows of Services deleted while the proxy was down,
and one table per family.

The tests share one topology (conftest's ``topo``: rules and conntrack reset before each test,
probe servers on every backend's port 8080)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from minikproxy.controller import Controller
from minikproxy.dataplane.libnftables import NftContext
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.healthz import HealthzServer
from minikproxy.metrics import MetricsServer
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.modes.nftables import NftablesMode
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Probe, Topology

from ..helpers import wait_for
from .cluster_objects import endpoint_slice, service
from .controller_harness import BACKENDS, VIP, ControllerHarness, running_harness, syncs
from .test_metrics_health_e2e import http_get, samples, value

pytestmark = pytest.mark.kernel

NODE_IP = "10.10.1.1"  # NODE_OBJ's InternalIP: nftables mode's NodePort address (primary)
TABLES = {"flat": "minikproxy", "kube-proxy": "kube-proxy"}
LAYOUTS = pytest.mark.parametrize("layout", list(TABLES))


class ScriptTap:
    """Wraps an applier's libnftables context: records every script it runs, can corrupt the
    next transaction (nft must reject it whole, leaving the old rules), and holds every other
    transaction while ``open`` is clear, so a test can look at the kernel before a repair."""

    def __init__(self, applier: NftablesApplier, table: str) -> None:
        self.table = table
        self.scripts: list[str] = []
        self.break_next = False
        self.rejected = 0
        self.open = threading.Event()
        self.open.set()
        self._run = applier.context.run
        applier.context.run = self.run  # type: ignore[method-assign]

    def run(self, script: str, *, json: bool = False) -> str:
        if json:  # a read (list tables)
            return self._run(script, json=json)
        if self.break_next:
            self.break_next = False
            self.rejected += 1
            broken = script + f"add rule ip {self.table} nat-prerouting jump no-such-chain\n"
            return self._run(broken)
        self.open.wait()
        self.scripts.append(script)
        return self._run(script)


class Harness(ControllerHarness):
    """The shared harness, in nftables mode by default, tapping each nftables-mode
    controller's libnftables context (:attr:`tap`) before its first sync."""

    def __init__(self, topo: Topology, api: FakeApiServer, kubeconfig: Path) -> None:
        super().__init__(topo, api, kubeconfig)
        self.tap: ScriptTap | None = None
        self._layout = "flat"

    def start(
        self,
        layout: str = "flat",
        mode: str = "nftables",
        families: Sequence[IPFamily] = (IPV4,),
        **config: Any,
    ) -> Controller:
        """Start a controller (``mode`` and ``layout``) programming the node netns."""
        self.tap, self._layout = None, layout
        return super().start(mode=mode, layout=layout, families=families, **config)

    def before_start(self, controller: Controller) -> None:
        if isinstance(controller.mode, NftablesMode):
            assert controller.mode.applier is not None
            self.tap = ScriptTap(controller.mode.applier, TABLES[self._layout])

    def stop(self) -> None:
        if self.tap is not None:
            self.tap.open.set()
        super().stop()

    def tables(self) -> set[str]:
        """The node's nftables tables, as ``family name``."""
        listed = json.loads(self.topo.node_exec(["nft", "-j", "list", "tables"]).stdout)
        return {
            f"{item['table']['family']} {item['table']['name']}"
            for item in listed["nftables"]
            if "table" in item
        }


def counted_first_sync(controller: Controller) -> float:
    """Wait until the first (full) sync is counted (after the kernel has its rules: a test
    that saw traffic may be early) and no other full sync was; return that count, 1."""
    wait_for(lambda: syncs(controller, "full") > 0, what="the first sync counted")
    assert syncs(controller, "full") == 1
    return 1.0


def force_full_sync(controller: Controller) -> None:
    """Make the controller run a full sync now and wait until it is counted."""
    full = syncs(controller, "full")
    controller.proxier.force_full_sync("test")
    wait_for(lambda: syncs(controller, "full") > full, what="a forced full sync")


def nft_failures(controller: Controller) -> float:
    """``kubeproxy_sync_proxy_rules_nftables_sync_failures_total``."""
    name = "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
    return controller.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def harness(topo: Topology, tmp_path: Path) -> Iterator[Harness]:
    with running_harness(Harness, topo, tmp_path) as harness:
        yield harness


def element_only(script: str) -> bool:
    """Whether every command of ``script`` adds or deletes set or map elements."""
    lines = [line for line in script.splitlines() if line.strip()]
    return bool(lines) and all(
        line.startswith(("add element ", "delete element ")) for line in lines
    )


@LAYOUTS
def test_service_lifecycle_with_partial_syncs(harness: Harness, layout: str) -> None:
    """Service and EndpointSlice, scale down, an endpoint replaced (flat: elements only),
    no endpoints (REJECT), Service deleted; every sync after the first is partial."""
    api = harness.api
    controller = harness.start(layout)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic on all backends")
    counted_first_sync(controller)
    partial = syncs(controller, "partial")

    api.update(endpoint_slice("web", ["10.10.2.3"]))
    wait_for(lambda: harness.lands() == {"10.10.2.3"}, what="scaled down to one backend")

    # One endpoint replaced by another: for the flat layout an element update, no more.
    tap = harness.tap
    assert tap is not None
    sent = len(tap.scripts)
    api.update(endpoint_slice("web", ["10.10.2.4"]))
    wait_for(lambda: harness.lands() == {"10.10.2.4"}, what="the endpoint moved")
    moved = tap.scripts[sent:]
    if layout == "flat":
        assert moved and all(element_only(script) for script in moved), moved

    api.update(endpoint_slice("web", []))
    wait_for(lambda: harness.outcome() == "refused", what="REJECT without endpoints")

    api.delete("services", "default", "web")
    wait_for(lambda: harness.outcome() == "unreachable", what="no rules for a deleted service")
    # Counted when the sync ends, after the kernel has the rules the traffic just showed.
    wait_for(lambda: syncs(controller, "partial") >= partial + 4, what="4 partial syncs counted")
    assert syncs(controller, "full") == 1, "every change after the first sync is partial"
    assert controller.proxier.last_sync is not None and controller.proxier.last_sync.ok


@LAYOUTS
def test_nodeport_external_traffic_policy_local(harness: Harness, layout: str) -> None:
    """NodePorts answer on the node's primary IP (the Node's InternalIP, nftables mode's
    default); without a local endpoint, external traffic is dropped."""
    api = harness.api
    harness.start(layout)
    svc = service(
        "local", "10.96.0.20", type="NodePort", externalTrafficPolicy="Local",
        port_extra={"nodePort": 30020},
    )  # fmt: skip
    api.create(svc)
    api.create(endpoint_slice("local", BACKENDS, local=("10.10.2.4",)))
    wait_for(lambda: harness.lands(NODE_IP, 30020) == {"10.10.2.4"}, what="local endpoint")
    result = harness.topo.connect(NODE_IP, 30020)
    assert result.ok and not harness.topo.masqueraded(result)
    assert harness.lands("10.96.0.20") == set(BACKENDS)  # the ClusterIP stays Cluster
    api.update(endpoint_slice("local", BACKENDS))  # no local endpoint left: DROP
    wait_for(lambda: harness.outcome(NODE_IP, 30020) == "timeout", what="DROP")


#: A cluster CIDR that holds the client: its connections to ClusterIPs are not masqueraded.
#: A Prober's thousands of connections a second through SNAT make the backends hold
#: TIME_WAIT sockets for source ports the node's conntrack no longer remembers (the client
#: reusing its port ends the old entry early); a new connection SNATed to one of them is
#: reset by the backend, whatever the rules. Tests of connection continuity avoid SNAT.
UNMASQUERADED = "10.10.0.0/16"


def assert_always_served(outcomes: Sequence[str]) -> None:
    """Every probe met rules: none ``unreachable`` (no rules: no route) nor timed out, which
    is what removing the old mode's state before the first sync gives. Tolerated: a rare
    immediate ``refused``. In about half the switch runs on a loaded machine, one to four of
    some hundreds of probes are rejected while both rule sets are present. An nft trace of
    one: its SYN passed both NAT chains (ours first), each ran its ``dnat`` with verdict
    accept, yet it left prerouting with the ClusterIP as destination, and our table's
    ``cluster-ips-check`` rejected it. It has not been seen in a restart in one mode, nor
    with the same two rule sets loaded by hand; why the DNAT did not take is not known."""
    failed = [outcome for outcome in outcomes if outcome != "ok"]
    assert set(failed) <= {"refused"}, failed
    assert len(failed) * 50 <= len(outcomes), f"{len(failed)} of {len(outcomes)}: {failed}"


class Prober:
    """Connects to ``dst`` again and again from the client netns, in a thread, until
    stopped; keeps every outcome."""

    def __init__(self, topo: Topology, dst: str, port: int = 80) -> None:
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(topo, dst, port), daemon=True)
        self._thread.start()

    def _loop(self, topo: Topology, dst: str, port: int) -> None:
        while not self._stop.is_set():
            results = topo.connect_many([Probe(dst, port, "tcp")] * 4, timeout=1.0)
            self.outcomes += [r.outcome for r in results]

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.outcomes


@LAYOUTS
def test_restart_without_a_failed_connection(harness: Harness, layout: str) -> None:
    """A client probing the ClusterIP all the time never fails while the controller is
    stopped and started again: the table stays, and the first sync (full) replaces it in
    one transaction."""
    api = harness.api
    harness.start(layout, cluster_cidr=UNMASQUERADED)  # continuity: no SNAT (see there)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")
    prober = Prober(harness.topo, VIP)
    try:
        wait_for(lambda: len(prober.outcomes) >= 8, what="probes before the restart")
        harness.stop()
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes while stopped")
        controller = harness.start(layout, cluster_cidr=UNMASQUERADED)
        wait_for(lambda: syncs(controller, "full") > 0, what="the first sync after the restart")
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes after the restart")
    finally:
        outcomes = prober.stop()
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"]
    tap = harness.tap
    assert tap is not None and tap.scripts, "the restarted controller applied nothing"
    assert tap.scripts[0].startswith(f"add table ip {TABLES[layout]}")  # a full replace
    assert syncs(controller, "full") == 1, "the first sync after a restart is full"
    assert harness.lands() == set(BACKENDS)


@LAYOUTS
def test_rejected_transaction_keeps_old_rules_then_recovers(
    harness: Harness, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint replaced (for the flat layout an element-only transaction) in a transaction
    nft rejects: the old rules stay, the failure is counted and the retry is a full sync."""
    api = harness.api
    controller = harness.start(layout)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", ["10.10.2.2", "10.10.2.3"]))
    wait_for(lambda: harness.lands() == {"10.10.2.2", "10.10.2.3"}, what="traffic")
    full = counted_first_sync(controller)
    tap = harness.tap
    assert tap is not None

    tap.break_next = True
    tap.open.clear()  # the retry (backoff 1 s) waits until the old rules are checked
    api.update(endpoint_slice("web", ["10.10.2.2", "10.10.2.4"]))
    wait_for(lambda: nft_failures(controller) == 1, what="the rejected transaction counted")
    assert tap.rejected == 1
    assert harness.lands() == {"10.10.2.2", "10.10.2.3"}  # the old rules are intact
    assert any("no-such-chain" in r.getMessage() for r in caplog.records), "offending line"
    retries = len(tap.scripts)
    tap.open.set()
    wait_for(lambda: harness.lands() == {"10.10.2.2", "10.10.2.4"}, what="the retry")
    assert tap.scripts[retries].startswith(f"add table ip {TABLES[layout]}")  # a full sync
    wait_for(lambda: syncs(controller, "full") == full + 1, what="the full retry counted")
    assert nft_failures(controller) == 1


@LAYOUTS
@pytest.mark.parametrize("tamper", ["delete", "flush"])
def test_tampered_table_is_repaired(harness: Harness, layout: str, tamper: str) -> None:
    """Someone deletes or flushes our table: the canary (checked every sync period) notices
    and a full sync restores it."""
    api = harness.api
    controller = harness.start(layout, sync_period=0.3)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")
    full = counted_first_sync(controller)
    tap = harness.tap
    assert tap is not None
    tap.open.clear()  # the repair waits until the breakage is seen
    harness.topo.node_exec(["nft", tamper, "table", "ip", TABLES[layout]])
    wait_for(lambda: harness.outcome() != "ok", what="the tampering to break traffic")
    tap.open.set()
    wait_for(lambda: harness.lands() == set(BACKENDS), what="canary noticed, full resync")
    wait_for(lambda: syncs(controller, "full") > full, what="the repair counted as full")


def run_cleanup(topo: Topology) -> subprocess.CompletedProcess[str]:
    """``python -m minikproxy cleanup`` in the node netns."""
    argv = ["ip", "netns", "exec", topo.namespaces["node"], sys.executable, "-m", "minikproxy"]
    return subprocess.run([*argv, "cleanup"], capture_output=True, text=True, timeout=60)


def test_cleanup_removes_the_nftables_tables(harness: Harness) -> None:
    """``minikproxy cleanup`` removes ours and kube-proxy's tables, nobody else's, and has
    nothing to remove the second time."""
    api = harness.api
    harness.start()
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")
    harness.stop()
    harness.topo.load_nft("add table ip kube-proxy\nadd table ip6 kube-proxy\nadd table ip other\n")
    assert {"ip minikproxy", "ip kube-proxy", "ip6 kube-proxy"} <= harness.tables()

    first = run_cleanup(harness.topo)
    assert first.returncode == 0, first.stderr
    for table in ("ip minikproxy", "ip kube-proxy", "ip6 kube-proxy"):
        assert f"removed nftables table {table}" in first.stdout.splitlines(), first.stdout
    assert harness.tables() == {"ip other"}  # someone else's table stays
    assert harness.lands() == set()  # nothing DNATs any more

    second = run_cleanup(harness.topo)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("nothing to remove"), second.stdout


def kube_chains(topo: Topology) -> list[str]:
    """The KUBE-* chains iptables (nft backend) shows in the node, but KUBE-FIREWALL: kubelet's
    chain, which kube-proxy creates too but never deletes (nor does our cleanup)."""
    saved = topo.iptables_save(backend="nft")
    chains = [line[1:].split()[0] for line in saved.splitlines() if line.startswith(":KUBE-")]
    return [chain for chain in chains if chain != "KUBE-FIREWALL"]


def test_switching_modes_keeps_serving_new_connections(harness: Harness) -> None:
    """iptables -> nftables -> iptables while a client connects to the ClusterIP all the
    time: every connection meets rules (see assert_always_served). The old mode's rules
    serve until the new mode's first sync and go right after it (iptables mode's chains;
    then our table)."""
    api = harness.api
    topo = harness.topo
    harness.start(mode="iptables", cluster_cidr=UNMASQUERADED)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic in iptables mode")
    assert "KUBE-SERVICES" in kube_chains(topo)
    prober = Prober(topo, VIP)
    try:
        wait_for(lambda: len(prober.outcomes) >= 8, what="probes before the switch")
        harness.stop()
        controller = harness.start(cluster_cidr=UNMASQUERADED)
        wait_for(lambda: kube_chains(topo) == [], what="iptables mode's chains removed")
        assert syncs(controller, "full") == 1, "removed after the first nftables sync"
        assert "ip minikproxy" in harness.tables()
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes in nftables mode")
        harness.stop()

        controller = harness.start(mode="iptables", cluster_cidr=UNMASQUERADED)
        wait_for(lambda: "ip minikproxy" not in harness.tables(), what="our table removed")
        assert syncs(controller, "full") == 1, "removed after the first iptables sync"
        assert "KUBE-SERVICES" in kube_chains(topo)
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes in iptables mode")
    finally:
        outcomes = prober.stop()
    assert_always_served(outcomes)
    assert harness.lands() == set(BACKENDS)


def test_metrics_and_health_in_nftables_mode(harness: Harness) -> None:
    """The nftables failure counter is exposed, iptables mode's own metrics are not;
    ``/proxyMode`` says nftables; ``/healthz`` and ``/livez`` are healthy after a sync."""
    api = harness.api
    controller = harness.start()
    metrics, healthz = controller.servers
    assert isinstance(metrics, MetricsServer) and isinstance(healthz, HealthzServer)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic")

    def counted(name: str) -> Callable[[], bool]:
        return lambda: value(samples(metrics.port), name) > 0

    wait_for(counted("kubeproxy_sync_proxy_rules_duration_seconds_count"), what="a sync")
    scraped = samples(metrics.port)
    assert value(scraped, "kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 0
    names = {name for name, _ in scraped}
    assert not [n for n in names if n.startswith("kubeproxy_sync_proxy_rules_iptables")], names
    assert http_get(metrics.port, "/proxyMode")[:2] == (200, b"nftables")
    for path in ("/healthz", "/livez"):
        status, body, _ = http_get(healthz.port, path)
        assert status == 200, (path, body)


def test_switching_layouts_removes_the_other_layouts_table(harness: Harness) -> None:
    """Both tables would hook the same packets (a stale one DNATs to old endpoints): a
    controller starting in one layout removes the other's table, as kube-proxy's nftables
    mode's leftovers, right after its first sync; a client connecting to the ClusterIP all
    the time meets rules with every connection across the switches."""
    api = harness.api
    harness.start("kube-proxy", cluster_cidr=UNMASQUERADED)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: harness.lands() == set(BACKENDS), what="traffic, kube-proxy layout")
    prober = Prober(harness.topo, VIP)
    try:
        wait_for(lambda: len(prober.outcomes) >= 8, what="probes before the switch")
        harness.stop()
        harness.topo.load_nft("add table ip6 kube-proxy\n")

        controller = harness.start("flat", cluster_cidr=UNMASQUERADED)
        wait_for(lambda: harness.tables() == {"ip minikproxy"}, what="kube-proxy's tables gone")
        assert syncs(controller, "full") == 1, "removed after the first flat sync"
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes in the flat layout")
        api.update(endpoint_slice("web", ["10.10.2.2"]))
        wait_for(lambda: harness.lands() == {"10.10.2.2"}, what="only the flat table's endpoints")
        harness.stop()

        controller = harness.start("kube-proxy", cluster_cidr=UNMASQUERADED)
        wait_for(lambda: harness.tables() == {"ip kube-proxy"}, what="our table gone")
        assert syncs(controller, "full") == 1, "removed after the first kube-proxy layout sync"
        seen = len(prober.outcomes)
        wait_for(lambda: len(prober.outcomes) >= seen + 8, what="probes in the kube-proxy layout")
    finally:
        outcomes = prober.stop()
    assert_always_served(outcomes)
    api.update(endpoint_slice("web", ["10.10.2.3"]))
    wait_for(lambda: harness.lands() == {"10.10.2.3"}, what="only the kube-proxy table's")


@LAYOUTS
def test_udp_flows_of_services_deleted_while_down_are_removed(
    harness: Harness, layout: str
) -> None:
    """Flows to an endpoint removed, and to a Service (ClusterIP and NodePort) deleted, while
    the controller was down go at its first sync after the restart: the table it found
    names the deleted Service."""
    api = harness.api
    harness.start(layout)
    dns3 = service("dns3", "10.96.0.55", proto="UDP", type="NodePort")
    dns3["spec"]["ports"][0]["nodePort"] = 30053
    api.create(service("dns2", "10.96.0.54", proto="UDP"))
    api.create(endpoint_slice("dns2", ["10.10.2.2", "10.10.2.4"], proto="UDP"))
    api.create(dns3)
    api.create(endpoint_slice("dns3", ["10.10.2.3"], proto="UDP"))
    wait_for(
        lambda: harness.lands("10.96.0.54", proto="udp") == {"10.10.2.2", "10.10.2.4"},
        what="dns2 reaches both endpoints",
    )
    wait_for(lambda: harness.lands("10.96.0.55", proto="udp") == {"10.10.2.3"}, what="dns3")
    wait_for(lambda: harness.lands(NODE_IP, 30053, proto="udp") == {"10.10.2.3"}, what="NodePort")

    flows_to = harness.udp_flows

    assert flows_to("10.10.2.4", "10.96.0.54") > 0 and flows_to("10.10.2.3", "10.96.0.55") > 0
    assert flows_to("10.10.2.3", NODE_IP) > 0
    harness.stop()
    api.update(endpoint_slice("dns2", ["10.10.2.2"], proto="UDP"))
    api.delete("services", "default", "dns3")
    api.delete("endpointslices", "default", "dns3-1")
    harness.start(layout)
    wait_for(lambda: flows_to("10.10.2.4", "10.96.0.54") == 0, what="a restart heals")
    wait_for(lambda: flows_to("10.10.2.3", "10.96.0.55") == 0, what="deleted while down")
    wait_for(lambda: flows_to("10.10.2.3", NODE_IP) == 0, what="its NodePort's flows too")
    assert flows_to("10.10.2.2", "10.96.0.54") > 0


V6_BACKENDS = ["fd00:10:2::2", "fd00:10:2::3", "fd00:10:2::4"]
V6_VIP = "fd00:96::60"


def create_dual_stack_web(api: FakeApiServer) -> dict[str, Any]:
    """Create the dual-stack Service ``web`` (VIP, V6_VIP) with its IPv4 (BACKENDS) and IPv6
    (V6_BACKENDS) EndpointSlices; return the IPv6 one."""
    api.create(
        service(
            "web", VIP, ipFamilies=["IPv4", "IPv6"], ipFamilyPolicy="RequireDualStack",
            clusterIPs=[VIP, V6_VIP],
        )
    )  # fmt: skip
    v6_slice = endpoint_slice("web", V6_BACKENDS)
    v6_slice["metadata"]["name"] = "web-6"
    v6_slice["addressType"] = "IPv6"
    api.create(endpoint_slice("web", BACKENDS))
    api.create(v6_slice)
    return v6_slice


@LAYOUTS
def test_dual_stack_service_and_per_family_repair(harness: Harness, layout: str) -> None:
    """One table per family (``ip`` and ``ip6``): a dual-stack Service works in both, a
    change of one family's endpoints leaves the other alone, and a deleted ``ip6`` table is
    noticed and repaired on its own."""
    api = harness.api
    controller = harness.start(layout, families=(IPV4, IPV6), sync_period=0.3)
    v6_slice = create_dual_stack_web(api)
    wait_for(lambda: harness.lands() == set(BACKENDS), what="IPv4 traffic")
    wait_for(lambda: harness.lands(V6_VIP) == set(V6_BACKENDS), what="IPv6 traffic")
    assert {f"ip {TABLES[layout]}", f"ip6 {TABLES[layout]}"} <= harness.tables()

    v6_slice["endpoints"] = v6_slice["endpoints"][:1]
    api.update(v6_slice)
    wait_for(lambda: harness.lands(V6_VIP) == {V6_BACKENDS[0]}, what="IPv6 scaled down")
    assert harness.lands() == set(BACKENDS)

    full = counted_first_sync(controller)
    harness.topo.node_exec(["nft", "delete", "table", "ip6", TABLES[layout]])
    wait_for(lambda: syncs(controller, "full") > full, what="the canary's full sync")
    wait_for(lambda: harness.lands(V6_VIP) == {V6_BACKENDS[0]}, what="IPv6 repaired")
    assert harness.lands() == set(BACKENDS)


def test_a_failing_ipv6_table_does_not_hold_back_ipv4(harness: Harness) -> None:
    """Another netlink socket owns the node's ``ip6 minikproxy`` table (nft's ``owner``
    flag), so the kernel refuses every IPv6 transaction. As with kube-proxy's proxier per
    family, IPv4 goes on: its rules, its partial (element-only) syncs, its UDP conntrack
    cleanup; ``/healthz`` says IPv6 is late; once the owner is gone, IPv6's retry (full)
    brings its rules in."""
    api = harness.api
    holder = NftContext(harness.topo.namespaces["node"])
    try:
        holder.run("add table ip6 minikproxy { flags owner; }\n")
        controller = harness.start(families=(IPV4, IPV6), sync_period=1.0)
        healthz = controller.servers[1]
        create_dual_stack_web(api)
        api.create(service("dns", "10.96.0.53", proto="UDP"))
        api.create(endpoint_slice("dns", ["10.10.2.2"], proto="UDP"))
        wait_for(lambda: harness.lands() == set(BACKENDS), what="IPv4 traffic")
        wait_for(lambda: harness.lands("10.96.0.53", proto="udp") == {"10.10.2.2"}, what="udp")

        def ipv6_failed() -> bool:
            last = controller.proxier.last_sync
            return last is not None and last.failed == (IPV6,)

        wait_for(ipv6_failed, what="a sync whose IPv6 apply failed")
        assert nft_failures(controller) > 0
        assert harness.lands(V6_VIP) == set()

        def flows_to(ip: str) -> int:
            return harness.udp_flows(ip, "10.96.0.53")

        assert flows_to("10.10.2.2") > 0
        tap = harness.tap
        assert tap is not None
        sent = len(tap.scripts)
        api.update(endpoint_slice("dns", ["10.10.2.3"], proto="UDP"))
        wait_for(lambda: flows_to("10.10.2.2") == 0, what="IPv4's stale UDP flows deleted")
        assert harness.lands("10.96.0.53", proto="udp") == {"10.10.2.3"}
        ipv4 = [script for script in tap.scripts[sent:] if " ip minikproxy " in script]
        assert ipv4 and all(element_only(script) for script in ipv4), ipv4  # still partial

        def healthz_answer() -> tuple[int, dict[str, Any]]:
            status, body, _ = http_get(healthz.port, "/healthz")
            return status, json.loads(body)

        wait_for(lambda: healthz_answer()[0] == 503, what="IPv6 late for the health timeout")
        status = healthz_answer()[1]["status"]
        assert (status["IPv4"]["healthy"], status["IPv6"]["healthy"]) == (True, False)
        assert ipv6_failed()
    finally:
        holder.close()  # the owner's socket closes: its table goes with it
    wait_for(lambda: harness.lands(V6_VIP) == set(V6_BACKENDS), what="IPv6 after the retry")
    wait_for(lambda: healthz_answer()[0] == 200, what="healthy again")
    assert harness.lands() == set(BACKENDS)


@LAYOUTS
def test_client_ip_affinity_survives_full_syncs(harness: Harness, layout: str) -> None:
    """A full sync replaces the table but, as kube-proxy's (which keeps its affinity sets),
    keeps each client on its endpoint: five full syncs in a row (each a 2 in 3 chance of
    moving the client if the entries were lost), and a restart."""
    api = harness.api
    controller = harness.start(layout)
    api.create(service("web", VIP, sessionAffinity="ClientIP"))
    api.create(endpoint_slice("web", BACKENDS))
    wait_for(lambda: len(harness.lands()) == 1, what="a sticky endpoint")
    sticky = harness.lands()
    for _ in range(5):
        force_full_sync(controller)
        assert harness.lands() == sticky
    harness.stop()
    controller = harness.start(layout)
    wait_for(lambda: syncs(controller, "full") > 0, what="the first sync after the restart")
    assert harness.lands() == sticky
    # An endpoint that goes away takes its clients' entries with it (not carried over).
    (gone,) = sticky
    api.update(endpoint_slice("web", [ip for ip in BACKENDS if ip != gone]))
    wait_for(lambda: len(harness.lands()) == 1 and harness.lands() != sticky, what="moved")
    force_full_sync(controller)
    assert len(harness.lands()) == 1 and gone not in harness.lands()
