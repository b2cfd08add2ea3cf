"""IPVS mode in an IPVS kernel: the initial full load against the stock tools, and one endpoint
change end to end over real netlink against the same path with an in-memory kernel.

Needs a kernel with IPVS (skipped elsewhere): run it in the VM, where emulation makes absolute
times meaningless but ratios measured in one run hold::

    IPVS_VM_MEM=6144 IPVS_VM_TIMEOUT=7200 scripts/ipvs-vm.sh run /var/cache/minikproxy/ipvs-vm -- \\
        env MINIKPROXY_IPVS_BENCH_SERVICES=10000 .venv/bin/python -m pytest \\
        bench/bench_ipvs_kernel.py --benchmark-only -p no:cacheprovider

(the VM passes only its command line: set the variables with ``env`` inside it).
``MINIKPROXY_IPVS_BENCH_SERVICES`` sets the size (default 1000 Services x 10 endpoints),
``MINIKPROXY_IPVS_BENCH_ROUNDS`` the initial loads of each kind (default 3);
``MINIKPROXY_IPVS_BULK=0`` makes the applier add everything over netlink, one operation each.

- ``test_initial_load_against_the_tools``: our initial full load (compile included: what the
  sync loop does first) into an empty namespace, against ``ipset restore`` + ``ipvsadm -R`` +
  ``ip -batch`` + ``iptables-restore`` of the same state (render's four sections, rendered
  beforehand) into another, the two alternating round by round.
- ``test_one_endpoint_change[netlink|memory]``: an endpoint removed or added back (alternately)
  in one ClusterIP Service (one virtual server; a NodePort one has one more per node IP,
  each one operation): snapshot, incremental compile, partial apply, into a namespace holding the
  whole state (netlink) or into :class:`FakeIpvsKernel` (memory); ``extra_info`` counts the
  kernel calls per change by kind, reads included.
"""

from __future__ import annotations

import os
import secrets
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.benchmark.measure import ipvs_tool_load
from minikproxy.compile.ipvs import compile_ipvs
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.dataplane.ipvs import ExecBulkLoader, IpvsApplier, NetlinkIpvsKernel
from minikproxy.model.names import IPV4
from minikproxy.testing.fake_iptables import FakeIptables
from minikproxy.testing.fake_ipvs import FakeIpvsKernel
from minikproxy.testing.ipvsload import kernel_has_ipvs
from minikproxy.testing.synthetic import service_type

from .bench_ipvs import EndpointFlip, bench_ipvs_options
from .conftest import tracked

pytestmark = pytest.mark.skipif(not kernel_has_ipvs(), reason="needs a kernel with IPVS")

