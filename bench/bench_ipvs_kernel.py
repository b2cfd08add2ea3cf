"""IPVS initial full load in an IPVS kernel: the netlink applier against ``ipvsadm -R`` +
``ipset restore`` (+ ``ip -batch`` of the addresses, ``iptables-restore``) of the same state, each
into a fresh network namespace (``minikproxy bench`` measures the same in the VM by itself).

Needs a kernel with IPVS (skipped elsewhere): run it in the VM, where emulation makes absolute
times meaningless but the ratio holds::

    scripts/ipvs-vm.sh run /var/cache/minikproxy/ipvs-vm -- \\
        .venv/bin/python -m pytest bench/bench_ipvs_kernel.py --benchmark-only -p no:cacheprovider

``MINIKPROXY_IPVS_BENCH_SERVICES`` sets the size (default 1000 Services x 10 endpoints);
``MINIKPROXY_IPVS_BULK=0`` makes the applier add everything over netlink, one operation each.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.benchmark.measure import ipvs_tool_load
from minikproxy.compile.ipvs import compile_ipvs
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.dataplane.ipvs import ExecBulkLoader, IpvsApplier, NetlinkIpvsKernel
from minikproxy.model.names import IPV4
from minikproxy.testing.ipvsload import kernel_has_ipvs, split_sections

from .bench_ipvs import bench_ipvs_options
from .conftest import tracked

pytestmark = pytest.mark.skipif(not kernel_has_ipvs(), reason="needs a kernel with IPVS")

SERVICES = int(os.environ.get("MINIKPROXY_IPVS_BENCH_SERVICES", "1000"))


@pytest.fixture(scope="module")
def sections() -> Iterator[tuple[Any, dict[str, str]]]:
    _, snapshot = tracked(SERVICES)
    plan = compile_ipvs(snapshot.state, bench_ipvs_options())
    yield plan, split_sections(plan.render())


def _fresh() -> str:
    netns = f"mkpb-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    return netns


def test_initial_load_applier(benchmark, sections) -> None:  # type: ignore[no-untyped-def]
    plan, _ = sections
    created: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        netns = _fresh()
        created.append(netns)
        kernel = NetlinkIpvsKernel(netns)
        execer = RealExecer(netns)
        bulk = (
            ExecBulkLoader(execer) if os.environ.get("MINIKPROXY_IPVS_BULK", "1") == "1" else None
        )
        applier = IpvsApplier(kernel, RealIptables(execer, IPV4, "nft"), IPV4, bulk)
        return (applier,), {}

    try:
        benchmark.pedantic(lambda a: a.apply(plan), setup=setup, rounds=3, iterations=1)
    finally:
        for netns in created:
            subprocess.run(["ip", "netns", "del", netns], check=False)
    benchmark.extra_info["virtual_servers"] = len(plan.virtual_servers)


def test_initial_load_ipvsadm_and_ipset_restore(benchmark, sections) -> None:  # type: ignore[no-untyped-def]
    plan, _ = sections
    text = plan.render()
    created: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        netns = _fresh()
        created.append(netns)
        return (netns,), {}

    def load(netns: str) -> None:
        ipvs_tool_load(netns, text)  # minikproxy bench's baseline: kube-ipvs0 included

    try:
        benchmark.pedantic(load, setup=setup, rounds=3, iterations=1)
    finally:
        for netns in created:
            subprocess.run(["ip", "netns", "del", netns], check=False)
