"""Fixtures for kernel tests: network-namespace topologies from minikproxy.testing.netns.

* ``topology``: a fresh :class:`Topology` per test (setup ~35 ms, teardown ~50 ms).
* ``module_topology``: one topology shared by a test module, left as the tests leave it.
* ``shared_topology``: the module's topology, reset before each test (rules of both iptables
  backends, conntrack, probe servers), for modules with many small tests.
* ``topo``: ``shared_topology`` with TCP and UDP probe servers on the backends (traffic.py).

Tests marked ``kernel`` are skipped only when not running as root (true of no machine this
project runs on: CI and developers are root). A missing tool is an error, never a skip:
``scripts/bootstrap.sh`` installs them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from minikproxy.testing.ipvsload import kernel_has_ipvs
from minikproxy.testing.netns import Topology

from .traffic import TARGET_PORT

_REQUIRED_TOOLS = ("ip", "iptables-nft-restore", "iptables-legacy-restore", "nft", "conntrack")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces)"
    missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError(
            f"kernel tests need {', '.join(missing)}: run scripts/bootstrap.sh to install them"
        )
    return None


IPVS_SKIP = (
    "needs a kernel with IPVS (ip_vs) and this one has none: tests/kernel/test_ipvs_vm.py "
    "runs these inside a VM with scripts/ipvs-vm.sh"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``kernel``-marked tests on machines that cannot run them, and ``ipvs``-marked
    tests on kernels without IPVS."""
    reason = _skip_reason()
    has_ipvs = kernel_has_ipvs()
    for item in items:
        if reason is not None and item.get_closest_marker("kernel") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif not has_ipvs and item.get_closest_marker("ipvs") is not None:
            item.add_marker(pytest.mark.skip(reason=IPVS_SKIP))


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh client/node/backend topology, deleted after the test."""
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="module")
def module_topology() -> Iterator[Topology]:
    """One topology for the whole test module (not reset between tests)."""
    with Topology() as topo:
        yield topo


@pytest.fixture
def shared_topology(module_topology: Topology) -> Topology:
    """The module's topology with no rules, no conntrack entries and no probe servers."""
    module_topology.stop_servers()
    module_topology.reset_rules()
    return module_topology


@pytest.fixture
def topo(shared_topology: Topology) -> Topology:
    """The module's topology, reset, with TCP and UDP probe servers on every backend's port
    TARGET_PORT: the real-traffic tests' topology."""
    shared_topology.serve_backends(TARGET_PORT, protos=("tcp", "udp"))
    return shared_topology