SERVICES = int(os.environ.get("MINIKPROXY_IPVS_BENCH_SERVICES", "1000"))
ROUNDS = int(os.environ.get("MINIKPROXY_IPVS_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="module")
def sections() -> Iterator[tuple[Any, str]]:
    _, snapshot = tracked(SERVICES)
    plan = compile_ipvs(snapshot.state, bench_ipvs_options())
    yield plan, plan.render()


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    _drop(created)


def _drop(created: list[str]) -> None:
    """Delete the namespaces, their virtual servers first: IPVS keeps every namespace's in
    one hash table, so a loaded namespace left behind slows the next loads, and ``ipvsadm
    -C`` empties it now rather than in the kernel's namespace cleanup during the next one."""
    for netns in created:
        subprocess.run(["ip", "netns", "exec", netns, "ipvsadm", "-C"], check=False)
        subprocess.run(["ip", "netns", "del", netns], check=False)
    created.clear()


def _fresh(created: list[str]) -> str:
    netns = f"mkpb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    created.append(netns)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    return netns


def _applier(netns: str, kernel: NetlinkIpvsKernel) -> IpvsApplier:
    execer = RealExecer(netns)
    # No time limit on the tools: emulated, a 10k load takes minutes
    bulk = (
        ExecBulkLoader(execer, timeout=None)
        if os.environ.get("MINIKPROXY_IPVS_BULK", "1") == "1"
        else None
    )
    return IpvsApplier(kernel, RealIptables(execer, IPV4, "nft"), IPV4, bulk)


def test_initial_load_against_the_tools(benchmark, sections, namespaces) -> None:  # type: ignore[no-untyped-def]
    """Timed: our initial load. Before each round (in its setup) the tools load the same
    state into another fresh namespace, timed here: the two alternate, so a change in the
    machine's load hits both alike. ``extra_info``: the tools' times and each round's ratio."""
    plan, text = sections
    _, snapshot = tracked(SERVICES)
    options = bench_ipvs_options()
    kernels: list[NetlinkIpvsKernel] = []
    tools: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kernels:
            kernels[-1].close()
        _drop(namespaces)  # each load starts from a kernel without the others' state
        netns = _fresh(namespaces)
        tools.append(ipvs_tool_load(netns, text))  # minikproxy bench's baseline
        _drop(namespaces)
        netns = _fresh(namespaces)
        kernels.append(NetlinkIpvsKernel(netns))
        return (_applier(netns, kernels[-1]),), {}

    def load(applier: IpvsApplier) -> None:
        applier.apply(compile_ipvs(snapshot.state, options))

    try:
        benchmark.pedantic(load, setup=setup, rounds=ROUNDS, iterations=1)
    finally:
        if kernels:
            kernels[-1].close()
    ours = benchmark.stats.stats.data
    benchmark.extra_info["services"] = SERVICES
    benchmark.extra_info["virtual_servers"] = len(plan.virtual_servers)
    benchmark.extra_info["real_servers"] = sum(
        len(vs.real_servers) for vs in plan.virtual_servers.values()
    )
    benchmark.extra_info["tools_seconds"] = [round(t, 2) for t in tools]
    benchmark.extra_info["ours_seconds"] = [round(t, 2) for t in ours]
    benchmark.extra_info["ratios"] = [round(o / t, 3) for o, t in zip(ours, tools, strict=True)]


class CountingKernel:
    """Forwards to an :class:`IpvsKernel`, counting the calls by name (reads included) and
    adding up their seconds."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.calls: Counter[str] = Counter()
        self.seconds: dict[str, list[float]] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.kernel, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds.setdefault(name, []).append(time.perf_counter() - start)

        return counted


@pytest.mark.parametrize("kind", ["netlink", "memory"])
def test_one_endpoint_change(benchmark, kind, namespaces) -> None:  # type: ignore[no-untyped-def]
    tracker, snapshot = tracked(SERVICES)
    options = bench_ipvs_options()
    plan = compile_ipvs(snapshot.state, options)
    netlink: NetlinkIpvsKernel | None = None
    if kind == "netlink":
        netns = _fresh(namespaces)
        netlink = NetlinkIpvsKernel(netns)
        applier = _applier(netns, netlink)
        applier.apply(plan)  # the whole state, in bulk
        kernel = CountingKernel(netlink)
    else:
        kernel = CountingKernel(FakeIpvsKernel())
        applier = IpvsApplier(kernel, FakeIptables(), IPV4)
        applier.apply(plan)
    applier.kernel = kernel
    kernel.seconds.clear()  # the changes' calls only
    per_change: list[Counter[str]] = []
    which = SERVICES // 2 + 1  # a ClusterIP Service: one virtual server
    assert service_type(which) == "ClusterIP"
    flip = EndpointFlip(tracker, options, plan, which)

    def change_and_apply() -> None:
        new = flip.next_plan()
        kernel.calls.clear()
        applier.apply(new)
        per_change.append(Counter(kernel.calls))

    try:
        benchmark.pedantic(change_and_apply, rounds=40, iterations=1)
    finally:
        flip.restore()
        if netlink is not None:
            netlink.close()
    kinds = sorted({tuple(sorted(c.items())) for c in per_change})
    benchmark.extra_info["kernel_calls_per_change"] = [dict(k) for k in kinds]
    benchmark.extra_info["median_ms_per_call"] = {
        name: round(statistics.median(times) * 1000, 3)
        for name, times in sorted(kernel.seconds.items())
    }
    # one read of the virtual server, one dump of its real servers, one write: no more
    assert kinds == [
        (("add_dest", 1), ("dests", 1), ("service", 1)),
        (("delete_dest", 1), ("dests", 1), ("service", 1)),
    ], kinds
