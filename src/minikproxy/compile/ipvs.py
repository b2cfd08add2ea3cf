"""The IPVS compiler: ``ProxyState`` -> what kube-proxy's IPVS proxier programs.

Pure: no I/O. One :class:`IpvsPlan` holds, for one IP family, the ipsets with their entries,
the IPVS virtual servers with their real servers, the addresses bound to ``kube-ipvs0`` and the
small iptables ruleset that goes with them, all as kube-proxy's ``pkg/proxy/ipvs`` writes them
(set names, types and entry syntax, chain names, rule order). Every service port compiles to
one :class:`ServiceIpvs` fragment; a compile given the previous plan and the changed Services
recompiles only those, and the result knows which service ports changed.
"""

from __future__ import annotations

import bisect
import ipaddress
import operator
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from minikproxy.compile.cidr import cidr_contains
from minikproxy.compile.localdetect import NO_LOCAL_DETECTOR, LocalTrafficDetector
from minikproxy.model.endpoint import Endpoint, join_host_port
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")
"""The IPVS schedulers kube-proxy accepts (``""`` means ``rr``)."""

FLAG_PERSISTENT = 0x1
"""IP_VS_SVC_F_PERSISTENT: ClientIP session affinity."""
FLAG_SOURCE_HASH = 0x10
"""IP_VS_SVC_F_SCHED2 (``mh-port``): kube-proxy sets it with the ``mh`` scheduler."""

# --- chains ------------------------------------------------------------------------------
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"

NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
)


class IpvsJump(NamedTuple):
    """A rule in a built-in chain jumping to one of ours (kube-proxy's ``iptablesJumpChain``)."""

    table: str
    source: str
    target: str
    comment: str

    def args(self) -> list[str]:
        """The rule's arguments (argv form) after ``-A CHAIN``."""
        return ["-m", "comment", "--comment", self.comment, "-j", self.target]

    def line(self) -> str:
        """The rule as an ``iptables-restore`` line."""
        return f'-A {self.source} -m comment --comment "{self.comment}" -j {self.target}\n'


