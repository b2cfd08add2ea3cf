"""IPVS mode benchmarks at 10k Services x 10 endpoints: a full compile, and one endpoint
change end to end (snapshot, incremental compile, partial apply) through the applier with an
in-memory kernel, counting the kernel operations it makes (one).

The netlink cost of those operations, and the initial load against ``ipvsadm -R`` + ``ipset
restore``, need an IPVS kernel: bench/bench_ipvs_kernel.py measures them in the IPVS VM
(emulated, so only ratios within one run there mean much).

Run: .venv/bin/python -m pytest bench/bench_ipvs.py --benchmark-only
"""

from __future__ import annotations

from itertools import count
from typing import Any

from minikproxy.benchmark.adapters import ipvs_options
from minikproxy.compile.ipvs import IpvsOptions, IpvsPlan, compile_ipvs
from minikproxy.dataplane.ipvs import IpvsApplier
from minikproxy.model.names import IPV4
from minikproxy.testing.fake_iptables import FakeIptables
from minikproxy.testing.fake_ipvs import FakeIpvsKernel
from minikproxy.testing.synthetic import synthetic_slice

from .conftest import ENDPOINTS_PER_SERVICE, tracked


def bench_ipvs_options() -> IpvsOptions:
    """Options like a real node's: ClusterCIDR detection, a node IP for NodePorts (the
    engine's, as ``minikproxy bench`` uses them)."""
    return ipvs_options()


class EndpointFlip:
    """One Service's last endpoint removed, then added back, in turn: each call of
    :meth:`next_plan` changes the EndpointSlice in ``tracker`` and compiles incrementally
    (snapshot + IPVS compile from the previous plan)."""

    def __init__(self, tracker: Any, options: IpvsOptions, plan: IpvsPlan, which: int) -> None:
        self.tracker, self.options, self.plan, self.which = tracker, options, plan, which
        self._rounds = count()

    def next_plan(self) -> IpvsPlan:
        """The plan after the next change (kept as the previous one of the change after)."""
        obj = synthetic_slice(self.which, ENDPOINTS_PER_SERVICE)
        if next(self._rounds) % 2 == 0:
            obj["endpoints"] = obj["endpoints"][:-1]
        self.tracker.upsert_endpoint_slice(obj)
        snap = self.tracker.snapshot(IPV4)
        self.plan = compile_ipvs(
            snap.state, self.options, previous=self.plan, changed_services=snap.changed
        )
        return self.plan

    def restore(self) -> None:
        """Leave the (shared) tracker as it was."""
        self.tracker.upsert_endpoint_slice(synthetic_slice(self.which, ENDPOINTS_PER_SERVICE))
        self.tracker.snapshot(IPV4)


def test_full_compile(benchmark) -> None:  # type: ignore[no-untyped-def]
    """A full compile at 10k x 10 (target: <= 0.5 s)."""
    _, snapshot = tracked(10000)
    options = bench_ipvs_options()
    plan = compile_ipvs(snapshot.state, options)
    benchmark.extra_info["virtual_servers"] = len(plan.virtual_servers)
    benchmark.extra_info["real_servers"] = sum(
        len(vs.real_servers) for vs in plan.virtual_servers.values()
    )
    benchmark.pedantic(lambda: compile_ipvs(snapshot.state, options), rounds=5, iterations=1)


def test_one_endpoint_change_end_to_end(benchmark) -> None:  # type: ignore[no-untyped-def]
    """One endpoint removed or added back (alternately) at 10k x 10: snapshot, incremental
    compile, partial apply; the kernel sees exactly one operation (target: <= 10 ms)."""
    tracker, snapshot = tracked(10000)
    options = bench_ipvs_options()
    kernel = FakeIpvsKernel()
    applier = IpvsApplier(kernel, FakeIptables(), IPV4)
    plan = compile_ipvs(snapshot.state, options)
    applier.apply(plan)
    flip = EndpointFlip(tracker, options, plan, 4242)
    operations: list[int] = []

    def change_and_apply() -> None:
        new = flip.next_plan()
        before = len(kernel.log)
        applier.apply(new)
        operations.append(len(kernel.log) - before)

    benchmark.pedantic(change_and_apply, rounds=40, iterations=1)
    benchmark.extra_info["kernel_operations_per_change"] = sorted(set(operations))
    assert set(operations) == {1}, operations
    flip.restore()
