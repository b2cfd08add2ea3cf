"""Dual-stack: the families of the shared sync loop are independent, as kube-proxy's proxier
per family (its meta-proxier): an IPv6 apply failure keeps IPv6's old rules, is counted,
backs off and makes IPv6's next sync full, while IPv4 gets its rules and everything after them
(UDP conntrack cleanup, health, health-check node ports, metrics) and stays partial.

Fakes only: a :class:`FakeIptables` per family, a :class:`FakeFlowTable`, fake clocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler
from minikproxy.dataplane.execer import ExecCancelledError
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.proxier import Proxier
from minikproxy.runner import FakeClock
from minikproxy.testing.fake_conntrack import FakeFlowTable, describe, udp_flow
from minikproxy.testing.fake_iptables import FakeIptables

from .test_proxier import (
    KINDS,
    NODE,
    OTHER,
    T0,
    Obj,
    RecordingRunner,
    dual_stack_service,
    endpoint_slice,
    fetch,
    free_port,
    v6_slice,
)

HC = free_port()
DNS = dual_stack_service("dns", "10.96.0.53", "fd00::53", protocol="UDP", port=53)
LB = dual_stack_service(
    "lb", "10.96.0.30", "fd00::30", svc_type="LoadBalancer", node_port=30030, etp="Local",
    hc_port=HC, lb_ip="192.0.2.30",
)  # fmt: skip


def dns_v4(*ips: str) -> Obj:
    return endpoint_slice("dns", *ips, protocol="UDP")


def dns_v6(*ips: str) -> Obj:
    obj = v6_slice("dns", *ips)
    obj["ports"][0]["protocol"] = "UDP"
    return obj


@dataclass
class DualRig:
    proxier: Proxier
    kernels: dict[IPFamily, FakeIptables]
    flows: FakeFlowTable
    runner: RecordingRunner
    wallclock: FakeClock

    def objects(self, *objs: Obj, update: bool = False) -> None:
        for obj in objs:
            handler = self.proxier.handler(KINDS[obj["kind"]])
            if update:
                handler.on_update({}, obj)
            else:
                handler.on_add(obj)

    def metric(self, name: str, **labels: str) -> float:
        value = self.proxier.metrics.registry.get_sample_value(f"kubeproxy_{name}", labels)
        return 0.0 if value is None else value

    @property
    def health(self) -> ProxierHealth:
        return self.proxier.health


@pytest.fixture
def rig() -> Iterator[DualRig]:
    wallclock = FakeClock(T0)
    health = ProxierHealth(clock=wallclock, health_timeout=60)
    server = ServiceHealthServer(health=health)
    flows, runner = FakeFlowTable(), RecordingRunner()
    kernels = {IPV4: FakeIptables(IPV4), IPV6: FakeIptables(IPV6)}
    proxier = Proxier(
        config=ProxyConfig(node_ips=("192.168.0.10", "fd00:192::10")),
        node_name=NODE,
        families=[IPV4, IPV6],
        metrics=ProxyMetrics(),
        health=health,
        dataplanes=kernels,
        conntrack=ConntrackReconciler(flows),
        service_health=server,
        clock=FakeClock().now,
        wallclock=wallclock.now,
        runner=runner,
    )
    try:
        yield DualRig(proxier, kernels, flows, runner, wallclock)
    finally:
        server.stop()


def start(rig: DualRig) -> None:
    rig.health.updated(IPV4)  # what the controller does when the loop starts
    rig.health.updated(IPV6)
    rig.objects(
        DNS,
        dns_v4("10.244.1.1", "10.244.1.2"),
        dns_v6("fd01::1"),
        LB,
        endpoint_slice("lb", "10.244.1.5", node=NODE),
        v6_slice("lb", "fd01::5", node=NODE),
    )
    rig.proxier.handler("services").on_synced()
    rig.proxier.handler("endpointslices").on_synced()
    assert rig.proxier.sync_proxy_rules()


def test_an_ipv6_failure_does_not_hold_back_ipv4(rig: DualRig) -> None:
    start(rig)
    status, body = fetch(HC)
    assert (status, body["localEndpoints"]) == (200, 1)
    v6_before = rig.kernels[IPV6].dump()
    stale_v4 = udp_flow("10.244.9.9", 1000, "10.96.0.53", 53, reply_src="10.244.1.2",
                        reply_sport=8080)  # fmt: skip
    live_v6 = udp_flow("fd01:9::9", 1000, "fd00::53", 53, reply_src="fd01::1", reply_sport=8080)
    rig.flows.add(stale_v4, live_v6)

    # IPv4: a UDP endpoint goes and the LB's only local endpoint moves away; IPv6 changes too,
    # but its apply fails.
    rig.objects(
        dns_v4("10.244.1.1"),
        endpoint_slice("lb", "10.244.1.6", node=OTHER),
        dns_v6("fd01::2"),
        update=True,
    )
    rig.wallclock.advance(61)  # the updates were queued longer than the health timeout ago
    rig.kernels[IPV6].fail_next_restore()
    assert rig.proxier.sync_proxy_rules() is False
    result = rig.proxier.last_sync
    assert result is not None
    assert (result.ok, result.failed, result.full_families) == (False, (IPV6,), frozenset())
    assert result.error.startswith("IPv6: ")

    # IPv6 kept its rules, was counted and backs off ...
    assert rig.kernels[IPV6].dump() == v6_before
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 1
    assert rig.metric("sync_proxy_rules_iptables_partial_restore_failures_total") == 1
    assert rig.runner.retries == [1.0]
    # ... while IPv4 has its rules and everything after them.
    assert "10.244.1.2" not in rig.kernels[IPV4].dump()
    assert rig.flows.remaining() == {describe(live_v6)}  # IPv6 still routes to fd01::1
    status, body = fetch(HC)
    assert (status, body["localEndpoints"]) == (503, 0)  # the primary family's (IPv4) count
    assert rig.metric("sync_proxy_rules_no_local_endpoints_total", traffic_policy="external") == 1
    assert rig.metric("sync_proxy_rules_duration_seconds_count") == 2
    assert rig.metric("sync_proxy_rules_last_timestamp_seconds") == T0 + 61
    # kube-proxy's healthz: IPv4 updated, IPv6 still late, so the proxy is unhealthy.
    healthy, health = rig.health.health()
    assert not healthy
    assert health["status"]["IPv4"]["healthy"] is True
    assert health["status"]["IPv6"]["healthy"] is False

    # The retry: IPv6 in full, IPv4 (nothing new) partial: no restore at all.
    v4_restores = rig.kernels[IPV4].restore_count
    assert rig.proxier.sync_proxy_rules()
    result = rig.proxier.last_sync
    assert (result.ok, result.failed, result.full_families) == (True, (), frozenset({IPV6}))
    assert rig.kernels[IPV4].restore_count == v4_restores
    assert "[fd01::2]:8080" in rig.kernels[IPV6].dump()
    assert "fd01::1" not in rig.kernels[IPV6].dump()
    assert rig.flows.remaining() == set()  # now IPv6's flows to fd01::1 are stale
    assert rig.health.is_healthy()
    assert rig.runner.retries == [1.0]

    # And both are partial again.
    rig.objects(dns_v4("10.244.1.1", "10.244.1.3"), dns_v6("fd01::3"), update=True)
    assert rig.proxier.sync_proxy_rules()
    assert rig.proxier.last_sync is not None
    assert rig.proxier.last_sync.full_families == frozenset()


def test_each_family_backs_off_on_its_own_failures(rig: DualRig) -> None:
    start(rig)
    for n, change in enumerate((("10.244.1.7",), ("10.244.1.8",), ("10.244.1.9",))):
        rig.objects(dns_v4(*change), update=True)
        rig.kernels[IPV4 if n == 2 else IPV6].fail_next_restore()
        if n < 2:
            rig.proxier.force_full_sync("test")  # IPv6 must write, hence fail, every time
        assert rig.proxier.sync_proxy_rules() is False
    # IPv6 failed twice (1 s, 2 s); then IPv4 failed for the first time (1 s), while IPv6
    # succeeded in full.
    assert rig.runner.retries == [1.0, 2.0, 1.0]
    assert rig.proxier.last_sync is not None
    assert rig.proxier.last_sync.failed == (IPV4,)
    assert rig.proxier.last_sync.full_families == frozenset({IPV6})
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 3


def test_a_snapshot_failure_fails_every_family_once(
    rig: DualRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    start(rig)
    rig.objects(dns_v4("10.244.1.7"), update=True)

    def broken(*_args: Any) -> Any:
        raise KeyError("half-way")

    monkeypatch.setattr(rig.proxier.tracker, "snapshot", broken)
    assert rig.proxier.sync_proxy_rules() is False
    assert rig.proxier.last_sync is not None
    assert rig.proxier.last_sync.failed == (IPV4, IPV6)
    assert rig.metric("sync_proxy_rules_iptables_restore_failures_total") == 1
    monkeypatch.undo()
    assert rig.proxier.sync_proxy_rules()
    assert rig.proxier.last_sync.full_families == frozenset({IPV4, IPV6})
    assert "10.244.1.7" in rig.kernels[IPV4].dump()


def test_on_first_sync_waits_for_every_family_and_runs_once(rig: DualRig) -> None:
    """The controller removes the other modes' leftovers there: not before every family's
    rules are in (the old mode's keep serving the failed family), and only once."""
    calls: list[int] = []
    rig.proxier.on_first_sync = lambda: calls.append(len(calls))
    rig.kernels[IPV6].fail_next_restore()
    rig.objects(DNS, dns_v4("10.244.1.1"), dns_v6("fd01::1"))
    rig.proxier.handler("services").on_synced()
    rig.proxier.handler("endpointslices").on_synced()
    assert rig.proxier.sync_proxy_rules() is False  # IPv4 in, IPv6 not
    assert calls == []
    assert rig.proxier.sync_proxy_rules()
    assert calls == [0]
    rig.objects(dns_v4("10.244.1.2"), update=True)
    assert rig.proxier.sync_proxy_rules()
    assert calls == [0]


def test_on_first_sync_runs_one_sync_period_after_the_first_family_when_another_keeps_failing(
    rig: DualRig,
) -> None:
    """The old mode's rules serve a failing family for a while, not for ever: one full-sync
    period after the first family's rules went in, the leftovers go (as kube-proxy removes
    them at start-up, whatever happens later)."""
    clock = FakeClock(100.0)
    rig.proxier.clock = clock.now
    calls: list[int] = []
    rig.proxier.on_first_sync = lambda: calls.append(len(calls))
    rig.objects(DNS, dns_v4("10.244.1.1"), dns_v6("fd01::1"))
    rig.proxier.handler("services").on_synced()
    rig.proxier.handler("endpointslices").on_synced()
    rig.kernels[IPV6].fail_next_restore()
    assert rig.proxier.sync_proxy_rules() is False  # IPv4 in, IPv6 not
    clock.advance(rig.proxier.full_sync_period - 1)
    rig.kernels[IPV6].fail_next_restore()
    assert rig.proxier.sync_proxy_rules() is False
    assert calls == []
    clock.advance(1)
    rig.kernels[IPV6].fail_next_restore()
    assert rig.proxier.sync_proxy_rules() is False
    assert calls == [0]
    assert rig.proxier.sync_proxy_rules()  # IPv6 in at last: not called again
    assert calls == [0]


def test_a_cancellation_keeps_an_earlier_familys_own_failure(
    rig: DualRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IPv4 fails for real, then the stop cancels IPv6: IPv4's failure is still counted."""
    start(rig)
    real = rig.proxier._sync_family

    def sync_family(family: IPFamily, *args: Any) -> None:
        if family == IPV4:
            raise RuntimeError("iptables-restore: line 7 failed")
        try:
            raise ExecCancelledError("stopping")
        except ExecCancelledError as err:
            raise RuntimeError("ip6tables-restore cancelled") from err

    monkeypatch.setattr(rig.proxier, "_sync_family", sync_family)
    rig.objects(dns_v4("10.244.1.3"), update=True)
    assert rig.proxier.sync_proxy_rules() is False
    result = rig.proxier.last_sync
    assert result is not None and "line 7 failed" in result.error
    assert rig.proxier._families[IPV4].failures == 1
    monkeypatch.setattr(rig.proxier, "_sync_family", real)


def test_a_failure_after_the_rules_went_in_is_logged_not_raised(
    rig: DualRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The post-sync work (health, metrics) failing must not escape to the runner: the
    rules are in, and the conntrack cleanup and the duration metric still happen."""
    start(rig)
    before = rig.metric("sync_proxy_rules_duration_seconds_count")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("health server broke")

    monkeypatch.setattr(rig.proxier, "_after_success", broken)
    rig.objects(dns_v4("10.244.1.4"), update=True)
    assert rig.proxier.sync_proxy_rules()
    assert "health server broke" in caplog.text
    assert rig.metric("sync_proxy_rules_duration_seconds_count") == before + 1
