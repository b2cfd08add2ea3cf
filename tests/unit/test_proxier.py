"""The proxier's sync logic against the in-memory fakes: no kernel, no sleeps.

A :class:`Proxier` is built directly over a :class:`FakeIptables` and a :class:`FakeFlowTable`,
fed API objects through its handlers, and synced by calling ``sync_proxy_rules()``; time comes
from :class:`FakeClock` instances, and a recording runner captures ``run``/``retry_after``.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from minikproxy.compile.names import KUBE_PROXY_CANARY, service_chains
from minikproxy.config import ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION
from minikproxy.modes.nftables import NftablesMode
from minikproxy.proxier import Proxier, SyncResult
from minikproxy.runner import FakeClock
from minikproxy.testing.fake_conntrack import FakeFlowTable, udp_flow
from minikproxy.testing.fake_iptables import BUILTIN_CHAINS, FakeIptables

Obj = dict[str, Any]
NODE = "node-a"
OTHER = "node-b"
NS = "shop"
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
KINDS = {"Service": "services", "EndpointSlice": "endpointslices", "Node": "nodes"}


# --- API objects ---------------------------------------------------------------------------


def service(
    name: str,
    ip: str,
    *,
    protocol: str = "TCP",
    port: int = 80,
    svc_type: str = "ClusterIP",
    node_port: int = 0,
    etp: str = "",
    itp: str = "",
    hc_port: int = 0,
    lb_ip: str = "",
) -> Obj:
    """A v1 Service with one port named ``p``."""
    port_spec: Obj = {"name": "p", "port": port, "protocol": protocol, "targetPort": 8080}
    if node_port:
        port_spec["nodePort"] = node_port
    spec: Obj = {"type": svc_type, "clusterIP": ip, "clusterIPs": [ip], "ports": [port_spec]}
    if etp:
        spec["externalTrafficPolicy"] = etp
    if itp:
        spec["internalTrafficPolicy"] = itp
    if hc_port:
        spec["healthCheckNodePort"] = hc_port
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }
    if lb_ip:
        obj["status"] = {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}
    return obj


def endpoint_slice(
    svc: str,
    *ips: str,
    node: str = OTHER,
    protocol: str = "TCP",
    trigger_time: str = "",
) -> Obj:
    """The one EndpointSlice of Service ``svc``: ready endpoints ``ips`` on ``node``."""
    meta: Obj = {"name": f"{svc}-abcde", "namespace": NS, "labels": {SERVICE_NAME_LABEL: svc}}
    if trigger_time:
        meta["annotations"] = {TRIGGER_TIME_ANNOTATION: trigger_time}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node} for ip in ips
        ],
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
    }


def node_object() -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]},
    }


def port_name(svc: str, protocol: str = "TCP") -> ServicePortName:
    return ServicePortName(NS, svc, "p", protocol)  # type: ignore[arg-type]


# --- the rig -------------------------------------------------------------------------------


@dataclass
class RecordingRunner:
    """The Runner protocol, recording calls instead of running anything."""

    runs: int = 0
    retries: list[float] = field(default_factory=list)

    def run(self) -> None:
        self.runs += 1

    def retry_after(self, interval: float) -> None:
        self.retries.append(interval)


@dataclass
class Rig:
    proxier: Proxier
    ipt: FakeIptables | None
    conntrack: FakeFlowTable
    runner: RecordingRunner
    clock: FakeClock
    wallclock: FakeClock
    out: io.StringIO

    @property
    def kernel(self) -> FakeIptables:
        assert self.ipt is not None
        return self.ipt

    def add(self, *objs: Obj) -> None:
        for obj in objs:
            self.proxier.handler(KINDS[obj["kind"]]).on_add(obj)

    def update(self, *objs: Obj) -> None:
        for obj in objs:
            self.proxier.handler(KINDS[obj["kind"]]).on_update({}, obj)

    def delete(self, *objs: Obj) -> None:
        for obj in objs:
            self.proxier.handler(KINDS[obj["kind"]]).on_delete(obj)

    def start(self, *objs: Obj) -> None:
        """Deliver the initial lists, mark both gating kinds synced and run the first sync."""
        self.add(*objs)
        self.proxier.handler("services").on_synced()
        self.proxier.handler("endpointslices").on_synced()
        assert self.sync()

    def sync(self) -> bool:
        return self.proxier.sync_proxy_rules()

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxier.metrics.registry.get_sample_value(f"kubeproxy_{name}", labels)
        return 0.0 if value is None else value

    @property
    def full(self) -> bool:
        assert self.proxier.last_sync is not None
        return self.proxier.last_sync.full

    @property
    def restored(self) -> str:
        assert self.kernel.last_restore is not None
        return self.kernel.last_restore.decode()


def make_rig(
    *,
    dry_run: bool = False,
    ipt: FakeIptables | None = None,
    service_health: ServiceHealthServer | None = None,
    health: ProxierHealth | None = None,
    **kwargs: Any,
) -> Rig:
    clock, wallclock = FakeClock(), FakeClock(T0)
    kernel = None if dry_run else (ipt if ipt is not None else FakeIptables())
    conntrack, runner, out = FakeFlowTable(), RecordingRunner(), io.StringIO()
    conntrack.set_addresses(IPV4, ["127.0.0.1", "192.168.0.10"])
    proxier = Proxier(
        config=ProxyConfig(cluster_cidr="10.244.0.0/16"),
        node_name=NODE,
        families=[IPV4],
        metrics=ProxyMetrics(),
        health=health if health is not None else ProxierHealth(clock=wallclock),
        dataplanes=None if kernel is None else {IPV4: kernel},
        conntrack=ConntrackReconciler(conntrack),
        service_health=service_health,
        out=out if dry_run else None,
        clock=clock.now,
        wallclock=wallclock.now,
        runner=runner,
        **kwargs,
    )
    return Rig(proxier, kernel, conntrack, runner, clock, wallclock, out)


def fresh_full_dump(*objs: Obj, **kwargs: Any) -> str:
    """The kernel after one full sync of ``objs`` into an empty FakeIptables."""
    rig = make_rig(**kwargs)
    rig.start(*objs)
    assert rig.full
    return rig.kernel.dump()


def our_rule_counts(ipt: FakeIptables) -> dict[str, int]:
    """Rules in the user chains of filter and nat (what sync_proxy_rules_iptables_total counts:
    everything but the jumps in built-in chains; canaries are empty)."""
    return {
        table: sum(
            len(ipt.rules(table, chain))
            for chain in ipt.chains(table)
            if chain not in BUILTIN_CHAINS[table]
        )
        for table in ("filter", "nat")
    }


WEB = service("web", "10.96.0.10")
API = service("api", "10.96.0.11")
WEB_EPS = endpoint_slice("web", "10.244.1.1", "10.244.1.2")
API_EPS = endpoint_slice("api", "10.244.2.1")


# --- gating, full and partial syncs --------------------------------------------------------


def test_nothing_is_written_before_services_and_slices_are_listed() -> None:
    rig = make_rig()
    rig.add(node_object(), WEB, WEB_EPS)
    rig.proxier.handler("nodes").on_synced()
    rig.proxier.handler("services").on_synced()
    assert not rig.proxier.initialized
    assert rig.runner.runs == 0
    assert rig.sync() is True  # a no-op, not a failure
    assert rig.kernel.restore_count == 0
    assert rig.kernel.dump() == ""
    assert rig.proxier.last_sync is None

    rig.proxier.handler("endpointslices").on_synced()
    assert rig.proxier.initialized
    assert rig.runner.runs == 1  # the initial sync was queued
    assert rig.sync()
    assert rig.full
    assert service_chains(port_name("web")).cluster in rig.kernel.chains("nat")


def test_nodes_do_not_gate_the_first_sync() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)  # no Node listed at all
    assert rig.kernel.restore_count == 1
    assert rig.full


def test_events_after_initialization_queue_a_sync() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    runs = rig.runner.runs
    rig.add(API)
    assert rig.runner.runs == runs + 1


def test_first_sync_is_full_and_later_syncs_are_partial() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS)
    assert rig.full
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    assert rig.sync()
    assert not rig.full


def test_endpoint_only_change_restores_only_that_services_chains() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS)
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    assert rig.sync()
    text = rig.restored
    web, api = service_chains(port_name("web")), service_chains(port_name("api"))
    assert f":{web.cluster} - [0:0]" in text
    assert "--to-destination 10.244.1.3:8080" in text
    assert api.cluster not in text
    assert "10.244.2.1" not in text
    assert "KUBE-SERVICES" not in text  # its content did not change
    assert "*filter" not in text
    assert "-X KUBE-SEP-" in text  # the endpoint that went away loses its chain


def test_each_sync_reports_the_resource_versions_it_includes() -> None:
    results: list[SyncResult] = []
    rig = make_rig(on_sync=results.append)

    def versioned(obj: Obj, rv: str) -> Obj:
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": rv}}

    rig.start(versioned(WEB, "5"), versioned(WEB_EPS, "7"))
    assert results[-1].ok and results[-1].full
    assert results[-1].resource_versions == {"services": "5", "endpointslices": "7"}
    rig.clock.advance(2.0)
    rig.update(versioned(endpoint_slice("web", "10.244.1.3"), "9"))
    rig.add(versioned(API, "10"))
    assert rig.sync()
    assert len(results) == 2 and not results[-1].full
    assert results[-1].resource_versions == {"services": "10", "endpointslices": "9"}
    assert results[-1].ended == rig.clock.now()


def test_crossing_the_large_cluster_threshold_stays_a_partial_sync() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS)
    many = [f"10.244.{3 + i // 250}.{i % 250 + 1}" for i in range(1001)]
    rig.update(endpoint_slice("api", *many))  # 1003 endpoints: a large cluster now
    assert rig.sync()
    assert not rig.full and rig.kernel.restore_count == 2
    # web's endpoint chains lose their comments: rewritten by the partial restore
    web = service_chains(port_name("web")).cluster
    assert f":{web} - [0:0]" in rig.restored
    assert KUBE_PROXY_CANARY not in rig.restored  # not a full restore
    assert rig.kernel.dump() == fresh_full_dump(WEB, WEB_EPS, API, endpoint_slice("api", *many))


def test_adding_a_service_edits_kube_services_in_place() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.add(API, API_EPS)
    assert rig.sync()
    assert not rig.full
    text = rig.restored
    assert ":KUBE-SERVICES - [0:0]" not in text  # not flushed and rewritten...
    assert '-I KUBE-SERVICES 1 -m comment --comment "shop/api:p cluster IP"' in text
    assert '"shop/web:p cluster IP"' not in text  # ...so web's rule is not written again
    assert f":{service_chains(port_name('web')).cluster}" not in text
    assert rig.kernel.dump() == fresh_full_dump(WEB, WEB_EPS, API, API_EPS)


def test_a_top_level_chain_mostly_changed_is_rewritten() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.delete(WEB)
    rig.add(API, API_EPS)
    assert rig.sync()
    text = rig.restored
    assert ":KUBE-SERVICES - [0:0]" in text and "-D KUBE-SERVICES" not in text
    assert rig.kernel.dump() == fresh_full_dump(WEB_EPS, API, API_EPS)


def test_an_in_place_edit_of_a_chain_someone_changed_fails_and_the_full_sync_repairs() -> None:
    db = service("db", "10.96.0.12")
    db_eps = endpoint_slice("db", "10.244.3.1")
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS, db, db_eps)
    web_rule = next(r for r in rig.kernel.rules("nat", "KUBE-SERVICES") if "web" in r.spec)
    rig.kernel.delete_rule("nat", "KUBE-SERVICES", web_rule.args)  # someone else's doing
    rig.delete(WEB)
    assert rig.sync() is False  # "-D KUBE-SERVICES <web's rule>" finds no such rule
    assert "-D KUBE-SERVICES" in rig.kernel.last_restore.decode()  # type: ignore[union-attr]
    assert rig.sync() is True and rig.full
    assert rig.kernel.dump() == fresh_full_dump(WEB_EPS, API, API_EPS, db, db_eps)


def test_kube_proxy_style_partial_sync_always_rewrites_top_level_chains() -> None:
    rig = make_rig(rewrite_top_level=True)
    rig.start(WEB, WEB_EPS, API, API_EPS)
    new_eps = endpoint_slice("web", "10.244.1.1", "10.244.1.3")
    rig.update(new_eps)
    assert rig.sync() and not rig.full
    text = rig.restored
    assert ":KUBE-SERVICES - [0:0]" in text and "*filter" in text
    assert f":{service_chains(port_name('api')).cluster} " not in text  # not redeclared
    assert rig.kernel.dump() == fresh_full_dump(WEB, new_eps, API, API_EPS)


def test_a_sync_without_changes_writes_nothing() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    count = rig.kernel.restore_count
    assert rig.sync()
    assert not rig.full
    assert rig.kernel.restore_count == count
    rig.update(WEB_EPS)  # same content: not a change
    assert rig.sync()
    assert rig.kernel.restore_count == count


def test_partial_syncs_end_where_one_full_sync_does() -> None:
    rig = make_rig()
    rig.start(node_object(), WEB, WEB_EPS, API, API_EPS)
    db = service("db", "10.96.0.12", svc_type="NodePort", node_port=30080)
    dns = service("dns", "10.96.0.13", protocol="UDP")
    steps: list[tuple[str, Obj]] = [
        ("update", endpoint_slice("web", "10.244.1.1", "10.244.1.3")),
        ("add", db),
        ("add", endpoint_slice("db", "10.244.3.1", node=NODE)),
        ("add", dns),  # no endpoints yet: REJECT in filter
        ("add", endpoint_slice("dns", "10.244.4.1", protocol="UDP")),
        ("delete", API_EPS),
        ("delete", API),
        ("update", service("db", "10.96.0.12", svc_type="NodePort", node_port=30081)),
        ("update", endpoint_slice("web", "10.244.1.3")),
    ]
    for action, obj in steps:
        getattr(rig, action)(obj)
        assert rig.sync()
        assert not rig.full
    final = (
        node_object(),
        WEB,
        endpoint_slice("web", "10.244.1.3"),
        service("db", "10.96.0.12", svc_type="NodePort", node_port=30081),
        endpoint_slice("db", "10.244.3.1", node=NODE),
        dns,
        endpoint_slice("dns", "10.244.4.1", protocol="UDP"),
    )
    assert rig.kernel.dump() == fresh_full_dump(*final)
    assert not any("KUBE-SVC" in c and "api" in c for c in rig.kernel.chains("nat"))


# --- full syncs ----------------------------------------------------------------------------


def test_full_sync_ensures_jumps_and_canaries() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    ipt = rig.kernel
    targets = {
        (table, chain): [rule.target for rule in ipt.rules(table, chain)]
        for table, chain in (
            ("nat", "PREROUTING"),
            ("nat", "OUTPUT"),
            ("nat", "POSTROUTING"),
            ("filter", "INPUT"),
            ("filter", "FORWARD"),
            ("filter", "OUTPUT"),
        )
    }
    assert targets[("nat", "PREROUTING")] == ["KUBE-SERVICES"]
    assert targets[("nat", "OUTPUT")] == ["KUBE-SERVICES"]
    assert targets[("nat", "POSTROUTING")] == ["KUBE-POSTROUTING"]
    assert {"KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS", "KUBE-PROXY-FIREWALL"} <= set(
        targets[("filter", "INPUT")]
    )
    assert {"KUBE-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL"} <= set(
        targets[("filter", "FORWARD")]
    )
    for table in ("mangle", "nat", "filter"):
        assert ipt.chain_exists(table, KUBE_PROXY_CANARY)
    # A second full sync does not duplicate the jumps.
    rig.proxier.force_full_sync("test")
    assert rig.sync() and rig.full
    assert [r.target for r in ipt.rules("nat", "PREROUTING")] == ["KUBE-SERVICES"]


STALE_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-OLDOLDOLDOLDOLD12 - [0:0]
:KUBE-SEP-OLDOLDOLDOLDOLD12 - [0:0]
:KUBE-MARK-MASQ - [0:0]
:USER-CHAIN - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-OLDOLDOLDOLDOLD12
-A KUBE-SVC-OLDOLDOLDOLDOLD12 -j KUBE-SEP-OLDOLDOLDOLDOLD12
-A KUBE-SEP-OLDOLDOLDOLDOLD12 -p tcp -j DNAT --to-destination 10.244.9.9:8080
COMMIT
"""


