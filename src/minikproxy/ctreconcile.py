"""The UDP conntrack reconciler: after each successful sync, delete the UDP flows of Services
whose DNAT target is not a serving endpoint (kube-proxy's ``CleanStaleEntries``, since 1.32).

It reconciles state instead of replaying events, so a missed event, a failed cleanup or a
restart heals at the next sync. Per IP family, one kernel-filtered dump of the UDP flows, one
pass over them, and the stale ones deleted in batched netlink messages (see
:mod:`minikproxy.dataplane.ctnetlink`); no process is started.

What is wanted (:func:`wanted_flows`, pure): for each UDP service port, its *frontends* —
cluster IP, external IPs and load-balancer IPs with the service port, and each NodePort address
with the NodePort — map to the set of its *serving* endpoints (IP and target port), across all
its slices, whatever topology or traffic policy selects (kube-proxy's rule: a change of
routing must not reset live flows, and an endpoint that is terminating but still serving keeps
its flows, as TCP connections would). A flow is stale (:func:`stale_rows`, pure) when its
original destination is a frontend and its reply source is not one of that frontend's
endpoints; that covers flows DNATed to a removed endpoint, flows to a port scaled to zero
(kubernetes#139628: no endpoint at all) and flows that were never DNATed (created before the
rules existed, #48370). Frontends that went away since the last successful reconcile (a
deleted Service or port, a removed external IP, a changed NodePort: kubernetes#141371) are
kept with no endpoint until a reconcile succeeds. Flows whose original destination is no
frontend are never touched, and neither is anything that is not UDP.

NodePorts match only on the addresses they answer on (every local address, or the
``--nodeport-addresses`` ones; loopback only with localhost NodePorts), not on any destination
address as kube-proxy does: a pod's UDP flow to some remote host's port 30053 is not Service
traffic.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from minikproxy.dataplane.ctnetlink import DeleteResult, FlowRow, pack_port
from minikproxy.dataplane.netinfo import NetInfoError
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPFamily, NamespacedName, ServicePortName
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState

logger = logging.getLogger(__name__)

Frontend = tuple[bytes, bytes]
"""A packed (IP, port): what a flow was sent to, or (as a backend) what answered it."""

WantedFlows = Mapping[Frontend, frozenset[Frontend]]
"""Each Service frontend, with the serving endpoints its flows may be DNATed to."""

NO_ENDPOINTS: frozenset[Frontend] = frozenset()


def pack_ip(ip: str) -> bytes:
    """A canonical address literal packed as conntrack carries it (4 or 16 bytes)."""
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


_PORTS = [port.to_bytes(2, "big") for port in range(65536)]


def frontend(ip: str, port: int) -> Frontend:
    """The packed (``ip``, ``port``) key."""
    return pack_ip(ip), pack_port(port)


def service_frontends(port: ServicePort, nodeport_ips: Iterable[bytes]) -> list[Frontend]:
    """The frontends of a service port: cluster IP, external IPs and load-balancer IPs with its
    port, and the NodePort on each of ``nodeport_ips`` (packed)."""
    svc_port = _PORTS[port.port]
    ips = [port.cluster_ip, *port.external_ips, *port.load_balancer_vips]
    out = [(pack_ip(ip), svc_port) for ip in ips if ip]
    if port.node_port:
        node_port = _PORTS[port.node_port]
        out += [(ip, node_port) for ip in nodeport_ips]
    return out


ServingCache = dict[ServicePortName, tuple[tuple[Endpoint, ...], frozenset[Frontend]]]
"""Per service port: its endpoints tuple as last seen and the serving set built from it."""


def wanted_flows(
    state: ProxyState,
    nodeport_ips: Iterable[bytes] = (),
    gone: Iterable[Frontend] = (),
    cache: ServingCache | None = None,
    udp_ports: Iterable[tuple[ServicePortName, ServicePort]] | None = None,
) -> dict[Frontend, frozenset[Frontend]]:
    """The frontends of ``state``'s UDP service ports, each with its serving endpoints; the
    ``gone`` frontends (of Services and ports that no longer exist) with none, unless a current
    service port uses them again.

    ``cache`` (kept by the caller between calls, updated here) reuses the serving set of a
    port whose endpoints tuple is the very object seen last time: snapshots share the tuples
    of unchanged services, so a sync rebuilds only what changed. ``udp_ports`` (default:
    found among all of ``state``'s ports) are its UDP ports."""
    wanted = dict.fromkeys(gone, NO_ENDPOINTS)
    node_ips = list(nodeport_ips)
    fresh: ServingCache = {}
    endpoints_of = state.endpoints.get
    for name, port in state.services.items() if udp_ports is None else udp_ports:
        if port.protocol != "UDP":
            continue
        endpoints = endpoints_of(name, ())
        hit = cache.get(name) if cache is not None else None
        if hit is not None and hit[0] is endpoints:
            serving = hit[1]
        else:
            serving = frozenset(
                [(pack_ip(ep.ip), _PORTS[ep.port]) for ep in endpoints if ep.serving]
            )
        fresh[name] = (endpoints, serving)
        for key in service_frontends(port, node_ips):
            wanted[key] = serving
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    return wanted


_RULE_DEST = re.compile(r" -d ([0-9A-Fa-f.:]+)(?:/\d+)? ")
_RULE_DPORT = re.compile(r" --dport (\d+) ")


def udp_frontends_in_rules(saved: str) -> tuple[set[Frontend], set[int]]:
    """The UDP frontends that ``iptables-save -t nat`` output routes to Services: (IP, port)
    of each ``KUBE-SERVICES`` jump (cluster, external and load-balancer IPs), and the
    ``KUBE-NODEPORTS`` ports. Read once at start-up: the rules a previous run left say which
    Services existed, so flows to one deleted while minikproxy was down are found too."""
    frontends: set[Frontend] = set()
    node_ports: set[int] = set()
    for line in saved.splitlines():
        if " -p udp " not in line or " -j KUBE-" not in line:
            continue
        port = _RULE_DPORT.search(line)
        if port is None or not 0 < int(port[1]) < 65536:
            continue
        if line.startswith("-A KUBE-SERVICES "):
            dest = _RULE_DEST.search(line)
            if dest is not None:
                try:
                    ip = ipaddress.ip_address(dest[1])
                except ValueError:
                    continue
                frontends.add((ip.packed, _PORTS[int(port[1])]))
        elif line.startswith("-A KUBE-NODEPORTS "):
            node_ports.add(int(port[1]))
    return frontends, node_ports


def is_stale(wanted: WantedFlows, sent_to: Frontend, answered_by: Frontend) -> bool:
    """True when a UDP flow sent to ``sent_to`` (original destination) and answered by
    ``answered_by`` (reply source) is stale: sent to a Service frontend, not to one of its
    serving endpoints."""
    endpoints = wanted.get(sent_to)
    return endpoints is not None and answered_by not in endpoints


def stale_rows(rows: Iterable[FlowRow], wanted: WantedFlows) -> list[FlowRow]:
    """The rows (see :data:`~minikproxy.dataplane.ctnetlink.FlowRow`) of stale flows, in order:
    :func:`is_stale` for each, inlined (this runs over every UDP flow of the node)."""
    get = wanted.get
    return [
        row
        for row in rows
        if (endpoints := get((row[2], row[4]))) is not None and (row[5], row[6]) not in endpoints
    ]


class NodePortScope(Protocol):
    """Where NodePorts answer, as a mode's options say (iptables or nftables)."""

    @property
    def nodeport_addresses(self) -> tuple[str, ...] | None:
        """The addresses NodePorts answer on (None: every local address)."""
        ...

    @property
    def localhost_nodeports_active(self) -> bool:
        """Whether NodePorts answer on loopback addresses too."""
        ...


def nodeport_ips(
    options: NodePortScope, local_addresses: Callable[[], Iterable[bytes]]
) -> list[bytes]:
    """The packed addresses NodePorts answer on, as the compiled rules say: the
    ``--nodeport-addresses`` ones, or every local address (``local_addresses()``); loopback
    only where localhost NodePorts are on (IPv4)."""
    if options.nodeport_addresses is not None:
        addresses = [pack_ip(ip) for ip in options.nodeport_addresses]
    else:
        addresses = sorted(local_addresses())
    keep_loopback = options.localhost_nodeports_active
    return [a for a in addresses if keep_loopback or not ipaddress.ip_address(a).is_loopback]


class FlowDump(Protocol):
    """One dump of a family's UDP flows."""

    rows: list[FlowRow]


class UdpFlowTable(Protocol):
    """The conntrack table as the reconciler uses it (ctnetlink for real, a fake in tests)."""

    def dump_udp(self, family: IPFamily) -> FlowDump:
        """Every UDP flow of ``family``."""
        ...

    def delete_rows(self, dump: Any, rows: Sequence[FlowRow]) -> DeleteResult:
        """Delete the flows of ``rows`` (rows of ``dump``, a dump this table returned, in
        order)."""
        ...

    def local_addresses(self, family: IPFamily) -> set[bytes]:
        """The packed addresses of ``family`` on the node's interfaces."""
        ...

    def close(self) -> None:
        """Release what the table holds open (it may be used again after)."""
        ...


class ReconcileResult(NamedTuple):
    """One family's reconcile: UDP flows listed, found stale, deleted, already gone; seconds."""

    listed: int
    stale: int
    deleted: int
    missing: int
    seconds: float


class ReconcileError(RuntimeError):
    """A reconcile failed (listing or deleting); nothing is lost: the next one retries."""


@dataclass
class _FamilyMemory:
    frontends: frozenset[Frontend] = frozenset()
    gone: frozenset[Frontend] = frozenset()
    serving: ServingCache = field(default_factory=dict)
    gone_node_ports: frozenset[int] = frozenset()
    # The UDP ports of each Service of the last state reconciled (None: not known yet).
    udp_ports: dict[NamespacedName, tuple[tuple[ServicePortName, ServicePort], ...]] | None = None

    def update_udp_ports(
        self, state: ProxyState, changed: Collection[NamespacedName] | None
    ) -> list[tuple[ServicePortName, ServicePort]]:
        """The UDP ports of ``state``: the remembered ones with ``changed``'s re-read (all
        re-read when ``changed`` is None or nothing is remembered)."""
        if self.udp_ports is None or changed is None:
            self.udp_ports = {}
            changed = state.ports_by_service.keys()
        for key in changed:
            ports = tuple(
                (name, state.services[name])
                for name in state.ports_by_service.get(key, ())
                if state.services[name].protocol == "UDP"
            )
            if ports:
                self.udp_ports[key] = ports
            else:
                self.udp_ports.pop(key, None)
        return [item for ports in self.udp_ports.values() for item in ports]


class ConntrackReconciler:
    """Reconciles one node's UDP conntrack flows with the applied state, family by family."""

    def __init__(self, table: UdpFlowTable, clock: Callable[[], float] = time.perf_counter) -> None:
        self.table = table
        self.clock = clock
        self._memory: dict[IPFamily, _FamilyMemory] = {}

    def close(self) -> None:
        """Close the table's sockets (the stopping controller calls this)."""
        self.table.close()

    def remember_rules(self, family: IPFamily, saved_nat: str) -> None:
        """Take the UDP frontends of the rules found in the kernel at start-up (``iptables-save
        -t nat`` output) as the last ones reconciled: those no Service has any more (deleted
        while minikproxy was down) lose their flows at the first reconcile."""
        frontends, node_ports = udp_frontends_in_rules(saved_nat)
        self.remember_frontends(family, frontends, node_ports)

    def remember_frontends(
        self, family: IPFamily, frontends: Iterable[Frontend], node_ports: Iterable[int] = ()
    ) -> None:
        """:meth:`remember_rules` for a mode that read its old rules itself: the UDP
        ``frontends`` and NodePorts (on any NodePort address) they routed to Services."""
        memory = self._memory.setdefault(family, _FamilyMemory())
        memory.gone |= frozenset(frontends)
        memory.gone_node_ports |= frozenset(node_ports)

    def reconcile(
        self,
        state: ProxyState,
        options: NodePortScope,
        changed: Collection[NamespacedName] | None = None,
    ) -> ReconcileResult:
        """Delete ``state.family``'s stale UDP flows; raises :class:`ReconcileError` (the
        frontends that went away are then remembered for the next attempt). ``changed`` are
        the Services that changed since the previous reconcile of this family (None: unknown,
        every port is looked at)."""
        start = self.clock()
        family = state.family
        memory = self._memory.setdefault(family, _FamilyMemory())
        udp_ports = memory.update_udp_ports(state, changed)
        needs_node_ips = memory.gone_node_ports or any(p.node_port for _, p in udp_ports)
        try:
            node_ips = (
                nodeport_ips(options, lambda: self.table.local_addresses(family))
                if needs_node_ips
                else []
            )
        except (OSError, NetInfoError) as err:
            raise ReconcileError(f"cannot list the node's {family} addresses: {err}") from err
        current = wanted_flows(state, node_ips, cache=memory.serving, udp_ports=udp_ports)
        now_frontends = frozenset(current)
        old_node_ports = frozenset(
            (ip, _PORTS[port]) for port in memory.gone_node_ports for ip in node_ips
        )
        memory.gone_node_ports = frozenset()
        gone = (memory.gone | old_node_ports | memory.frontends) - now_frontends
        wanted = dict.fromkeys(gone, NO_ENDPOINTS)
        wanted.update(current)
        memory.frontends, memory.gone = now_frontends, gone
        if not wanted:  # no UDP Service: nothing to list
            return ReconcileResult(0, 0, 0, 0, self.clock() - start)
        try:
            dump = self.table.dump_udp(family)
            stale = stale_rows(dump.rows, wanted)
            result = self.table.delete_rows(dump, stale) if stale else DeleteResult(0, 0, ())
        except (OSError, ValueError) as err:
            raise ReconcileError(f"{family} conntrack reconcile failed: {err}") from err
        if result.errors:
            failed = len(stale) - result.deleted - result.missing
            raise ReconcileError(
                f"{family} conntrack reconcile: {failed} of {len(stale)} deletions failed: "
                + ", ".join(sorted(set(result.errors)))
            )
        memory.gone = frozenset()
        return ReconcileResult(
            len(dump.rows), len(stale), result.deleted, result.missing, self.clock() - start
        )


if TYPE_CHECKING:
    from minikproxy.dataplane.ctnetlink import NetlinkConntrack

    _: UdpFlowTable = NetlinkConntrack()

__all__ = [
    "NO_ENDPOINTS",
    "ConntrackReconciler",
    "FlowDump",
    "Frontend",
    "NodePortScope",
    "ReconcileError",
    "ReconcileResult",
    "UdpFlowTable",
    "WantedFlows",
    "frontend",
    "is_stale",
    "nodeport_ips",
    "pack_ip",
    "service_frontends",
    "stale_rows",
    "udp_frontends_in_rules",
    "wanted_flows",
]
