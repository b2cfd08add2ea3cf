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

from minikproxy.benchmark.adapters import ipvs_options
from minikproxy.compile.ipvs import IpvsOptions, compile_ipvs
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
    rounds = count()
    operations: list[int] = []
    state = {"plan": plan}

    def change_and_apply() -> None:
        obj = synthetic_slice(4242, ENDPOINTS_PER_SERVICE)
        if next(rounds) % 2 == 0:
            obj["endpoints"] = obj["endpoints"][:-1]  # the last endpoint goes, then comes back
        tracker.upsert_endpoint_slice(obj)
        snap = tracker.snapshot(IPV4)
        new = compile_ipvs(
            snap.state, options, previous=state["plan"], changed_services=snap.changed
        )
        before = len(kernel.log)
        applier.apply(new)
        operations.append(len(kernel.log) - before)
        state["plan"] = new

    benchmark.pedantic(change_and_apply, rounds=40, iterations=1)
    benchmark.extra_info["kernel_operations_per_change"] = sorted(set(operations))
    assert set(operations) == {1}, operations
    # leave the shared tracker as it was
    tracker.upsert_endpoint_slice(synthetic_slice(4242, ENDPOINTS_PER_SERVICE))
    tracker.snapshot(IPV4)