def test_full_sync_deletes_stale_service_chains_only() -> None:
    ipt = FakeIptables()
    ipt.load(STALE_NAT)
    rig = make_rig(ipt=ipt)
    rig.start(WEB, WEB_EPS)
    chains = ipt.chains("nat")
    assert "KUBE-SVC-OLDOLDOLDOLDOLD12" not in chains
    assert "KUBE-SEP-OLDOLDOLDOLDOLD12" not in chains
    assert "USER-CHAIN" in chains  # not ours: left alone
    assert service_chains(port_name("web")).cluster in chains
    assert "10.96.9.9" not in ipt.dump()


def test_full_sync_on_nft_is_batched_and_ends_like_an_unbatched_one() -> None:
    objs: list[Obj] = []
    for i in range(5):
        objs += [service(f"s{i}", f"10.96.1.{i}"), endpoint_slice(f"s{i}", f"10.244.5.{i}")]
    ipt = FakeIptables()
    ipt.load(STALE_NAT)
    rig = make_rig(ipt=ipt, nft_batch=2)
    rig.start(*objs)
    assert ipt.restore_count == 4  # 3 batches of <= 2 services, then the top-level chains
    assert "KUBE-SVC-OLDOLDOLDOLDOLD12" not in ipt.chains("nat")

    unbatched = FakeIptables()
    unbatched.load(STALE_NAT)
    other = make_rig(ipt=unbatched, nft_batch=0)
    other.start(*objs)
    assert unbatched.restore_count == 1
    assert ipt.dump() == unbatched.dump()


