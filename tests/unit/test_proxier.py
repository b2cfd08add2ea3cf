"""The proxier's sync logic against the in-memory fakes: no kernel, no sleeps.

A :class:`Proxier` is built directly over a :class:`FakeIptables` and a :class:`FakeConntrack`,
fed API objects through its handlers, and synced by calling ``sync_proxy_rules()``; time comes
from :class:`FakeClock` instances, and a recording runner captures ``run``/``retry_after``.
"""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from minikproxy.compile.names import KUBE_PROXY_CANARY, service_chains
from minikproxy.config import ProxyConfig
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV4, IPV6, NamespacedName, ServicePortName
from minikproxy.model.parse import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION
from minikproxy.proxier import Proxier, SyncResult
from minikproxy.runner import FakeClock
from minikproxy.testing.fake_conntrack import FakeConntrack
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
    conntrack: FakeConntrack
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
    conntrack, runner, out = FakeConntrack(), RecordingRunner(), io.StringIO()
    proxier = Proxier(
        config=ProxyConfig(cluster_cidr="10.244.0.0/16"),
        node_name=NODE,
        families=[IPV4],
        metrics=ProxyMetrics(),
        health=health if health is not None else ProxierHealth(clock=wallclock),
        dataplanes=None if kernel is None else {IPV4: kernel},
        conntrack=conntrack,
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


DNS = service("dns", "10.96.0.53", protocol="UDP", svc_type="NodePort", node_port=30053)


def test_first_sync_clears_no_conntrack_entries() -> None:
    rig = make_rig()
    rig.start(DNS, endpoint_slice("dns", "10.244.1.1", protocol="UDP"))
    ct = rig.conntrack
    assert not (ct.cleared_ips or ct.cleared_ports or ct.cleared_nats or ct.cleared_port_nats)


def test_removed_udp_endpoint_flows_are_cleared() -> None:
    rig = make_rig()
    rig.start(DNS, endpoint_slice("dns", "10.244.1.1", "10.244.1.2", protocol="UDP"))
    rig.update(endpoint_slice("dns", "10.244.1.1", protocol="UDP"))
    assert rig.sync()
    ct = rig.conntrack
    assert ct.cleared_nats == {("10.96.0.53", "10.244.1.2", "udp")}
    assert ct.cleared_port_nats == {(30053, "10.244.1.2", "udp")}
    assert not ct.cleared_ips and not ct.cleared_ports


def test_udp_service_getting_its_first_endpoints_clears_rejected_flows() -> None:
    rig = make_rig()
    rig.start(DNS)
    rig.add(endpoint_slice("dns", "10.244.1.1", "10.244.1.2", protocol="UDP"))
    assert rig.sync()
    ct = rig.conntrack
    assert ct.cleared_ips == {("10.96.0.53", "udp")}
    assert ct.cleared_ports == {(30053, "udp", IPV4)}
    assert not ct.cleared_nats and not ct.cleared_port_nats


def test_deleted_udp_service_clears_its_endpoints_flows() -> None:
    rig = make_rig()
    dns_eps = endpoint_slice("dns", "10.244.1.1", protocol="UDP")
    rig.start(DNS, dns_eps)
    rig.delete(DNS, dns_eps)
    assert rig.sync()
    assert rig.conntrack.cleared_nats == {("10.96.0.53", "10.244.1.1", "udp")}


def test_unchanged_udp_services_are_not_touched_by_a_later_full_sync() -> None:
    rig = make_rig()
    rig.start(DNS, endpoint_slice("dns", "10.244.1.1", protocol="UDP"))
    rig.proxier.force_full_sync("test")
    assert rig.sync() and rig.full
    ct = rig.conntrack
    assert not (ct.cleared_ips or ct.cleared_ports or ct.cleared_nats or ct.cleared_port_nats)


def test_udp_cleanup_still_happens_when_the_changes_first_sync_failed() -> None:
    rig = make_rig()
    rig.start(DNS, endpoint_slice("dns", "10.244.1.1", "10.244.1.2", protocol="UDP"))
    rig.update(endpoint_slice("dns", "10.244.1.1", protocol="UDP"))
    rig.kernel.fail_next_restore()
    assert not rig.sync()
    assert not rig.conntrack.cleared_nats  # the rules still DNAT to 10.244.1.2
    assert rig.sync() and rig.full
    assert rig.conntrack.cleared_nats == {("10.96.0.53", "10.244.1.2", "udp")}


def test_tcp_services_never_touch_conntrack() -> None:
    rig = make_rig()
    web = service("web", "10.96.0.10", svc_type="NodePort", node_port=30080)
    rig.start(web)
    rig.add(endpoint_slice("web", "10.244.1.1", "10.244.1.2"))
    assert rig.sync()
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.sync()
    rig.delete(web)
    assert rig.sync()
    ct = rig.conntrack
    assert not (ct.cleared_ips or ct.cleared_ports or ct.cleared_nats or ct.cleared_port_nats)


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
    rig.start()
    assert rig.metric("sync_proxy_rules_service_changes_pending") == 0
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 0
    rig.update(endpoint_slice("web", "10.244.1.1"))
    assert rig.metric("sync_proxy_rules_endpoint_changes_total") == 2
    assert rig.metric("sync_proxy_rules_endpoint_changes_pending") == 1
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