JUMPS: tuple[IpvsJump, ...] = (
    IpvsJump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    IpvsJump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    IpvsJump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    IpvsJump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    IpvsJump("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    IpvsJump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    IpvsJump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    IpvsJump("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    IpvsJump("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)
"""Each is prepended to its built-in chain, in this order, as kube-proxy does."""

# --- ipsets ------------------------------------------------------------------------------
LOOP_BACK = "KUBE-LOOP-BACK"
CLUSTER_IP = "KUBE-CLUSTER-IP"
EXTERNAL_IP = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS = "KUBE-IPVS-IPS"

HASH_IP = "hash:ip"
HASH_IP_PORT = "hash:ip,port"
HASH_IP_PORT_IP = "hash:ip,port,ip"
HASH_IP_PORT_NET = "hash:ip,port,net"
BITMAP_PORT = "bitmap:port"


class IpsetInfo(NamedTuple):
    """One of kube-proxy's ipsets: its (IPv4) name, type and comment."""

    name: str
    type: str
    comment: str


IPSETS: tuple[IpsetInfo, ...] = (
    IpsetInfo(
        LOOP_BACK,
        HASH_IP_PORT_IP,
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    IpsetInfo(
        CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"
    ),
    IpsetInfo(
        EXTERNAL_IP,
        HASH_IP_PORT,
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    IpsetInfo(
        EXTERNAL_IP_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    IpsetInfo(LOAD_BALANCER, HASH_IP_PORT, "Kubernetes service lb portal"),
    IpsetInfo(
        LOAD_BALANCER_FW,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    IpsetInfo(
        LOAD_BALANCER_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    IpsetInfo(
        LOAD_BALANCER_SOURCE_IP,
        HASH_IP_PORT_IP,
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    IpsetInfo(
        LOAD_BALANCER_SOURCE_CIDR,
        HASH_IP_PORT_NET,
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    IpsetInfo(NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    IpsetInfo(
        NODE_PORT_LOCAL_TCP,
        BITMAP_PORT,
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    IpsetInfo(NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    IpsetInfo(
        NODE_PORT_LOCAL_UDP,
        BITMAP_PORT,
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    IpsetInfo(
        NODE_PORT_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    IpsetInfo(
        NODE_PORT_LOCAL_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    IpsetInfo(HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    IpsetInfo(IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
"""Every ipset kube-proxy's IPVS proxier creates, in its order (``ipsetInfo``)."""

_IPSET_BY_NAME = {info.name: info for info in IPSETS}

HASH_SIZE = 1024
MAX_ELEM = 65536
PORT_RANGE = "0-65535"


def ipset_name(name: str, family: IPFamily) -> str:
    """The kernel name of set ``name``: IPv6 sets swap ``KUBE-`` for ``KUBE-6-`` (31 chars max)."""
    if family == IPV6 and name.startswith("KUBE-"):
        return ("KUBE-6-" + name[5:])[:31]
    return name


def ipset_create_args(info: IpsetInfo, family: IPFamily) -> list[str]:
    """The ``ipset create`` arguments after the set's name, as kube-proxy passes them."""
    if info.type == BITMAP_PORT:
        return [info.type, "range", PORT_RANGE]
    hash_family = "inet6" if family == IPV6 else "inet"
    return [info.type, "family", hash_family, "hashsize", str(HASH_SIZE), "maxelem", str(MAX_ELEM)]


# --- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IpvsOptions:
    """Node options that shape an IPVS plan (all resolved before compiling).

    ``nodeport_addresses`` None means NodePorts answer on every node address: the
    ``node_addresses`` (this family's addresses on the node's interfaces other than
    ``kube-ipvs0``, loopback and IPv6 link-local left out, as kube-proxy's
    ``GetAllLocalAddressesExcept``); otherwise on the listed IPs (loopback left out). External
    and load-balancer IPs that are node addresses are not bound to ``kube-ipvs0``.
    ``node_ip`` is the node's primary IP: a load balancer whose source ranges include it
    stays reachable from the node. The timeouts (seconds, 0 = leave the kernel's),
    ``strict_arp`` and ``exclude_cidrs`` are for the applier.
    """

    family: IPFamily = IPV4
    scheduler: str = DEFAULT_SCHEDULER
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: LocalTrafficDetector = NO_LOCAL_DETECTOR
    node_ip: str = ""
    nodeport_addresses: tuple[str, ...] | None = None
    node_addresses: tuple[str, ...] = ()
    random_fully: bool = True
    exclude_cidrs: tuple[str, ...] = ()
    strict_arp: bool = False
    tcp_timeout: float = 0.0
    tcp_fin_timeout: float = 0.0
    udp_timeout: float = 0.0

    @property
    def masquerade_mark(self) -> str:
        """The mark bit as ``iptables-save`` shows it, e.g. ``0x4000`` for bit 14."""
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def localhost_nodeports_active(self) -> bool:
        """Always False: IPVS mode has no localhost NodePorts."""
        return False

    @property
    def loopback_cidr(self) -> str:
        """The loopback range of this family."""
        return "::1/128" if self.family == IPV6 else "127.0.0.0/8"

    @cached_property
    def nodeport_ips(self) -> tuple[str, ...]:
        """The node IPs that get a virtual server per NodePort (sorted)."""
        source = self.node_addresses if self.nodeport_addresses is None else self.nodeport_addresses
        out = {ip for ip in source if _usable_node_ip(ip, self.family)}
        return tuple(sorted(out, key=_ip_key))

    @cached_property
    def node_address_set(self) -> frozenset[str]:
        """``node_addresses`` as a set (addresses never bound to the dummy device)."""
        return frozenset(self.node_addresses)

    @property
    def service_flags(self) -> int:
        """Flags every virtual server gets (``mh`` needs source hashing)."""
        return FLAG_SOURCE_HASH if self.scheduler == "mh" else 0


def _usable_node_ip(ip: str, family: IPFamily) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if (addr.version == 6) != (family == IPV6) or addr.is_loopback:
        return False
    return not (addr.version == 6 and addr.is_link_local)


def _ip_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


# --- plan --------------------------------------------------------------------------------


class RealServer(NamedTuple):
    """An IPVS destination with its weight (masquerading forward, as kube-proxy uses)."""

    address: str
    port: int
    weight: int = 1

    @property
    def hostport(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6)."""
        return join_host_port(self.address, self.port)


WEIGHT = 1
"""Every real server's weight, as kube-proxy sets it."""

_ip_port = operator.attrgetter("ip", "port")


class VirtualServer(NamedTuple):
    """An IPVS virtual service with its destinations: (IP, port) pairs, each of weight
    :data:`WEIGHT`, forwarded by masquerading."""

    protocol: str  # TCP, UDP, SCTP
    address: str
    port: int
    scheduler: str
    flags: int
    timeout: int
    real_servers: tuple[tuple[str, int], ...]

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies the service in the kernel: protocol, address, port."""
        return self.protocol, self.address, self.port

    @property
    def hostport(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6)."""
        return join_host_port(self.address, self.port)

    def settings(self) -> tuple[str, int, int]:
        """What an update may change: scheduler, flags and persistence timeout."""
        return self.scheduler, self.flags, self.timeout


class ServiceIpvs(NamedTuple):
    """Everything one service port contributes to the plan.

    ``entries`` are (set, entry) pairs with kube-proxy's IPv4 set names and its entry syntax
    (``10.0.0.1,tcp:80``); ``out_filter`` are (IP, protocol, port) of load balancers the node
    may not reach (their source ranges exclude it).
    """

    name: ServicePortName
    virtual_servers: tuple[VirtualServer, ...]
    entries: tuple[tuple[str, str], ...]
    bind_addresses: tuple[str, ...]
    out_filter: tuple[tuple[str, str, int], ...]
    categorized: CategorizedEndpoints
    no_local_internal: bool
    no_local_external: bool


def _real_servers(endpoints: Iterable[Endpoint]) -> tuple[tuple[str, int], ...]:
    return tuple(map(_ip_port, endpoints))


def compile_service_port(
    port: ServicePort,
    categorized: CategorizedEndpoints,
    endpoints: Sequence[Endpoint],
    options: IpvsOptions,
) -> ServiceIpvs:
    """One service port, as the body of kube-proxy's IPVS ``syncProxyRules`` loop."""
    proto = port.protocol.lower()
    protocol = port.protocol
    entries: list[tuple[str, str]] = []
    vss: list[VirtualServer] = []
    bind: list[str] = []
    out_filter: list[tuple[str, str, int]] = []
    flags = options.service_flags
    timeout = 0
    if port.session_affinity_client_ip:
        flags |= FLAG_PERSISTENT
        timeout = port.sticky_max_age_seconds
    scheduler = options.scheduler

    for ep in endpoints:  # hairpin: a local endpoint reaching its own service
        if ep.is_local:
            entries.append((LOOP_BACK, f"{ep.ip},{proto}:{ep.port},{ep.ip}"))

    # kube-proxy's syncEndpoint: Local policy uses the local endpoints, else (#97081) the
    # cluster-wide ones, so pods can still reach the service.
    cluster = _real_servers(categorized.cluster)
    local = _real_servers(categorized.local) if categorized.local else cluster
    internal_rs = local if port.internal_policy_local else cluster
    external_rs = local if port.external_policy_local else cluster
    node_local_calls = port.internal_policy_local

    svc_port = port.port
    entries.append((CLUSTER_IP, f"{port.cluster_ip},{proto}:{svc_port}"))
    vss.append(
        VirtualServer(protocol, port.cluster_ip, svc_port, scheduler, flags, timeout, internal_rs)
    )
    bind.append(port.cluster_ip)

    node_addresses = options.node_address_set
    for ip in port.external_ips:
        entries.append(
            (
                EXTERNAL_IP_LOCAL if port.external_policy_local else EXTERNAL_IP,
                f"{ip},{proto}:{svc_port}",
            )
        )
        vss.append(VirtualServer(protocol, ip, svc_port, scheduler, flags, timeout, external_rs))
        if ip not in node_addresses:
            bind.append(ip)
        node_local_calls = node_local_calls or port.external_policy_local

    node_ip = options.node_ip
    for ip in port.load_balancer_vips:
        entry = f"{ip},{proto}:{svc_port}"
        entries.append((LOAD_BALANCER, entry))
        if port.external_policy_local:
            entries.append((LOAD_BALANCER_LOCAL, entry))
        if port.load_balancer_source_ranges:
            entries.append((LOAD_BALANCER_FW, entry))
            allow_from_node = False
            for cidr in port.load_balancer_source_ranges:
                entries.append((LOAD_BALANCER_SOURCE_CIDR, f"{entry},{cidr}"))
                if node_ip and cidr_contains(cidr, node_ip):
                    allow_from_node = True
            if allow_from_node:
                entries.append((LOAD_BALANCER_SOURCE_IP, f"{entry},{ip}"))
            else:
                out_filter.append((ip, proto, svc_port))
        vss.append(VirtualServer(protocol, ip, svc_port, scheduler, flags, timeout, external_rs))
        if ip not in node_addresses:
            bind.append(ip)
        node_local_calls = node_local_calls or port.external_policy_local

    nodeport_ips = options.nodeport_ips
    skip_health = False
    if port.node_port:
        if not nodeport_ips:
            skip_health = True  # kube-proxy's `continue`: no NodePort, no health-check port
        else:
            np = port.node_port
            if protocol == "SCTP":
                np_entries = [f"{ip},{proto}:{np}" for ip in nodeport_ips]
                sets = (NODE_PORT_SCTP, NODE_PORT_LOCAL_SCTP)
            else:
                np_entries = [str(np)]
                sets = (
                    (NODE_PORT_TCP, NODE_PORT_LOCAL_TCP)
                    if protocol == "TCP"
                    else (NODE_PORT_UDP, NODE_PORT_LOCAL_UDP)
                )
            entries.extend((sets[0], e) for e in np_entries)
            if port.external_policy_local:
                entries.extend((sets[1], e) for e in np_entries)
            for ip in nodeport_ips:
                vss.append(VirtualServer(protocol, ip, np, scheduler, flags, timeout, external_rs))
            node_local_calls = node_local_calls or port.external_policy_local

    if port.health_check_node_port and not skip_health:
        entries.append((HEALTH_CHECK_NODE_PORT, str(port.health_check_node_port)))

    no_local = node_local_calls and categorized.has_any and not categorized.local
    return ServiceIpvs(
        name=port.name,
        virtual_servers=tuple(vss),
        entries=tuple(entries),
        bind_addresses=tuple(bind),
        out_filter=tuple(out_filter),
        categorized=categorized,
        no_local_internal=no_local and port.internal_policy_local,
        no_local_external=no_local and port.external_policy_local,
    )


@dataclass(frozen=True)
class IpvsPlan:
    """One family's IPVS state: per-service fragments plus the derived kernel objects.

    ``changed`` is None after a full compile, else the service ports whose fragment changed
    since ``previous`` (added, removed or different).
    """

    options: IpvsOptions
    services: Mapping[ServicePortName, ServiceIpvs]
    order: Sequence[ServicePortName]
    port_index: Mapping[NamespacedName, tuple[ServicePortName, ...]]
    changed: frozenset[ServicePortName] | None = None
    replaced: Mapping[ServicePortName, ServiceIpvs] = field(default_factory=dict)

    # --- derived kernel state ---------------------------------------------------------

    @cached_property
    def virtual_servers(self) -> dict[tuple[str, str, int], VirtualServer]:
        """Every virtual server by key; the first service port (in order) wins a clash."""
        out: dict[tuple[str, str, int], VirtualServer] = {}
        for name in self.order:
            for vs in self.services[name].virtual_servers:
                out.setdefault(vs.key, vs)
        return out

    @cached_property
    def bind_addresses(self) -> tuple[str, ...]:
        """The addresses on ``kube-ipvs0``, sorted."""
        addrs = {a for name in self.order for a in self.services[name].bind_addresses}
        return tuple(sorted(addrs, key=_ip_key))

    @cached_property
    def ipset_entries(self) -> dict[str, frozenset[str]]:
        """Each set's entries, by kube-proxy's (IPv4) set name; every set is present."""
        groups: dict[str, set[str]] = {info.name: set() for info in IPSETS}
        for name in self.order:
            for set_name, entry in self.services[name].entries:
                groups[set_name].add(entry)
        groups[IPVS_IPS].update(self.bind_addresses)
        return {k: frozenset(v) for k, v in groups.items()}

    @cached_property
    def out_filter(self) -> tuple[tuple[str, str, int], ...]:
        """Load balancers the node may not reach, in service order."""
        return tuple(e for name in self.order for e in self.services[name].out_filter)

    def set_name(self, name: str) -> str:
        """The kernel name of set ``name`` in this plan's family."""
        return ipset_name(name, self.options.family)

    # --- iptables ----------------------------------------------------------------------

    @cached_property
    def iptables_rules(self) -> dict[str, list[str]]:
        """The ``-A`` lines of each table (``nat``, ``filter``), as kube-proxy's
        ``writeIptablesRules`` orders them."""
        return _iptables_rules(self)

    def render_iptables(self, *, jumps: bool = True) -> str:
        """The ``iptables-restore`` input (nat, then filter). With ``jumps`` the rules in the
        built-in chains are included, for loading into a fresh namespace; the applier
        ensures those separately, as kube-proxy does."""
        out: list[str] = []
        rules = self.iptables_rules
        for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            out.append(f"*{table}\n")
            out.extend(f":{c} - [0:0]\n" for c in chains)
            if jumps:
                # Prepending each in turn leaves them reversed in the built-in chain.
                out.extend(j.line() for j in reversed(JUMPS) if j.table == table)
            out.extend(rules[table])
            out.append("COMMIT\n")
        return "".join(out)

    # --- text --------------------------------------------------------------------------

    def render_ipset(self, sets: Mapping[str, Collection[str]] | None = None) -> str:
        """``ipset restore`` input: every set created, then its entries (sorted)."""
        entries = self.ipset_entries if sets is None else sets
        family = self.options.family
        out: list[str] = []
        for info in IPSETS:
            name = ipset_name(info.name, family)
            out.append(f"create {name} {' '.join(ipset_create_args(info, family))}\n")
        for info in IPSETS:
            name = ipset_name(info.name, family)
            out.extend(f"add {name} {e}\n" for e in sorted(entries.get(info.name, ())))
        return "".join(out)

    def render_ipvs(self, vss: Iterable[VirtualServer] | None = None) -> str:
        """``ipvsadm -R`` input (numeric): each virtual server, then its real servers."""
        out: list[str] = []
        for vs in self.virtual_servers.values() if vss is None else vss:
            out.extend(ipvsadm_lines(vs))
        return "".join(out)

    def render_addresses(self, addresses: Iterable[str] | None = None) -> str:
        """One ``ADDR/32 dev kube-ipvs0`` line per bound address (``/128`` for IPv6)."""
        prefix = 128 if self.options.family == IPV6 else 32
        addrs = self.bind_addresses if addresses is None else addresses
        return "".join(f"{a}/{prefix} dev {DUMMY_DEVICE}\n" for a in addrs)

    def render(self) -> str:
        """The four sections ``# ipset``, ``# ipvs``, ``# addresses``, ``# iptables``."""
        return (
            "# ipset\n"
            + self.render_ipset()
            + "# ipvs\n"
            + self.render_ipvs()
            + "# addresses\n"
            + self.render_addresses()
            + "# iptables\n"
            + self.render_iptables()
        )

    def render_services(self, services: Collection[NamespacedName]) -> str:
        """The four sections with only what ``services`` contribute (for reading)."""
        wanted = [n for n in self.order if n.service in services]
        sets: dict[str, set[str]] = {}
        vss: dict[tuple[str, str, int], VirtualServer] = {}
        addrs: list[str] = []
        for name in wanted:
            svc = self.services[name]
            for set_name, entry in svc.entries:
                sets.setdefault(set_name, set()).add(entry)
            for vs in svc.virtual_servers:
                vss.setdefault(vs.key, vs)
            addrs.extend(a for a in svc.bind_addresses if a not in addrs)
        sets.setdefault(IPVS_IPS, set()).update(addrs)
        family = self.options.family
        ipset_lines = [
            f"add {ipset_name(info.name, family)} {e}\n"
            for info in IPSETS
            for e in sorted(sets.get(info.name, ()))
        ]
        return (
            "# ipset\n"
            + "".join(ipset_lines)
            + "# ipvs\n"
            + self.render_ipvs(vss.values())
            + "# addresses\n"
            + self.render_addresses(sorted(addrs, key=_ip_key))
        )

    def describe_service(self, name: ServicePortName) -> list[str]:
        """The lines one service port contributes (``ipset add``, ipvsadm and address lines),
        for ``--dry-run`` diffs."""
        svc = self.services.get(name)
        if svc is None:
            return []
        family = self.options.family
        lines = [f"add {ipset_name(s, family)} {e}" for s, e in svc.entries]
        for vs in svc.virtual_servers:
            lines.extend(line.rstrip("\n") for line in ipvsadm_lines(vs))
        prefix = 128 if family == IPV6 else 32
        lines.extend(f"{a}/{prefix} dev {DUMMY_DEVICE}" for a in svc.bind_addresses)
        return lines


def ipvsadm_service(vs: VirtualServer) -> str:
    """The ``-t/-u/--sctp-service ADDR:PORT`` part of an ipvsadm line."""
    opt = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs.protocol]
    return f"{opt} {vs.hostport}"


def ipvsadm_lines(vs: VirtualServer) -> Iterator[str]:
    """``-A`` for the virtual server and ``-a`` per real server (ipvsadm -S -n order)."""
    service = ipvsadm_service(vs)
    line = f"-A {service} -s {vs.scheduler}"
    if vs.flags & FLAG_PERSISTENT:
        line += f" -p {vs.timeout}"
    if vs.flags & FLAG_SOURCE_HASH:
        line += f" -b {vs.scheduler}-port"
    yield line + "\n"
    for address, port in vs.real_servers:
        yield f"-a {service} -r {join_host_port(address, port)} -m -w {WEIGHT}\n"


def _iptables_rules(plan: IpvsPlan) -> dict[str, list[str]]:
    options = plan.options
    sets = plan.ipset_entries
    name = plan.set_name
    mark = options.masquerade_mark
    nat: list[str] = []
    filt: list[str] = []

    def comment(set_name: str) -> str:
        return f'-m comment --comment "{_IPSET_BY_NAME[set_name].comment}"'

    nat.append(f"-A {KUBE_SERVICES} -s {options.loopback_cidr} -j RETURN\n")
    # kube-proxy's ipsetWithIptablesChain, for the sets that have entries.
    for set_name, table, chain, target, match, proto in _SET_JUMPS:
        if not sets[set_name]:
            continue
        p = f"-p {proto} " if proto else ""
        line = (
            f"-A {chain} {p}{comment(set_name)} -m set --match-set {name(set_name)} {match} "
            f"-j {target}\n"
        )
        (filt if table == "filter" else nat).append(line)

    if sets[CLUSTER_IP]:
        args = f"{comment(CLUSTER_IP)} -m set --match-set {name(CLUSTER_IP)}"
        detector = options.local_detector
        if options.masquerade_all:
            nat.append(f"-A {KUBE_SERVICES} {args} dst,dst -j {KUBE_MARK_MASQ}\n")
        elif detector.implemented:
            nat.append(
                f"-A {KUBE_SERVICES} {detector.if_not_local} {args} dst,dst -j {KUBE_MARK_MASQ}\n"
            )
        else:
            # Node-originated traffic picks a VIP on kube-ipvs0 as its source: masquerade it.
            nat.append(f"-A {KUBE_SERVICES} {args} src,dst -j {KUBE_MARK_MASQ}\n")

    def external_ip_rules(args: str) -> None:
        nat.append(
            f"-A {KUBE_SERVICES} {args} -m physdev ! --physdev-is-in "
            "-m addrtype ! --src-type LOCAL -j ACCEPT\n"
        )
        nat.append(f"-A {KUBE_SERVICES} {args} -m addrtype --dst-type LOCAL -j ACCEPT\n")

    if sets[EXTERNAL_IP]:
        args = f"{comment(EXTERNAL_IP)} -m set --match-set {name(EXTERNAL_IP)} dst,dst"
        nat.append(f"-A {KUBE_SERVICES} {args} -j {KUBE_MARK_MASQ}\n")
        external_ip_rules(args)
    if sets[EXTERNAL_IP_LOCAL]:
        args = f"{comment(EXTERNAL_IP_LOCAL)} -m set --match-set {name(EXTERNAL_IP_LOCAL)} dst,dst"
        external_ip_rules(args)

    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}\n")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}\n")
    filt.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP\n")
    for ip, proto, port in plan.out_filter:
        filt.append(
            f"-A {KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {proto} "
            f"--vport {port} -j DROP\n"
        )
    # Accept traffic to virtual services, in case other rules would drop it (last rules).
    for set_name in (CLUSTER_IP, LOAD_BALANCER):
        if sets[set_name]:
            nat.append(
                f"-A {KUBE_SERVICES} -m set --match-set {name(set_name)} dst,dst -j ACCEPT\n"
            )
    filt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark}/{mark} -j ACCEPT\n"
    )
    filt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    )
    filt.append(
        f"-A {KUBE_NODE_PORT} {comment(HEALTH_CHECK_NODE_PORT)} "
        f"-m set --match-set {name(HEALTH_CHECK_NODE_PORT)} dst -j ACCEPT\n"
    )
    # Only service ports may be reached on the addresses of kube-ipvs0 (#72236).
    for set_name, match in (
        (LOAD_BALANCER, "dst,dst"),
        (CLUSTER_IP, "dst,dst"),
        (EXTERNAL_IP, "dst,dst"),
        (EXTERNAL_IP_LOCAL, "dst,dst"),
        (HEALTH_CHECK_NODE_PORT, "dst"),
    ):
        filt.append(
            f"-A {KUBE_IPVS_FILTER} -m set --match-set {name(set_name)} {match} -j RETURN\n"
        )
    filt.append(
        f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW "
        f"-m set --match-set {name(IPVS_IPS)} dst -j REJECT\n"
    )
    masquerade = "-j MASQUERADE --random-fully" if options.random_fully else "-j MASQUERADE"
    nat.append(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN\n")
    nat.append(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}\n")
    nat.append(
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring '
        f'SNAT" {masquerade}\n'
    )
    nat.append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}\n")
    return {"nat": nat, "filter": filt}


_SET_JUMPS: tuple[tuple[str, str, str, str, str, str], ...] = (
    # (set, table, chain, target, match, protocol): kube-proxy's ipsetWithIptablesChain;
    # each -LOCAL set comes before its set.
    (LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src", ""),
    (LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst", ""),
    (LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst", ""),
    (NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    (NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    (NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    (NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    (NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    (NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    (LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst", ""),
    (LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
    (LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src", ""),
)


def compile_ipvs(
    state: ProxyState,
    options: IpvsOptions,
    *,
    previous: IpvsPlan | None = None,
    changed_services: Collection[NamespacedName] | None = None,
) -> IpvsPlan:
    """Compile ``state`` into an :class:`IpvsPlan`.

    With ``previous`` (compiled with the same options) and ``changed_services``, only those
    Services are recompiled; the result equals a from-scratch compile and ``changed`` names the
    service ports whose fragment differs.
    """
    if options.family != state.family:
        raise ValueError(f"options are for {options.family}, state is {state.family}")
    if previous is None or changed_services is None or previous.options != options:
        services = {
            name: compile_service_port(
                port, state.categorize(port), state.endpoints_of(name), options
            )
            for name, port in state.services.items()
        }
        return IpvsPlan(
            options=options,
            services=services,
            order=sorted(services),
            port_index=dict(state.ports_by_service),
        )
    services = dict(previous.services)
    port_index = dict(previous.port_index)
    changed: set[ServicePortName] = set()
    replaced: dict[ServicePortName, ServiceIpvs] = {}
    order_list: list[ServicePortName] | None = None  # copied on the first add or removal
    for svc in changed_services:
        new_names = state.ports_by_service.get(svc, ())
        old_names = port_index.pop(svc, ())
        if new_names:
            port_index[svc] = new_names
        for name in old_names:
            if name not in new_names:
                replaced[name] = services.pop(name)
                changed.add(name)
                if order_list is None:
                    order_list = list(previous.order)
                del order_list[bisect.bisect_left(order_list, name)]
        for name in new_names:
            port = state.services[name]
            fresh = compile_service_port(
                port, state.categorize(port), state.endpoints_of(name), options
            )
            old = services.get(name)
            services[name] = fresh
            if old is None:
                if order_list is None:
                    order_list = list(previous.order)
                bisect.insort(order_list, name)
                changed.add(name)
            elif _rendered(old) != _rendered(fresh):
                changed.add(name)
                replaced[name] = old
    return IpvsPlan(
        options=options,
        services=services,
        order=previous.order if order_list is None else order_list,
        port_index=port_index,
        changed=frozenset(changed),
        replaced=replaced,
    )


def _rendered(svc: ServiceIpvs) -> tuple[object, ...]:
    return svc.virtual_servers, svc.entries, svc.bind_addresses, svc.out_filter