def test_full_sync_on_legacy_backend_is_not_batched() -> None:
    objs: list[Obj] = []
    for i in range(5):
        objs += [service(f"s{i}", f"10.96.1.{i}"), endpoint_slice(f"s{i}", f"10.244.5.{i}")]
    ipt = FakeIptables()
    setattr(ipt, "backend", "legacy")  # noqa: B010 - the fake has no backend attribute
    rig = make_rig(ipt=ipt, nft_batch=2)
    rig.start(*objs)
    assert ipt.restore_count == 1
    assert ipt.dump() == fresh_full_dump(*objs, nft_batch=0)


def test_full_sync_forced_after_full_sync_period() -> None:
    rig = make_rig(full_sync_period=100.0)
    rig.start(WEB, WEB_EPS)
    rig.clock.advance(50)
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.sync() and not rig.full
    rig.clock.advance(49)
    assert rig.sync() and not rig.full
    rig.clock.advance(1)  # 100 s since the last full sync
    assert rig.sync() and rig.full
    rig.clock.advance(10)
    assert rig.sync() and not rig.full


# --- failures ------------------------------------------------------------------------------


def test_failed_partial_restore_keeps_rules_counts_backs_off_and_goes_full() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS)
    before = rig.kernel.dump()
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    rig.kernel.fail_next_restore()
    assert rig.sync() is False
    assert rig.proxier.last_sync is not None
    assert not rig.proxier.last_sync.ok and not rig.proxier.last_sync.full
    assert "injected failure" in rig.proxier.last_sync.error
    assert rig.kernel.dump() == before
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 1
    assert rig.metric("sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert rig.runner.retries == [1.0]
    assert rig.metric("sync_proxy_rules_duration_seconds_count") == 1  # only the first sync

    assert rig.sync() is True
    assert rig.full
    assert rig.runner.retries == [1.0]
    assert rig.kernel.dump() == fresh_full_dump(
        WEB, endpoint_slice("web", "10.244.1.1", "10.244.1.3"), API, API_EPS
    )


def test_failed_full_restore_counts_only_as_a_restore_failure_and_backs_off_more() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    before = rig.kernel.dump()
    rig.proxier.force_full_sync("test")
    for expected in ([1.0], [1.0, 2.0]):
        rig.kernel.fail_next_restore()
        assert rig.sync() is False
        assert rig.kernel.dump() == before  # the jumps were there already
        assert rig.runner.retries == expected
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 2
    assert rig.metric("sync_proxy_rules_iptables_partial_restore_failures_total") == 0
    assert rig.sync() and rig.full
    assert rig.kernel.dump() == before


def test_backoff_is_capped_by_the_sync_period() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.proxier.force_full_sync("test")
    for _ in range(8):
        rig.kernel.fail_next_restore()
        assert not rig.sync()
    assert rig.runner.retries == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


class TroubledIptables(FakeIptables):
    """A FakeIptables whose next restore can raise any exception, or block until released."""

    def __init__(self) -> None:
        super().__init__()
        self.raise_next: BaseException | None = None
        self.hold_next = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def restore(self, data: bytes, *, noflush: bool = True, counters: bool = True) -> None:
        error, self.raise_next = self.raise_next, None
        if error is not None:
            raise error
        if self.hold_next:
            self.hold_next = False
            self.entered.set()
            assert self.release.wait(30), "the test never released the restore"
        super().restore(data, noflush=noflush, counters=counters)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyError("gone"), AssertionError()])
