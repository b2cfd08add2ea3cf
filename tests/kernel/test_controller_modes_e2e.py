"""Controller end-to-end scenarios that are the same in every proxy mode, run once per mode
with the shared harness (controller_harness.py) on the module's topology: what a mode does
with the kernel does not change them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from minikproxy.testing.netns import Topology

from ..helpers import wait_for
from .cluster_objects import endpoint_slice, service
from .controller_harness import BACKENDS, VIP, ControllerHarness, refused, running_harness

pytestmark = pytest.mark.kernel

MODES = pytest.mark.parametrize("mode", ["iptables", "nftables"])


MODES_AND_LAYOUTS = pytest.mark.parametrize(
    ("mode", "layout"),
    [("iptables", "flat"), ("nftables", "flat"), ("nftables", "kube-proxy")],
    ids=["iptables", "nftables-flat", "nftables-kube-proxy"],
)


@pytest.fixture
def harness(topo: Topology, tmp_path: Path) -> Iterator[ControllerHarness]:
    with running_harness(ControllerHarness, topo, tmp_path) as harness:
        yield harness


@MODES
def test_api_outage_and_410_relist(
    harness: ControllerHarness, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An API outage flushes nothing; changes missed while the watches were down (history
    compacted: 410 Gone) are reconciled by the relist."""
    api = harness.api
    caplog.set_level(logging.WARNING, logger="minikproxy.sources.kubeapi")
    harness.start(mode=mode)
    api.create(service("web", VIP))
    api.create(endpoint_slice("web", BACKENDS))
    api.create(service("gone", "10.96.0.30"))
    api.create(endpoint_slice("gone", BACKENDS))
    wait_for(lambda: harness.lands("10.96.0.30") == set(BACKENDS), what="both services up")

    with api.outage():
        # the watches are down and every reflector has had a request refused: nothing flushed
        wait_for(
            lambda: all(refused(caplog, r) for r in ("services", "endpointslices", "nodes")),
            what="every reflector to see the outage",
        )
        assert harness.lands() == set(BACKENDS)
        assert harness.lands("10.96.0.30") == set(BACKENDS)

    # A deletion the watch never sees: history is compacted and the watches dropped, so the
    # reflectors get 410 Gone, relist, and must notice "gone" disappeared.
    api.delete("services", "default", "gone")
    api.delete("endpointslices", "default", "gone-1")
    api.update(endpoint_slice("web", ["10.10.2.2"]))
    api.compact()
    api.drop_watches()
    wait_for(lambda: harness.outcome("10.96.0.30") == "unreachable", what="deletion reconciled")
    wait_for(lambda: harness.lands() == {"10.10.2.2"}, what="update reconciled")


@MODES_AND_LAYOUTS
def test_stale_udp_conntrack_entries_are_removed(
    harness: ControllerHarness, mode: str, layout: str
) -> None:
    """UDP flows to a removed endpoint are deleted."""
    api, dns = harness.api, "10.96.0.53"
    harness.start(mode=mode, layout=layout)
    api.create(service("dns", dns, proto="UDP"))
    api.create(endpoint_slice("dns", ["10.10.2.2"], proto="UDP"))
    wait_for(lambda: harness.lands(dns, proto="udp") == {"10.10.2.2"}, what="udp")

    assert harness.udp_flows("10.10.2.2", dns) > 0
    api.update(endpoint_slice("dns", ["10.10.2.3"], proto="UDP"))
    wait_for(lambda: harness.udp_flows("10.10.2.2", dns) == 0, what="flows to it deleted")
    assert harness.lands(dns, proto="udp") == {"10.10.2.3"}
