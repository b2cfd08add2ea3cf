"""The netlink IPVS applier in an IPVS kernel (``ipvs``-marked: run in the VM by
test_ipvs_vm.py): it programs what ``render`` prints, changes only the difference, terminates
real servers gracefully, repairs tampering, and cleans up (twice)."""

from __future__ import annotations

import os
import socket
import struct
import threading
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

from ..helpers import wait_for
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
    kernel.add_address("10.96.0.20")  # bound already: no error (kube-proxy's EnsureAddressBind)


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


SCALE = float(os.environ.get("MINIKPROXY_TIME_SCALE", "1"))
ECHO_PORT = 9090


class EchoBackends:
    """A TCP server on ``ECHO_PORT`` of every backend address that keeps each connection open
    and answers every line with the backend address that took the connection."""

    def __init__(self, netns: str) -> None:
        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", ECHO_PORT))
            sock.listen(16)
            return sock

        self.listener = run_in_netns(netns, listen)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn: socket.socket) -> None:
        with conn:
            me = conn.getsockname()[0].encode()
            try:
                while conn.recv(64):
                    conn.sendall(me + b"\n")
            except OSError:
                return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.listener.close()


def ask(sock: socket.socket) -> str:
    """The backend at the other end of ``sock`` (one round trip through IPVS)."""
    sock.sendall(b"?\n")
    return sock.recv(64).decode().strip()


def echo_slice(ips: list[str]) -> Any:
    obj = slice_("gt", ips)
    obj["ports"][0]["port"] = ECHO_PORT
    return obj


def test_graceful_termination_of_a_tcp_real_server(node: Any) -> None:
    """An endpoint removed under an open connection: weight 0, the connection keeps working,
    new ones go elsewhere; back in the meantime: weight 1 again; removed again and the
    connection reset: the graceful-termination check deletes it once IPVS drops the
    connection (CLOSE state, 10 s)."""
    topo, applier, kernel = node
    echo = EchoBackends(topo.namespaces["backend"])
    client = topo.namespaces["client"]

    def connect() -> socket.socket:
        return run_in_netns(
            client, lambda: socket.create_connection(("10.96.0.30", 80), timeout=5 * SCALE)
        )

    svc = service("gt", "10.96.0.30")
    changed = {NamespacedName("t", "gt")}
    plan = plan_for([svc, echo_slice(BACKENDS)])
    applier.apply(plan)
    key = ("TCP", "10.96.0.30", 80)
    held = connect()
    try:
        gone = ask(held)
        dest = (gone, ECHO_PORT)
        assert kernel.dests(key)[dest].active == 1
        others = [b for b in BACKENDS if b != gone]
        kernel.writes = 0
        plan = plan_for([svc, echo_slice(others)], plan, changed)
        applier.apply(plan)
        assert kernel.writes == 1  # weight 0, not deleted: it still has a connection
        assert kernel.dests(key)[dest].weight == 0
        assert ask(held) == gone  # the open connection still works ...
        for _ in range(4):  # ... and new ones go to the others
            with connect() as sock:
                assert ask(sock) in others
        assert applier.process_terminating() == []  # kept while the connection lives

        # back while terminating: its weight returns, and the check leaves it
        kernel.writes = 0
        plan = plan_for([svc, echo_slice(BACKENDS)], plan, changed)
        applier.apply(plan)
        assert kernel.writes == 1
        assert kernel.dests(key)[dest].weight == 1
        assert len(applier.terminating) == 0

        plan = plan_for([svc, echo_slice(others)], plan, changed)
        applier.apply(plan)
        assert kernel.dests(key)[dest].weight == 0
        assert ask(held) == gone
    finally:
        # RST (SO_LINGER 0): IPVS moves the connection to CLOSE, then drops it after 10 s
        held.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        held.close()
        echo.close()
    deleted: list[Any] = []

    def checked() -> bool:
        deleted.extend(applier.process_terminating())
        return bool(deleted)

    wait_for(checked, timeout=30 * SCALE, interval=0.5, what="the real server deleted")
    assert deleted == [(key, dest)]
    assert set(kernel.dests(key)) == {(b, ECHO_PORT) for b in others}
    assert len(applier.terminating) == 0


def test_udp_real_server_deleted_at_once(node: Any) -> None:
    """UDP real servers are not terminated gracefully, even with a flow in IPVS."""
    topo, applier, kernel = node
    svc = service("dns", "10.96.0.53", port=53, proto="UDP")
    plan = plan_for([svc, slice_("dns", BACKENDS, proto="UDP")])
    applier.apply(plan)
    result = topo.connect("10.96.0.53", 53, "udp")
    assert result.ok, result.outcome
    key = ("UDP", "10.96.0.53", 53)
    dest = (result.server_ip, 8080)
    state = kernel.dests(key)[dest]
    assert state.active + state.inactive > 0  # IPVS holds the flow
    kernel.writes = 0
    others = [b for b in BACKENDS if b != result.server_ip]
    changed = {NamespacedName("t", "dns")}
    applier.apply(plan_for([svc, slice_("dns", others, proto="UDP")], plan, changed))
    assert kernel.writes == 1
    assert set(kernel.dests(key)) == {(b, 8080) for b in others}
    assert len(applier.terminating) == 0


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