def test_any_exception_keeps_rules_counts_backs_off_and_goes_full(error: Exception) -> None:
    kernel = TroubledIptables()
    rig = make_rig(ipt=kernel)
    rig.start(WEB, WEB_EPS, API, API_EPS)
    before = kernel.dump()
    changed = endpoint_slice("web", "10.244.1.1", "10.244.1.3")
    rig.update(changed)
    kernel.raise_next = error
    assert rig.sync() is False
    assert rig.proxier.last_sync is not None and not rig.proxier.last_sync.ok
    assert type(error).__name__ in rig.proxier.last_sync.error
    assert kernel.dump() == before
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 1
    assert rig.metric("sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert rig.runner.retries == [1.0]

    assert rig.sync() is True
    assert rig.full
    assert kernel.dump() == fresh_full_dump(WEB, changed, API, API_EPS)


def test_a_snapshot_failing_half_way_loses_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS, API, API_EPS)
    changed = (endpoint_slice("web", "10.244.1.9"), endpoint_slice("api", "10.244.2.9"))
    rig.update(*changed)
    tracker = rig.proxier.tracker
    real = tracker._endpoints_for
    calls = 0

    def fail_second_call(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyError("half-way")
        return real(*args)

    monkeypatch.setattr(tracker, "_endpoints_for", fail_second_call)
    assert rig.sync() is False
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 1
    assert rig.runner.retries == [1.0]
    assert rig.sync() is True
    assert rig.full
    assert rig.kernel.dump() == fresh_full_dump(WEB, API, *changed)


def test_full_sync_forced_while_a_sync_is_in_flight_is_not_lost() -> None:
    """The canary monitor forces a full sync while a partial one is restoring: the partial
    one finishing must not clear the request (deterministic: the restore waits on an Event)."""
    kernel = TroubledIptables()
    rig = make_rig(ipt=kernel)
    rig.start(WEB, WEB_EPS)
    rig.update(endpoint_slice("web", "10.244.1.1"))
    kernel.hold_next = True
    results: list[bool] = []
    syncing = threading.Thread(target=lambda: results.append(rig.sync()))
    syncing.start()
    try:
        assert kernel.entered.wait(30)
        kernel.delete_chain("filter", KUBE_PROXY_CANARY)  # someone flushes meanwhile
        assert rig.proxier.check_canaries() is False
    finally:
        kernel.release.set()
        syncing.join(30)
    assert results == [True]
    assert not rig.full  # the sync in flight was the partial one
    assert rig.sync() and rig.full
    assert kernel.chain_exists("filter", KUBE_PROXY_CANARY)


# --- canaries ------------------------------------------------------------------------------


def test_canaries_present_means_nothing_to_do() -> None:
    rig = make_rig()
    assert rig.proxier.check_canaries()  # nothing written yet
    rig.start(WEB, WEB_EPS)
    runs = rig.runner.runs
    assert rig.proxier.check_canaries()
    assert rig.runner.runs == runs
    assert rig.sync() and not rig.full


@pytest.mark.parametrize("table", ["mangle", "nat", "filter"])
def test_missing_canary_forces_a_full_sync(table: str) -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.kernel.delete_chain(table, KUBE_PROXY_CANARY)
    runs = rig.runner.runs
    assert rig.proxier.check_canaries() is False
    assert rig.runner.runs == runs + 1
    assert rig.sync() and rig.full
    assert rig.kernel.chain_exists(table, KUBE_PROXY_CANARY)
    assert rig.proxier.check_canaries()


def test_flushed_tables_are_restored_by_the_forced_full_sync() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    expected = rig.kernel.dump()
    rig.kernel.load("*nat\nCOMMIT\n*filter\nCOMMIT\n*mangle\nCOMMIT\n")  # someone flushed all
    assert not rig.proxier.check_canaries()
    assert rig.sync() and rig.full
    assert rig.kernel.dump() == expected


# --- conntrack -----------------------------------------------------------------------------


DNS = service("dns", "10.96.0.53", protocol="UDP", port=53, svc_type="NodePort", node_port=30053)
NODE_IP = "192.168.0.10"


def dns_slice(*endpoints: Obj) -> Obj:
    """The EndpointSlice of ``dns`` (UDP port 8080) with raw endpoint objects."""
    obj = endpoint_slice("dns", protocol="UDP")
    obj["endpoints"] = list(endpoints)
    return obj


def ep(
    ip: str,
    *,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
    zone_hint: str = "",
) -> Obj:
    endpoint: Obj = {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": OTHER,
        "zone": "zone-b",
    }
    if zone_hint:
        endpoint["hints"] = {"forZones": [{"name": zone_hint}]}
    return endpoint


def to_dns(
    client_port: int, endpoint: str | None, *, via: str = "10.96.0.53", port: int = 53
) -> str:
    """A flow from a client to ``via:port`` answered by ``endpoint:8080`` (None: not
    DNATed); returned described, after adding it to the rig's table (see ``seed``)."""
    flow = udp_flow(
        "10.244.9.9",
        client_port,
        via,
        port,
        reply_src=endpoint,
        reply_sport=8080 if endpoint else None,
    )
    SEEDED.append(flow)
    return f"10.244.9.9:{client_port}>{via}:{port}@{endpoint or via}:{8080 if endpoint else port}"


SEEDED: list[Any] = []


def seed(rig: Rig) -> None:
    rig.conntrack.add(*SEEDED)
    SEEDED.clear()


def test_first_sync_keeps_flows_to_serving_endpoints_and_others() -> None:
    rig = make_rig()
    live = to_dns(1000, "10.244.1.1")
    nodeport = to_dns(1001, "10.244.1.1", via=NODE_IP, port=30053)
    other_port = to_dns(1002, None, port=5353)  # the cluster IP, but no service port
    elsewhere = to_dns(1003, None, via="192.168.0.99", port=30053)  # another host's port
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1")))
    assert rig.conntrack.remaining() == {live, nodeport, other_port, elsewhere}
    assert rig.conntrack.dumps == 1


def test_removed_udp_endpoint_flows_are_deleted() -> None:
    rig = make_rig()
    kept = to_dns(1000, "10.244.1.1")
    gone = to_dns(1001, "10.244.1.2")
    gone_np = to_dns(1002, "10.244.1.2", via=NODE_IP, port=30053)
    gone_lo = to_dns(1003, "10.244.1.2", via="127.0.0.1", port=30053)
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1"), ep("10.244.1.2")))
    assert rig.conntrack.remaining() == {kept, gone, gone_np, gone_lo}
    rig.update(dns_slice(ep("10.244.1.1")))
    assert rig.sync()
    assert rig.conntrack.remaining() == {kept}
    assert rig.metric("conntrack_reconciler_deleted_entries_total", ip_family="IPv4") == 3
    assert rig.metric("conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4") == 2


def test_terminating_but_serving_endpoint_keeps_its_flows() -> None:
    rig = make_rig()
    draining = to_dns(1000, "10.244.1.2")
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1"), ep("10.244.1.2")))
    rig.update(dns_slice(ep("10.244.1.1"), ep("10.244.1.2", ready=False, terminating=True)))
    assert rig.sync()
    assert "10.244.1.2:8080" not in rig.kernel.dump()  # no longer routed to ...
    assert rig.conntrack.remaining() == {draining}  # ... but its live flows stay
    rig.update(
        dns_slice(ep("10.244.1.1"), ep("10.244.1.2", ready=False, serving=False, terminating=True))
    )
    assert rig.sync()
    assert rig.conntrack.remaining() == set()


def test_topology_hints_appearing_keep_flows() -> None:
    rig = make_rig()
    flows = {to_dns(1000, "10.244.1.1"), to_dns(1001, "10.244.1.2")}
    seed(rig)
    node = node_object()
    node["metadata"]["labels"] = {"topology.kubernetes.io/zone": "zone-a"}
    rig.start(node, DNS, dns_slice(ep("10.244.1.1"), ep("10.244.1.2")))
    rig.update(
        dns_slice(ep("10.244.1.1", zone_hint="zone-a"), ep("10.244.1.2", zone_hint="zone-b"))
    )
    assert rig.sync()
    assert "10.244.1.2:8080" not in rig.kernel.dump()  # hints route zone-a to .1 only
    assert rig.conntrack.remaining() == flows


def test_udp_service_scaled_to_zero_loses_its_flows() -> None:
    rig = make_rig()
    to_dns(1000, "10.244.1.1")
    to_dns(1001, "10.244.1.1", via=NODE_IP, port=30053)
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1")))
    rig.update(dns_slice())
    assert rig.sync()
    assert rig.conntrack.remaining() == set()


def test_deleted_udp_service_loses_its_flows_even_when_the_first_attempt_fails() -> None:
    rig = make_rig()
    to_dns(1000, "10.244.1.1")
    to_dns(1001, "10.244.1.1", via=NODE_IP, port=30053)
    seed(rig)
    dns_eps = dns_slice(ep("10.244.1.1"))
    rig.start(DNS, dns_eps)
    rig.delete(DNS, dns_eps)
    rig.conntrack.fail_next = OSError(105, "No buffer space available")
    assert rig.sync()  # a failed reconcile never fails the sync
    assert rig.metric("conntrack_reconciler_failures_total", ip_family="IPv4") == 1
    assert len(rig.conntrack.remaining()) == 2
    assert rig.sync()  # the deleted Service's frontends were remembered
    assert rig.conntrack.remaining() == set()
    later = to_dns(1002, None)  # now nobody's: routed like any other traffic
    seed(rig)
    assert rig.sync()
    assert rig.conntrack.remaining() == {later}


def test_restart_heals_stale_and_never_dnated_flows() -> None:
    rig = make_rig()
    live = to_dns(1000, "10.244.1.1")
    to_dns(1001, "10.244.7.7")  # an endpoint removed while minikproxy was down
    to_dns(1002, None)  # arrived before the rules existed (kubernetes#48370)
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1")))
    assert rig.conntrack.remaining() == {live}


def test_restart_heals_flows_of_a_service_deleted_while_down() -> None:
    before = make_rig()
    before.start(DNS, dns_slice(ep("10.244.1.1")))
    rig = make_rig(ipt=before.kernel)  # a new process, the rules the old one left
    to_dns(1000, "10.244.1.1")
    to_dns(1001, "10.244.1.1", via=NODE_IP, port=30053)
    other = to_dns(1002, "10.244.1.1", via="10.96.0.99")  # no Service's, ever
    seed(rig)
    rig.start(WEB, WEB_EPS)  # DNS was deleted meanwhile
    assert rig.conntrack.remaining() == {other}


def test_udp_service_getting_its_first_endpoints_deletes_never_dnated_flows() -> None:
    rig = make_rig()
    rig.start(DNS)
    rejected = to_dns(1000, None)
    seed(rig)
    rig.add(dns_slice(ep("10.244.1.1")))
    assert rig.sync()
    assert rejected not in rig.conntrack.remaining()
    assert rig.conntrack.remaining() == set()


def test_udp_cleanup_waits_for_the_rules_that_stop_using_the_endpoint() -> None:
    rig = make_rig()
    gone = to_dns(1000, "10.244.1.2")
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1"), ep("10.244.1.2")))
    rig.update(dns_slice(ep("10.244.1.1")))
    rig.kernel.fail_next_restore()
    assert not rig.sync()
    assert rig.conntrack.remaining() == {gone}  # the rules still DNAT to 10.244.1.2
    assert rig.sync() and rig.full
    assert rig.conntrack.remaining() == set()


def test_sync_time_and_on_sync_include_the_conntrack_reconcile() -> None:
    """As kube-proxy's syncProxyRules, whose deferred latency observation runs after its
    conntrack cleanup: the reconcile's time is part of the sync's, reported apart on the
    SyncResult, and on_sync sees the flows already reconciled; ``ended`` stays the time the
    rules were in the kernel."""
    results: list[SyncResult] = []
    remaining_at_hook: list[set[str]] = []

    def hook(result: SyncResult) -> None:
        results.append(result)
        remaining_at_hook.append(rig.conntrack.remaining())

    rig = make_rig(on_sync=hook)
    kept = to_dns(1000, "10.244.1.1")
    to_dns(1001, "10.244.1.2")
    seed(rig)
    dump = rig.conntrack.dump_udp

    def slow_dump(family: IPFamily) -> Any:
        rig.clock.advance(0.25)  # the reconcile takes 250 ms of the proxier's clock
        return dump(family)

    rig.conntrack.dump_udp = slow_dump  # type: ignore[method-assign]
    rig.start(DNS, dns_slice(ep("10.244.1.1"), ep("10.244.1.2")))
    rig.update(dns_slice(ep("10.244.1.1")))
    assert rig.sync()
    assert remaining_at_hook[-1] == {kept}
    last = results[-1]
    assert last.conntrack_seconds == pytest.approx(0.25)
    assert last.total == last.elapsed == pytest.approx(last.duration + 0.25)
    assert last.ended == pytest.approx(rig.clock.now() - 0.25)
    assert rig.metric("sync_proxy_rules_duration_seconds_sum") == pytest.approx(
        sum(r.total for r in results)
    )
    assert rig.metric("sync_proxy_rules_duration_seconds_sum") >= 0.5
    assert rig.metric("sync_partial_proxy_rules_duration_seconds_sum") == pytest.approx(last.total)


def test_tcp_only_services_never_list_conntrack() -> None:
    rig = make_rig()
    web = service("web", "10.96.0.10", svc_type="NodePort", node_port=30080)
    rig.start(web)
    rig.add(endpoint_slice("web", "10.244.1.1", "10.244.1.2"))
    assert rig.sync()
    rig.delete(web)
    assert rig.sync()
    assert rig.conntrack.dumps == 0


def test_dry_run_never_touches_conntrack() -> None:
    rig = make_rig(dry_run=True)
    to_dns(1000, "10.244.1.2")
    seed(rig)
    rig.start(DNS, dns_slice(ep("10.244.1.1")))
    assert rig.conntrack.dumps == 0 and len(rig.conntrack.remaining()) == 1


# --- metrics -------------------------------------------------------------------------------


def test_sync_duration_histograms_and_timestamp() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.sync()
    rig.wallclock.advance(7)
    assert rig.sync()
    assert rig.metric("sync_proxy_rules_duration_seconds_count") == 3
    assert rig.metric("sync_full_proxy_rules_duration_seconds_count") == 1
    assert rig.metric("sync_partial_proxy_rules_duration_seconds_count") == 2
    assert rig.metric("sync_proxy_rules_last_timestamp_seconds") == T0 + 7
    assert rig.metric("sync_proxy_rules_last_queued_timestamp_seconds") == T0


def test_rule_count_gauges_match_the_kernel() -> None:
    rig = make_rig()
    rig.start(node_object(), WEB, WEB_EPS, API, API_EPS, DNS)
    counts = our_rule_counts(rig.kernel)
    assert counts["nat"] > 0 and counts["filter"] > 0
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_total", table=table) == counts[table]
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.2", "10.244.1.3"))
    rig.delete(API)
    assert rig.sync() and not rig.full
    counts = our_rule_counts(rig.kernel)
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_total", table=table) == counts[table]


def restored_rule_counts(*inputs: bytes) -> dict[str, int]:
    """``-A`` lines per table in restore inputs."""
    counts = {"filter": 0, "nat": 0}
    for data in inputs:
        table = ""
        for line in data.decode().splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and table in counts:
                counts[table] += 1
    return counts


def test_rules_written_by_the_last_sync_gauges() -> None:
    rig = make_rig()
    rig.start(node_object(), WEB, WEB_EPS, API, API_EPS, DNS)
    full = our_rule_counts(rig.kernel)
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_last", table=table) == full[table]
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    assert rig.sync() and not rig.full
    written = restored_rule_counts(rig.kernel.last_restore or b"")
    assert written["filter"] == 0 and 0 < written["nat"] < full["nat"]
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_last", table=table) == written[table]
    assert rig.sync()  # nothing to write
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_last", table=table) == 0


def test_rules_written_by_a_batched_full_sync_are_all_counted() -> None:
    objs: list[Obj] = []
    for i in range(5):
        objs += [service(f"s{i}", f"10.96.1.{i}"), endpoint_slice(f"s{i}", f"10.244.5.{i}")]
    rig = make_rig(nft_batch=2)
    rig.start(*objs)
    assert rig.kernel.restore_count == 4
    full = our_rule_counts(rig.kernel)
    for table in ("filter", "nat"):
        assert rig.metric("sync_proxy_rules_iptables_last", table=table) == full[table]


def test_no_local_endpoints_gauges() -> None:
    rig = make_rig()
    ext = service("ext", "10.96.0.20", svc_type="NodePort", node_port=30020, etp="Local")
    internal = service("int", "10.96.0.21", itp="Local")
    rig.start(
        ext, endpoint_slice("ext", "10.244.1.1"), internal, endpoint_slice("int", "10.244.1.2")
    )
    assert rig.metric("sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 1
    assert rig.metric("sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal") == 1
    rig.update(endpoint_slice("ext", "10.244.1.1", node=NODE))
    assert rig.sync() and not rig.full
    assert rig.metric("sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 0
    assert rig.metric("sync_proxy_rules_no_local_endpoints_total", traffic_policy="internal") == 1


def test_network_programming_latency_from_trigger_time() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.wallclock.set(T0 + 42.5)
    rig.update(endpoint_slice("web", "10.244.1.9", trigger_time="2023-11-14T22:13:40Z"))
    assert rig.sync()
    # Triggered at T0 + 20 s, programmed at T0 + 42.5 s.
    assert rig.metric("network_programming_duration_seconds_count") == 1
    assert rig.metric("network_programming_duration_seconds_sum") == pytest.approx(22.5)
    assert rig.sync()  # observed once, not on every sync
    assert rig.metric("network_programming_duration_seconds_count") == 1


def test_trigger_times_from_before_the_proxier_started_are_not_observed() -> None:
    # kube-proxy ignores trigger times older than its change tracker: a restart must not
    # report the age of every EndpointSlice as programming latency.
    rig = make_rig()
    rig.wallclock.advance(3600)
    rig.start(WEB, endpoint_slice("web", "10.244.1.1", trigger_time="2023-11-14T22:13:20Z"))
    assert rig.metric("network_programming_duration_seconds_count") == 0
    rig.update(endpoint_slice("web", "10.244.1.2", trigger_time="2023-11-14T23:13:21Z"))
    rig.wallclock.advance(2)
    assert rig.sync()
    assert rig.metric("network_programming_duration_seconds_count") == 1
    assert rig.metric("network_programming_duration_seconds_sum") == pytest.approx(1.0)


def test_change_counters_and_pending_gauges() -> None:
    rig = make_rig()
    rig.add(WEB, API, WEB_EPS)
    assert rig.metric("sync_proxy_rules_service_changes_total") == 2
    assert rig.metric("sync_proxy_rules_endpoint_changes_total") == 1
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 2
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 1  # its own kind
    rig.start()
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 0
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 0
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.metric("sync_proxy_rules_endpoint_changes_total") == 2
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 1
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 0
    rig.update(endpoint_slice("web", "10.244.1.2"), service("web", "10.96.0.10", port=81))
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 2
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 1
    rig.update(WEB)  # the same Service again: still one Service pending
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 1
    assert rig.sync()
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 0


# --- health --------------------------------------------------------------------------------


def test_proxier_health_follows_syncs() -> None:
    rig = make_rig()
    health = rig.proxier.health
    health.updated(IPV4)  # what the sync loop does when it starts
    rig.add(WEB, WEB_EPS)
    rig.proxier.handler("services").on_synced()
    rig.proxier.handler("endpointslices").on_synced()  # queues the first sync
    rig.wallclock.advance(61)
    assert not health.is_healthy()  # queued for longer than the timeout, not synced
    assert rig.sync()
    healthy, body = health.health()
    assert healthy
    assert body["status"]["IPv4"]["healthy"] is True
    assert body["lastUpdated"] == "2023-11-14T22:14:21Z"


def test_failed_sync_does_not_mark_health_updated() -> None:
    rig = make_rig()
    rig.start(WEB, WEB_EPS)
    rig.update(endpoint_slice("web", "10.244.1.1"))
    rig.kernel.fail_next_restore()
    rig.wallclock.advance(61)
    assert not rig.sync()
    assert not rig.proxier.health.is_healthy()
    assert rig.sync()
    assert rig.proxier.health.is_healthy()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fetch(port: int) -> tuple[int, Mapping[str, Any]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def service_health() -> Iterator[ServiceHealthServer]:
    server = ServiceHealthServer(["127.0.0.1"], ProxierHealth(clock=FakeClock(T0)))
    yield server
    server.stop()


def test_service_health_server_gets_health_check_ports_and_local_counts(
    service_health: ServiceHealthServer,
) -> None:
    hc = free_port()
    lb = service(
        "lb",
        "10.96.0.30",
        svc_type="LoadBalancer",
        node_port=30030,
        etp="Local",
        hc_port=hc,
        lb_ip="203.0.113.7",
    )
    rig = make_rig(service_health=service_health)
    rig.start(lb, endpoint_slice("lb", "10.244.1.1", "10.244.1.2", node=NODE), WEB, WEB_EPS)
    assert service_health.listening() == {NamespacedName(NS, "lb"): [hc]}
    status, body = fetch(hc)
    assert status == 200
    assert body["localEndpoints"] == 2
    assert body["service"] == {"namespace": NS, "name": "lb"}

    rig.update(endpoint_slice("lb", "10.244.1.1", "10.244.1.2"))  # now on another node
    assert rig.sync()
    status, body = fetch(hc)
    assert (status, body["localEndpoints"]) == (503, 0)

    rig.delete(lb)
    assert rig.sync()
    assert service_health.listening() == {}


def test_nftables_modes_health_check_ports_listen_on_the_primary_node_ip() -> None:
    """nftables mode's NodePort addresses default to the node's primary IP (``primary``), and
    health-check node ports follow them there, as kube-proxy's (not every address)."""
    server = ServiceHealthServer([""], ProxierHealth(clock=FakeClock(T0)))
    proxier = Proxier(
        config=ProxyConfig(mode="nftables", cluster_cidr="10.244.0.0/16"),
        node_name=NODE,
        families=[IPV4],
        metrics=ProxyMetrics(proxy_mode="nftables"),
        health=ProxierHealth(clock=FakeClock(T0)),
        mode=NftablesMode(),
        service_health=server,
    )
    rig = Rig(
        proxier, None, FakeFlowTable(), RecordingRunner(), FakeClock(), FakeClock(T0), io.StringIO()
    )
    try:
        rig.add(node_object())
        proxier.handler("nodes").on_synced()
        rig.start(WEB, WEB_EPS)
        assert server.bind_addresses == ["192.168.0.10"]
    finally:
        server.stop()


# --- dry run -------------------------------------------------------------------------------


def test_dry_run_prints_the_initial_sync_summary() -> None:
    rig = make_rig(dry_run=True)
    rig.start(WEB, WEB_EPS, API, API_EPS)
    lines = rig.out.getvalue().splitlines()
    assert lines[0].startswith("# IPv4: initial sync: 2 service ports, ")
    assert lines[1].startswith("+ shop/api:p (tcp): ")
    assert "1 endpoints" in lines[1]
    assert lines[2].startswith("+ shop/web:p (tcp): ")
    assert "2 endpoints" in lines[2]
    assert service_chains(port_name("web")).cluster in lines[2]
    assert len(lines) == 3


def test_dry_run_prints_changed_rules_of_the_changed_service_only() -> None:
    rig = make_rig(dry_run=True)
    rig.start(WEB, WEB_EPS, API, API_EPS)
    rig.out.truncate(0)
    rig.out.seek(0)
    rig.update(endpoint_slice("web", "10.244.1.1", "10.244.1.3"))
    assert rig.sync()
    lines = rig.out.getvalue().splitlines()
    header = lines[0]
    assert header.startswith("# IPv4: shop/web:p (tcp) changed: +")
    removed = [line for line in lines[1:] if line.startswith("- ")]
    added = [line for line in lines[1:] if line.startswith("+ ")]
    assert header == f"# IPv4: shop/web:p (tcp) changed: +{len(added)} -{len(removed)}"
    assert len(removed) + len(added) == len(lines) - 1
    assert any("10.244.1.2" in line for line in removed)
    assert not any("10.244.1.2" in line for line in added)
    assert any("10.244.1.3" in line for line in added)
    assert "shop/api" not in rig.out.getvalue()


def test_dry_run_prints_removed_services_and_nothing_when_nothing_changed() -> None:
    rig = make_rig(dry_run=True)
    rig.start(WEB, WEB_EPS, API, API_EPS)
    rig.out.truncate(0)
    rig.out.seek(0)
    assert rig.sync()
    assert rig.out.getvalue() == ""
    rig.delete(API, API_EPS)
    assert rig.sync()
    lines = rig.out.getvalue().splitlines()
    assert lines[0].startswith("# IPv4: shop/api:p (tcp) removed: +0 -")
    assert all(line.startswith("- ") for line in lines[1:])
    assert any("10.244.2.1" in line for line in lines[1:])


def test_dry_run_syncs_after_the_first_are_partial() -> None:
    rig = make_rig(dry_run=True)
    rig.start(WEB, WEB_EPS)
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.sync() and not rig.full


# --- dual stack ----------------------------------------------------------------------------


def dual_stack_service(name: str, v4: str, v6: str, **kwargs: Any) -> Obj:
    obj = service(name, v4, **kwargs)
    obj["spec"]["clusterIPs"] = [v4, v6]
    obj["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    return obj


def v6_slice(svc: str, *ips: str, node: str = OTHER) -> Obj:
    obj = endpoint_slice(svc, *ips, node=node)
    obj["metadata"]["name"] = f"{svc}-v6xyz"
    obj["addressType"] = "IPv6"
    return obj


def test_dual_stack_no_local_gauge_counts_both_families_after_a_partial_sync() -> None:
    clock = FakeClock()
    kernels = {IPV4: FakeIptables(IPV4), IPV6: FakeIptables(IPV6)}
    proxier = Proxier(
        config=ProxyConfig(),
        node_name=NODE,
        families=[IPV4, IPV6],
        metrics=ProxyMetrics(),
        health=ProxierHealth(clock=FakeClock(T0)),
        dataplanes=kernels,
        clock=clock.now,
        wallclock=FakeClock(T0).now,
    )
    ext = dual_stack_service(
        "ext", "10.96.0.20", "fd00::20", svc_type="NodePort", node_port=30020, etp="Local"
    )
    for obj in (ext, endpoint_slice("ext", "10.244.1.1"), v6_slice("ext", "fd01::1")):
        proxier.handler(KINDS[obj["kind"]]).on_add(obj)
    proxier.handler("services").on_synced()
    proxier.handler("endpointslices").on_synced()
    assert proxier.sync_proxy_rules()

    def external() -> float | None:
        return proxier.metrics.registry.get_sample_value(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total", {"traffic_policy": "external"}
        )

    assert external() == 2  # one service port without local endpoints in each family
    proxier.handler("endpointslices").on_update({}, endpoint_slice("ext", "10.244.1.2"))
    assert proxier.sync_proxy_rules()
    assert proxier.last_sync is not None and not proxier.last_sync.full
    assert external() == 2
    for family, kernel in kernels.items():
        assert service_chains(port_name("ext")).external in kernel.chains("nat"), family


def v6_service(name: str, ip: str, **kwargs: Any) -> Obj:
    obj = service(name, ip, **kwargs)
    obj["spec"]["ipFamilies"] = ["IPv6"]
    return obj


def dual_stack_proxier(
    service_health: ServiceHealthServer, config: ProxyConfig | None = None
) -> Proxier:
    proxier = Proxier(
        config=config if config is not None else ProxyConfig(),
        node_name=NODE,
        families=[IPV4, IPV6],
        metrics=ProxyMetrics(),
        health=ProxierHealth(clock=FakeClock(T0)),
        dataplanes={IPV4: FakeIptables(IPV4), IPV6: FakeIptables(IPV6)},
        service_health=service_health,
        clock=FakeClock().now,
        wallclock=FakeClock(T0).now,
    )
    return proxier


def feed(proxier: Proxier, *objs: Obj) -> None:
    for obj in objs:
        proxier.handler(KINDS[obj["kind"]]).on_add(obj)


def start(proxier: Proxier, *objs: Obj) -> None:
    feed(proxier, *objs)
    proxier.handler("services").on_synced()
    proxier.handler("endpointslices").on_synced()
    assert proxier.sync_proxy_rules()


def test_ipv6_only_local_load_balancer_gets_its_health_check_server(
    service_health: ServiceHealthServer,
) -> None:
    """On dual-stack, an IPv6-only eTP=Local LoadBalancer must get a listener (it used to
    be read from the IPv4 family's state only)."""
    hc = free_port()
    lb = v6_service(
        "lb6",
        "fd00::30",
        svc_type="LoadBalancer",
        node_port=30031,
        etp="Local",
        hc_port=hc,
        lb_ip="2001:db8::7",
    )
    proxier = dual_stack_proxier(service_health)
    start(proxier, lb, v6_slice("lb6", "fd01::1", "fd01::2", node=NODE), WEB, WEB_EPS)
    assert service_health.listening() == {NamespacedName(NS, "lb6"): [hc]}
    status, body = fetch(hc)
    assert (status, body["localEndpoints"]) == (200, 2)


@pytest.mark.parametrize(
    ("node_ips", "config_ips", "expected"),
    [
        (["192.168.0.10", "fd00:192::10"], (), 2),  # IPv4 primary: two local IPv4 endpoints
        (["fd00:192::10", "192.168.0.10"], (), 1),  # IPv6 primary: one local IPv6 endpoint
        (["192.168.0.10", "fd00:192::10"], ("fd00:192::10",), 1),  # --node-ip wins
    ],
)
def test_dual_stack_health_check_counts_come_from_the_primary_family(
    service_health: ServiceHealthServer,
    node_ips: list[str],
    config_ips: tuple[str, ...],
    expected: int,
) -> None:
    hc = free_port()
    lb = dual_stack_service(
        "lb", "10.96.0.30", "fd00::30", svc_type="LoadBalancer", node_port=30030, etp="Local",
        hc_port=hc,
    )  # fmt: skip
    node = node_object()
    node["status"]["addresses"] = [{"type": "InternalIP", "address": ip} for ip in node_ips]
    proxier = dual_stack_proxier(service_health, ProxyConfig(node_ips=config_ips))
    start(
        proxier,
        node,
        lb,
        endpoint_slice("lb", "10.244.1.1", "10.244.1.2", node=NODE),
        v6_slice("lb", "fd01::1", node=NODE),
    )
    assert service_health.listening() == {NamespacedName(NS, "lb"): [hc]}
    assert fetch(hc)[1]["localEndpoints"] == expected


def test_health_check_counts_only_ready_local_endpoints_once_per_ip(
    service_health: ServiceHealthServer,
) -> None:
    """kube-proxy's LocalReadyEndpoints: distinct IPs, terminating ones do not count."""
    hc = free_port()
    lb = service("lb", "10.96.0.30", svc_type="LoadBalancer", node_port=30030, etp="Local",
                 hc_port=hc)  # fmt: skip
    eps = endpoint_slice("lb", "10.244.1.1", "10.244.1.2", node=NODE)
    eps["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    rig = make_rig(service_health=service_health)
    rig.start(lb, eps)
    assert fetch(hc)[1]["localEndpoints"] == 1
    eps["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    rig.update(eps)  # only terminating endpoints left here: they still get traffic, but ...
    assert rig.sync()
    assert fetch(hc)[0:1] == (503,)  # ... the load balancer must drain this node
    assert fetch(hc)[1]["localEndpoints"] == 0


def test_health_check_servers_honour_nodeport_addresses() -> None:
    hc = free_port()
    lb = service("lb", "10.96.0.30", svc_type="LoadBalancer", node_port=30030, etp="Local",
                 hc_port=hc)  # fmt: skip
    server = ServiceHealthServer(health=ProxierHealth(clock=FakeClock(T0)))  # every address
    try:
        proxier = Proxier(
            config=ProxyConfig(nodeport_addresses=("127.0.0.1/32",)),
            node_name=NODE,
            families=[IPV4],
            metrics=ProxyMetrics(),
            health=ProxierHealth(clock=FakeClock(T0)),
            dataplanes={IPV4: FakeIptables(IPV4)},
            service_health=server,
            local_addresses=lambda family: ["127.0.0.1", "127.0.0.2"],
            clock=FakeClock().now,
            wallclock=FakeClock(T0).now,
        )
        start(proxier, lb, endpoint_slice("lb", "10.244.1.1", node=NODE))
        assert fetch(hc)[0] == 200  # 127.0.0.1 is inside --nodeport-addresses
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.2", hc)) != 0  # 127.0.0.2 is not
    finally:
        server.stop()
