"""The netlink IPVS applier in an IPVS kernel (``ipvs``-marked: run in the VM by
test_ipvs_vm.py): it programs what ``render`` prints, changes only the difference, terminates
real servers gracefully, repairs tampering, and cleans up (twice)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from minikproxy.compile.ipvs import IpvsPlan, compile_ipvs
from minikproxy.config import ProxyConfig
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.dataplane.ipvs import (
    ExecBulkLoader,
    IpvsApplier,
    NetlinkIpvsKernel,
    delete_dummy,
)
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.names import IPV4, NamespacedName
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.ipvsload import ipvsadm_save, reset_ipvs, split_sections
from minikproxy.testing.netns import Topology

from .traffic import BACKENDS, NODE, NODE_OBJ, landings, service, slice_

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]

CONFIG = ProxyConfig(hostname_override=NODE, mode="ipvs", cluster_cidr="10.10.2.0/24")


def plan_for(objs: list[Any], previous: IpvsPlan | None = None, changed: Any = None) -> IpvsPlan:
    sourced = [SourcedObject(o, "test") for o in [NODE_OBJ, *objs]]
    result = render_objects(sourced, CONFIG, families=[IPV4])
    plan: IpvsPlan = result.rulesets[IPV4]
    if previous is None:
        return plan
    # the same state, compiled incrementally from the previous plan
    from minikproxy.changes import ClusterTracker

    tracker = ClusterTracker(NODE)
    tracker.add_objects(o.obj for o in sourced)
    state = tracker.snapshot(IPV4).state
    return compile_ipvs(state, previous.options, previous=previous, changed_services=changed)


@pytest.fixture
def node(topo: Topology) -> Iterator[tuple[Topology, IpvsApplier, NetlinkIpvsKernel]]:
    netns = topo.namespaces["node"]
    reset_ipvs(netns)
    topo.node_exec(["sysctl", "-qw", "net.ipv4.vs.conntrack=1"])
    kernel = NetlinkIpvsKernel(netns)
    iptables = RealIptables(RealExecer(netns=netns), IPV4, "nft")
    try:
        yield topo, IpvsApplier(kernel, iptables, IPV4), kernel
    finally:
        kernel.close()


def test_apply_programs_what_render_prints(node: Any) -> None:
    topo, applier, kernel = node
    svc = service(
        "shop",
        "10.96.0.20",
        type="LoadBalancer",
        sessionAffinity="ClientIP",
        externalIPs=["203.0.113.10"],
        port_extra={"nodePort": 30080},
        status={"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}},
    )
    dns = service("dns", "10.96.0.53", port=53, proto="UDP")
    objs = [svc, slice_("shop", BACKENDS), dns, slice_("dns", BACKENDS, proto="UDP")]
    plan = plan_for(objs)
    applier.apply(plan)
    sections = split_sections(plan.render())
    netns = topo.namespaces["node"]
    assert sorted(ipvsadm_save(netns).splitlines()) == sorted(sections["ipvs"].splitlines())
    saved = topo.node_exec(["ipset", "save"]).stdout
    assert all(line in saved for line in sections["ipset"].splitlines() if line.startswith("add"))
    addrs = topo.node_exec(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout
    for line in sections["addresses"].splitlines():
        assert f" {line.split()[0]} " in addrs
    for dst, port in (("10.96.0.20", 80), ("203.0.113.10", 80), ("203.0.113.20", 80)):
        assert topo.connect(dst, port).ok, dst
    assert set(landings(topo, "10.96.0.53", 53, 10, "udp")) <= set(BACKENDS)
    # nothing to do the second time, even for a full apply
    kernel.writes = 0
    applier.apply(plan, full=True)
    assert kernel.writes == 0


def test_initial_load_in_bulk_gives_the_same_state(node: Any) -> None:
    topo, _, kernel = node
    netns = topo.namespaces["node"]
    bulk = ExecBulkLoader(RealExecer(netns))
    ipt = RealIptables(RealExecer(netns), IPV4, "nft")
    applier = IpvsApplier(kernel, ipt, IPV4, bulk, bulk_threshold=20)
    objs: list[Any] = []
    for k in range(1, 13):  # past the bulk threshold (20 additions)
        objs.append(
            service(f"s{k}", f"10.96.1.{k}", type="NodePort", port_extra={"nodePort": 30000 + k})
        )
        objs.append(slice_(f"s{k}", BACKENDS))
    plan = plan_for(objs)
    kernel.writes = 0
    applier.apply(plan)
    assert kernel.writes < 20  # the sets; everything else in bulk
    sections = split_sections(plan.render())
    assert sorted(ipvsadm_save(netns).splitlines()) == sorted(sections["ipvs"].splitlines())
    saved = topo.node_exec(["ipset", "save"]).stdout
    assert all(line in saved for line in sections["ipset"].splitlines() if line.startswith("add"))
    assert topo.connect("10.96.1.7", 80).ok
    kernel.writes = 0
    applier.apply(plan, full=True)
    assert kernel.writes == 0


def test_one_endpoint_change_is_one_netlink_operation_and_graceful(node: Any) -> None:
    topo, applier, kernel = node
    objs = [service("web", "10.96.0.10"), slice_("web", BACKENDS)]
    plan = plan_for(objs)
    applier.apply(plan)
    changed = {NamespacedName("t", "web")}
    # a held-open connection to the endpoint that goes away
    netns = topo.namespaces["client"]
    held: list[socket.socket] = []

    def hold() -> None:
        for _ in range(6):
            s = socket.create_connection(("10.96.0.10", 80), timeout=3)
            held.append(s)

    run_in_netns(netns, hold)
    try:
        busy = [ip for ip in BACKENDS if f"{ip}:8080" in ipvsadm_conns(topo)]
        assert busy, "no connection reached a backend"
        gone = busy[0]
        kernel.writes = 0
        plan = plan_for([objs[0], slice_("web", [b for b in BACKENDS if b != gone])], plan, changed)
        applier.apply(plan)
        assert kernel.writes == 1  # weight 0, not deleted: it still has a connection
        assert f"-a -t 10.96.0.10:80 -r {gone}:8080 -m -w 0" in ipvsadm_save(
            topo.namespaces["node"]
        )
        # back again: its weight returns, one operation
        kernel.writes = 0
        plan = plan_for(objs, plan, changed)
        applier.apply(plan)
        assert kernel.writes == 1
        assert f"-a -t 10.96.0.10:80 -r {gone}:8080 -m -w 1" in ipvsadm_save(
            topo.namespaces["node"]
        )
    finally:
        for s in held:
            s.close()


def ipvsadm_conns(topo: Topology) -> str:
    return topo.node_exec(["ipvsadm", "-L", "-n", "-c"]).stdout


def test_tampering_repaired_and_cleanup_twice(node: Any) -> None:
    topo, applier, kernel = node
    objs = [service("web", "10.96.0.10", type="NodePort", port_extra={"nodePort": 30010})]
    objs.append(slice_("web", BACKENDS))
    plan = plan_for(objs)
    applier.apply(plan)
    topo.node_exec(["ipvsadm", "-D", "-t", "10.96.0.10:80"])
    topo.node_exec(["ipset", "flush", "KUBE-CLUSTER-IP"])
    topo.node_exec(["ip", "addr", "del", "10.96.0.10/32", "dev", "kube-ipvs0"])
    applier.apply(plan, full=True)
    assert topo.connect("10.96.0.10", 80).ok
    removed = applier.cleanup() + delete_dummy(kernel)
    assert "link kube-ipvs0" in removed
    netns = topo.namespaces["node"]
    assert ipvsadm_save(netns) == ""
    assert "KUBE-" not in topo.node_exec(["ipset", "list", "-n"]).stdout
    assert "KUBE-" not in topo.node_exec(["iptables-save"]).stdout
    assert applier.cleanup() + delete_dummy(kernel) == []
