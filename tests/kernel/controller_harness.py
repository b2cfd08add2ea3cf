"""The harness of the controller end-to-end tests, in any proxy mode: the fake API server, a
test topology and the controller under test (one at a time), programming the topology's node
netns through the real ``kubernetes`` client; connections from the client netns show what
the kernel does.

The mode-specific files (test_controller_e2e.py: iptables; test_nftables_controller_e2e.py)
subclass :class:`ControllerHarness` to wrap the parts they break on purpose; scenarios that
are the same in every mode use it as it is (test_controller_modes_e2e.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from minikproxy.controller import Controller
from minikproxy.dataplane.execer import Execer, RealExecer
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import Probe, Proto, Topology

from .cluster_objects import NODE_OBJ, start_controller

BACKENDS = ["10.10.2.2", "10.10.2.3", "10.10.2.4"]
VIP = "10.96.0.10"


class ControllerHarness:
    """The fake API server, the topology and the controller under test (one at a time)."""

    def __init__(self, topo: Topology, api: FakeApiServer, kubeconfig: Path) -> None:
        self.topo, self.api, self.kubeconfig = topo, api, kubeconfig
        self.controller: Controller | None = None

    def new_execer(self) -> Execer:
        """The execer of the next controller (a stopped controller closes its own)."""
        return RealExecer(self.topo.namespaces["node"])

    def before_start(self, controller: Controller) -> None:
        """Called with each controller before it starts (to wrap its parts)."""

    def start(
        self,
        *,
        mode: str,
        layout: str = "flat",
        families: Sequence[IPFamily] = (IPV4,),
        **config: Any,
    ) -> Controller:
        """Start a controller in ``mode`` (nftables: ``layout``) programming the node netns."""
        assert self.controller is None
        self.controller = start_controller(
            self.kubeconfig,
            self.new_execer(),
            self.before_start,
            families,
            mode=mode,
            nftables_layout=layout,
            **config,
        )
        return self.controller

    def stop(self) -> None:
        """Stop the controller, if one runs (its rules stay)."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def lands(
        self, dst: str = VIP, port: int = 80, count: int = 40, proto: Proto = "tcp"
    ) -> set[str]:
        """The backends that answered ``count`` connections (40 random picks of 3 backends
        miss one with p < 1e-6); none if a first one fails (a batch of probes to a
        destination without rules costs a second: some get no ICMP error back)."""
        if not self.topo.connect(dst, port, proto, timeout=1.0).ok:
            return set()
        results = self.topo.connect_many([Probe(dst, port, proto)] * count, timeout=1.0)
        return {r.server_ip for r in results if r.ok}

    def outcome(self, dst: str = VIP, port: int = 80) -> str:
        """How one TCP connection to ``dst:port`` ends (``ok``, ``refused``, ...)."""
        return self.topo.connect(dst, port, timeout=0.5).outcome

    def udp_flows(self, answered_by: str, dst: str) -> int:
        """How many UDP flows the node's conntrack holds to ``dst`` answered by
        ``answered_by`` (the endpoint it was DNATed to)."""
        return sum(
            1
            for e in self.topo.conntrack_list()
            if e.proto == "udp" and e.orig_dst == dst and e.reply_src == answered_by
        )


H = TypeVar("H", bound=ControllerHarness)


@contextmanager
def running_harness(cls: type[H], topo: Topology, tmp_path: Path) -> Iterator[H]:
    """A ``cls`` harness over a fake API server that knows the Node (stopped at the end)."""
    with FakeApiServer() as api:
        api.create(NODE_OBJ)
        harness = cls(topo, api, api.write_kubeconfig(tmp_path / "kubeconfig"))
        try:
            yield harness
        finally:
            harness.stop()


def syncs(controller: Controller, kind: str) -> float:
    """How many ``full`` or ``partial`` syncs ``controller`` has completed."""
    name = f"kubeproxy_sync_{kind}_proxy_rules_duration_seconds_count"
    return controller.metrics.registry.get_sample_value(name) or 0.0


def refused(caplog: pytest.LogCaptureFixture, reflector: str) -> bool:
    """Whether ``reflector`` has logged a request answered 503 by the API server."""
    return any(
        r.getMessage().startswith(f"{reflector}: ") and "HTTP 503" in r.getMessage()
        for r in caplog.records
    )
