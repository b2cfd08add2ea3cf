"""IpvsMode over fakes: options exclude kube-ipvs0's addresses, apply/intact/cleanup."""

from __future__ import annotations

from minikproxy.config import ProxyConfig
from minikproxy.model.endpoint import make_endpoint
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.modes.ipvs import IpvsMode
from minikproxy.testing.fake_iptables import FakeIptables
from minikproxy.testing.fake_ipvs import FakeIpvsKernel

NODE = NodeInfo("node-1", addresses=("10.0.0.1",))
CONFIG = ProxyConfig(mode="ipvs", hostname_override="node-1")


def state() -> ProxyState:
    port = ServicePort(
        ServicePortName("ns", "web", "p", "TCP"), IPV4, "10.96.0.1", 80, node_port=30001
    )
    return ProxyState(
        family=IPV4,
        node=NODE,
        services={port.name: port},
        endpoints={port.name: (make_endpoint("10.244.0.1", 8080),)},
    )


def test_apply_intact_and_cleanup() -> None:
    kernel = FakeIpvsKernel()
    local = ["10.0.0.1", "127.0.0.1", "10.96.0.1"]
    mode = IpvsMode(kernel, {IPV4: FakeIptables()}, local_addresses=lambda family: local)
    options = mode.options(CONFIG, NODE, IPV4, (), ())
    plan = mode.compile(state(), options, None, None)
    mode.apply(plan, None, True)
    # 10.96.0.1 is on kube-ipvs0 now: never a NodePort address
    options = mode.options(CONFIG, NODE, IPV4, (), ())
    assert options.nodeport_ips == ("10.0.0.1",)
    assert mode.intact({IPV4: plan}) is None
    kernel.delete_service(("TCP", "10.0.0.1", 30001))
    assert "30001" in (mode.intact({IPV4: plan}) or "")
    mode.apply(plan, plan, True)
    kernel.bound.discard("10.96.0.1")
    assert "kube-ipvs0" in (mode.intact({IPV4: plan}) or "")
    removed = mode.cleanup()
    assert "link kube-ipvs0" in removed and kernel.services_ == {} and kernel.sets == {}
    assert mode.cleanup() == []


def test_dry_run_mode_describes() -> None:
    mode = IpvsMode()
    assert mode.dry_run
    options = mode.options(CONFIG, NODE, IPV4, (), ())
    plan = mode.compile(state(), options, None, None)
    lines = list(mode.describe(None, plan))
    assert lines[0].startswith("# IPv4: initial sync: 1 service ports, 2 virtual servers")
