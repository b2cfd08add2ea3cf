"""The UDP conntrack reconciler: deleting 1000 stale UDP flows out of a 50k-flow table, in a
network namespace, through the real kernel (ctnetlink dump, selection, batched deletes); and
the parts alone: parsing a 50k-flow dump, and the pure selection over 50k rows.

Two tables of 50,000 flows: every flow UDP (the worst case: the whole table crosses into
Python), and a mix of 45,000 TCP and 5,000 UDP flows (the kernel's filter keeps TCP in the
kernel). 500 UDP Services x 3 serving endpoints; the 1000 stale flows are DNATed to endpoints
that are gone. Creating the table and the stale flows is setup, never measured. Needs root.
Run:

    .venv/bin/python -m pytest bench/bench_conntrack.py --benchmark-only
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.compile.iptables import IptablesOptions
from minikproxy.ctreconcile import ConntrackReconciler, stale_rows, wanted_flows
from minikproxy.dataplane.ctnetlink import CtNetlink, NetlinkConntrack, UdpDump, pack_port
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState

TABLE = 50_000
STALE = 1000
SERVICES = 500
ENDPOINTS = 3
IPPROTO_TCP = 6

Triple = tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]


def ip(n: int, base: str) -> bytes:
    return (ipaddress.ip_address(base) + n).packed


def cluster_state() -> ProxyState:
    services, endpoints = {}, {}
    for s in range(SERVICES):
        name = ServicePortName("bench", f"udp-{s}", "dns", "UDP")
        vip = str(ipaddress.ip_address("10.96.0.0") + s)
        services[name] = ServicePort(name, IPV4, vip, 53)
        endpoints[name] = tuple(
            make_endpoint(str(ipaddress.ip_address("10.244.0.0") + s * ENDPOINTS + e), 8053)
            for e in range(ENDPOINTS)
        )
    return ProxyState(IPV4, NodeInfo(name="node"), services=services, endpoints=endpoints)


def service_flows(count: int, *, stale: bool, offset: int) -> list[Triple]:
    """``count`` UDP flows to the Services, answered by a serving endpoint or (``stale``) by a
    gone one."""
    flows = []
    for i in range(offset, offset + count):
        s = i % SERVICES
        backend = ip(s * ENDPOINTS + i % ENDPOINTS, "10.245.0.0" if stale else "10.244.0.0")
        origin = (ip(i // 50_000, "10.1.0.0"), pack_port(1024 + i % 50_000))
        flows.append((origin, (ip(s, "10.96.0.0"), pack_port(53)), (backend, pack_port(8053))))
    return flows


def other_flows(count: int) -> list[Triple]:
    """``count`` flows that are no Service's (to port 443 of outside addresses)."""
    return [
        (
            (ip(i // 40_000, "10.2.0.0"), pack_port(1024 + i % 40_000)),
            (ip(i % 1000, "172.16.0.0"), pack_port(443)),
            (ip(i % 1000, "172.16.0.0"), pack_port(443)),
        )
        for i in range(count)
    ]


class Table:
    """A network namespace holding a conntrack table."""

    def __init__(self, udp: int, tcp: int) -> None:
        self.netns = f"mkpbench{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            self.ct = run_in_netns(self.netns, CtNetlink)
            live = service_flows(udp - STALE, stale=False, offset=0)
            assert self.ct.create(IPV4, live).deleted == len(live)
            tcp_flows = other_flows(tcp)
            created = self.ct.create(IPV4, tcp_flows, protocol=IPPROTO_TCP)
            assert created.deleted == len(tcp_flows), created
        except BaseException:
            self.close()
            raise
        self.stale = service_flows(STALE, stale=True, offset=udp)

    def add_stale(self) -> None:
        result = self.ct.create(IPV4, self.stale)
        assert result.deleted == STALE, result

    def close(self) -> None:
        if hasattr(self, "ct"):
            self.ct.close()
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


@pytest.fixture(
    scope="module",
    params=[("all-udp", TABLE, 0), ("mix", 5000, TABLE - 5000)],
    ids=["all-udp", "45k-tcp-5k-udp"],
)
def table(request: pytest.FixtureRequest) -> Iterator[Table]:
    _, udp, tcp = request.param
    t = Table(udp, tcp)
    try:
        yield t
    finally:
        t.close()


def test_reconcile_1000_stale_of_50k(benchmark: Any, table: Table) -> None:
    """One family's whole reconcile, as after a sync: dump, select, delete 1000."""
    state, options = cluster_state(), IptablesOptions()
    flows = NetlinkConntrack(table.netns)
    reconciler = ConntrackReconciler(flows)
    results = []

    def run() -> None:
        results.append(reconciler.reconcile(state, options))

    try:
        benchmark.pedantic(run, setup=table.add_stale, rounds=15, iterations=1)
    finally:
        flows.close()
    assert all(r.deleted == STALE and r.stale == STALE for r in results), results[:2]
    benchmark.extra_info["udp_flows_listed"] = results[0].listed


@pytest.fixture(scope="module")
def dumped() -> Iterator[UdpDump]:
    t = Table(TABLE, 0)
    try:
        t.add_stale()
        yield t.ct.dump_udp(IPV4)
    finally:
        t.close()


def test_parse_50k_udp_dump(benchmark: Any, dumped: UdpDump) -> None:
    """Parsing the received chunks of a 50k-flow UDP dump (no kernel time)."""
    rows = benchmark(lambda: UdpDump(dumped.chunks, IPV4).rows)
    assert len(rows) == TABLE


def test_select_stale_among_50k(benchmark: Any, dumped: UdpDump) -> None:
    """The pure decision over 50k rows (wanted state built outside the measurement)."""
    wanted = wanted_flows(cluster_state())
    stale = benchmark(stale_rows, dumped.rows, wanted)
    assert len(stale) == STALE


def test_wanted_state_of_500_udp_services(benchmark: Any) -> None:
    """Building the wanted state (frontends -> serving endpoints) from the applied state."""
    state = cluster_state()
    assert len(benchmark(wanted_flows, state)) == SERVICES
