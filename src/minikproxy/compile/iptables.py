"""The iptables compiler: ``ProxyState`` -> ``iptables-restore`` input, as kube-proxy writes it.

Pure: no I/O, no clock, no logging. The same objects give the same bytes, so output can be
diffed. Every service port compiles to a :class:`ServiceRules` fragment (its lines in the
top-level chains plus its own KUBE-SVC/SVL/EXT/FW/SEP chains). A compile given the previous
ruleset and the set of changed Services reuses every other fragment, which is what makes
partial syncs cheap; :meth:`IptablesRuleset.render_partial` then writes only the changed
chains for an ``iptables-restore --noflush`` (kube-proxy's minimized restore).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from minikproxy.compile.cidr import cidr_contains
from minikproxy.compile.localdetect import NO_LOCAL_DETECTOR, LocalTrafficDetector
from minikproxy.compile.names import (
    KUBE_EXTERNAL_SERVICES,
    KUBE_FIREWALL,
    KUBE_FORWARD,
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_CANARY,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    endpoint_chain_for_key,
    service_chains,
)
from minikproxy.gcutil import gc_paused
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints

LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000
"""Above this many endpoints kube-proxy drops per-endpoint comments (large-cluster mode)."""


@dataclass(frozen=True)
class IptablesOptions:
    """Node options that shape the rules (all already resolved: no lookups at compile time).

    ``nodeport_addresses`` None means NodePorts answer on every local address
    (``-m addrtype --dst-type LOCAL``); otherwise one jump per listed node IP.
    ``node_ip`` is the node's primary IP of this family, used to let the node reach its own
    load balancers when their source ranges include it.
    """

    family: IPFamily = IPV4
    masquerade_bit: int = 14
    masquerade_all: bool = False
    local_detector: LocalTrafficDetector = NO_LOCAL_DETECTOR
    node_ip: str = ""
    nodeport_addresses: tuple[str, ...] | None = None
    localhost_nodeports: bool = True
    random_fully: bool = True
    conntrack_tcp_be_liberal: bool = False
    large_cluster_threshold: int = LARGE_CLUSTER_ENDPOINTS_THRESHOLD

    @property
    def masquerade_mark(self) -> str:
        """The mark bit as kube-proxy writes it, e.g. ``0x4000`` for bit 14."""
        return f"{1 << self.masquerade_bit:#x}"

    @property
    def localhost_nodeports_active(self) -> bool:
        """Localhost NodePorts only exist for IPv4 (they need ``route_localnet``)."""
        return self.family == IPV4 and self.localhost_nodeports


class ServiceRules(NamedTuple):
    """Everything one service port contributes to the ruleset.

    The ``filter_*``/``nat_*`` strings are whole ``-A`` lines (newline-terminated) that go into
    the top-level chains; ``chains``, ``chain_decls`` and ``rules`` are the port's own nat
    chains. The remaining fields summarise the port for metrics, health and conntrack.
    """

    name: ServicePortName
    filter_services: str
    filter_external: str
    filter_nodeports: str
    filter_firewall: str
    nat_services: str
    nat_nodeports: str
    chains: tuple[str, ...]
    chain_decls: str
    rules: str
    rule_count: int
    categorized: CategorizedEndpoints
    no_local_internal: bool
    no_local_external: bool


# (table, chain) keys of the top-level chains whose contents depend on services.
_DYNAMIC_CHAINS: tuple[tuple[str, str, str], ...] = (
    ("filter", KUBE_SERVICES, "filter_services"),
    ("filter", KUBE_EXTERNAL_SERVICES, "filter_external"),
    ("filter", KUBE_NODEPORTS, "filter_nodeports"),
    ("filter", KUBE_PROXY_FIREWALL, "filter_firewall"),
    ("nat", KUBE_SERVICES, "nat_services"),
    ("nat", KUBE_NODEPORTS, "nat_nodeports"),
)
_FIELD_INDEX = {f: ServiceRules._fields.index(f) for _, _, f in _DYNAMIC_CHAINS}

RULE_LINE_FIELDS: tuple[str, ...] = (*(f for _, _, f in _DYNAMIC_CHAINS), "rules")
"""The :class:`ServiceRules` fields holding rule lines: the port's fragments of the top-level
chains first, then the rules of its own chains."""

RENDERED_FIELDS: tuple[str, ...] = (*RULE_LINE_FIELDS, "chains", "chain_decls", "rule_count")
"""The :class:`ServiceRules` fields that end up in the kernel: a partial sync rewrites a service
port when one of them changed. Every other field is in :data:`SUMMARY_FIELDS`."""

SUMMARY_FIELDS: tuple[str, ...] = ("name", "categorized", "no_local_internal", "no_local_external")
"""The :class:`ServiceRules` fields that only describe the port (key, metrics, health)."""

_rendered = operator.attrgetter(*RENDERED_FIELDS)


def same_rules(old: ServiceRules, new: ServiceRules) -> bool:
    """Whether ``old`` and ``new`` put the same rules in the kernel (compared by field name,
    so adding or reordering fields cannot change what "unchanged" means)."""
    return bool(_rendered(old) == _rendered(new))


FILTER_CHAINS = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)
NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)


class JumpRule(NamedTuple):
    """A rule in a built-in chain jumping to one of ours (kube-proxy's ``iptablesJumpChains``)."""

    table: str
    target: str
    source: str
    comment: str
    extra: str = ""

    def args(self) -> str:
        """The rule's arguments after ``-A CHAIN``/``-I CHAIN``."""
        parts = [self.extra] if self.extra else []
        if self.comment:
            parts.append(f'-m comment --comment "{self.comment}"')
        parts.append(f"-j {self.target}")
        return " ".join(parts)


_NEW = "-m conntrack --ctstate NEW"
_EXTERNAL_PORTALS = "kubernetes externally-visible service portals"
JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "INPUT",
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    JumpRule(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "FORWARD",
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    JumpRule("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    JumpRule("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    JumpRule("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    JumpRule("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    JumpRule("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    JumpRule("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    JumpRule("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    JumpRule("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    JumpRule("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
)
"""Each is prepended (``-I``) to its built-in chain, in this order, as kube-proxy does."""

KUBELET_JUMP_RULES: tuple[JumpRule, ...] = (
    JumpRule("filter", KUBE_FIREWALL, "INPUT", ""),
    JumpRule("filter", KUBE_FIREWALL, "OUTPUT", ""),
)
"""kubelet's KUBE-FIREWALL jumps, needed when localhost NodePorts are on (IPv4)."""


def jump_rules(options: IptablesOptions) -> tuple[JumpRule, ...]:
    """The jump rules this node needs, in the order kube-proxy prepends them."""
    if options.localhost_nodeports_active:
        return JUMP_RULES + KUBELET_JUMP_RULES
    return JUMP_RULES


@lru_cache(maxsize=4096)
def _probability(n: int) -> str:
    return f"{1.0 / n:.10f}"


def _static_filter_rules(options: IptablesOptions) -> dict[str, str]:
    mark = options.masquerade_mark
    forward = []
    if not options.conntrack_tcp_be_liberal:
        forward.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP\n")
    forward.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {mark}/{mark} -j ACCEPT\n"
    )
    forward.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
    )
    out = {KUBE_FORWARD: "".join(forward)}
    if options.localhost_nodeports_active:
        out[KUBE_FIREWALL] = (
            f'-A {KUBE_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP\n"
        )
    return out


def _static_nat_rules(options: IptablesOptions) -> dict[str, str]:
    mark = options.masquerade_mark
    masquerade = "-j MASQUERADE --random-fully" if options.random_fully else "-j MASQUERADE"
    return {
        KUBE_POSTROUTING: (
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN\n"
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}\n"
            f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring '
            f'SNAT" {masquerade}\n'
        ),
        KUBE_MARK_MASQ: f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}\n",
    }


def _nodeports_jumps(options: IptablesOptions) -> str:
    comment = '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain"'  # noqa: E501
    if options.nodeport_addresses is None:
        dest = "-m addrtype --dst-type LOCAL"
        if options.family == IPV6:
            dest += " ! -d ::1/128"
        elif not options.localhost_nodeports:
            dest += " ! -d 127.0.0.0/8"
        return f"-A {KUBE_SERVICES} {comment} {dest} -j {KUBE_NODEPORTS}\n"
    lines = []
    for ip in options.nodeport_addresses:
        loopback = ip.startswith("127.") or ip == "::1"
        if loopback and not options.localhost_nodeports_active:
            continue  # localhost NodePorts are off, or impossible (IPv6)
        lines.append(f"-A {KUBE_SERVICES} {comment} -d {ip} -j {KUBE_NODEPORTS}\n")
    return "".join(lines)


def compile_service_port(
    port: ServicePort,
    categorized: CategorizedEndpoints,
    options: IptablesOptions,
    *,
    large_cluster: bool = False,
) -> ServiceRules:
    """Compile one service port (kube-proxy's per-service body of ``syncProxyRules``)."""
    spn = str(port.name)
    proto = port.protocol.lower()
    pm = f"-m {proto} -p {proto}"
    chains = service_chains(port.name)
    svc_chain, svl_chain, ext_chain, fw_chain = chains
    detector = options.local_detector
    cluster_eps, local_eps = categorized.cluster, categorized.local

    has_endpoints = categorized.has_any
    uses_cluster_chain = bool(cluster_eps) and port.uses_cluster_endpoints
    uses_local_chain = bool(local_eps) and port.uses_local_endpoints
    internal_chain = svc_chain
    has_internal = has_endpoints
    if port.internal_policy_local:
        internal_chain = svl_chain
        has_internal = has_endpoints and bool(local_eps)
    external_policy_chain = svc_chain
    has_external = has_endpoints
    if port.external_policy_local:
        external_policy_chain = svl_chain
        has_external = has_endpoints and bool(local_eps)
    uses_ext_chain = has_endpoints and port.externally_accessible
    uses_fw_chain = bool(
        has_endpoints and port.load_balancer_vips and port.load_balancer_source_ranges
    )
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    if not has_endpoints:
        internal_target = external_target = "REJECT"
        internal_comment = external_comment = f'"{spn} has no endpoints"'
    else:
        internal_target = external_target = ""
        internal_comment = external_comment = f'"{spn} has no local endpoints"'
        if not has_internal:
            internal_target = "DROP"
        if not has_external:
            external_target = "DROP"

    dport = f"--dport {port.port}"
    nat_services: list[str] = []
    filter_services = filter_external = filter_nodeports = filter_firewall = nat_nodeports = ""
    cip = port.cluster_ip
    if has_internal:
        nat_services.append(
            f'-A {KUBE_SERVICES} -m comment --comment "{spn} cluster IP" {pm} -d {cip} {dport} '
            f"-j {internal_chain}\n"
        )
    else:
        filter_services = (
            f"-A {KUBE_SERVICES} -m comment --comment {internal_comment} {pm} -d {cip} {dport} "
            f"-j {internal_target}\n"
        )
    ext_filter: list[str] = []
    for ip in port.external_ips:
        if has_endpoints:
            nat_services.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{spn} external IP" {pm} -d {ip} '
                f"{dport} -j {ext_chain}\n"
            )
        if not has_external:
            ext_filter.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {pm} "
                f"-d {ip} {dport} -j {external_target}\n"
            )
    fw_filter: list[str] = []
    for ip in port.load_balancer_vips:
        if has_endpoints:
            nat_services.append(
                f'-A {KUBE_SERVICES} -m comment --comment "{spn} loadbalancer IP" {pm} -d {ip} '
                f"{dport} -j {lb_chain}\n"
            )
        if uses_fw_chain:
            fw_filter.append(
                f'-A {KUBE_PROXY_FIREWALL} -m comment --comment "{spn} traffic not accepted by '
                f'{fw_chain}" {pm} -d {ip} {dport} -j DROP\n'
            )
    if not has_external:
        for ip in port.load_balancer_vips:
            ext_filter.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} {pm} "
                f"-d {ip} {dport} -j {external_target}\n"
            )
    if port.node_port:
        if has_endpoints:
            nat_nodeports = (
                f"-A {KUBE_NODEPORTS} -m comment --comment {spn} {pm} --dport {port.node_port} "
                f"-j {ext_chain}\n"
            )
        if not has_external:
            ext_filter.append(
                f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment} "
                f"-m addrtype --dst-type LOCAL {pm} --dport {port.node_port} "
                f"-j {external_target}\n"
            )
    if port.health_check_node_port:
        filter_nodeports = (
            f'-A {KUBE_NODEPORTS} -m comment --comment "{spn} health check node port" '
            f"-m tcp -p tcp --dport {port.health_check_node_port} -j ACCEPT\n"
        )
    if ext_filter:
        filter_external = "".join(ext_filter)
    if fw_filter:
        filter_firewall = "".join(fw_filter)

    own_chains: list[str] = []
    rules: list[str] = []
    if has_internal:
        args = f'-m comment --comment "{spn} cluster IP" {pm} -d {cip} {dport}'
        if options.masquerade_all:
            rules.append(f"-A {internal_chain} {args} -j {KUBE_MARK_MASQ}\n")
        elif detector.implemented:
            rules.append(
                f"-A {internal_chain} {args} {detector.if_not_local} -j {KUBE_MARK_MASQ}\n"
            )

    if uses_ext_chain:
        own_chains.append(ext_chain)
        if not port.external_policy_local:
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn} external '
                f'destinations" -j {KUBE_MARK_MASQ}\n'
            )
        else:
            if detector.implemented:
                rules.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {spn} external '
                    f'destinations" {detector.if_local} -j {svc_chain}\n'
                )
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn} '
                f'external destinations" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}\n'
            )
            rules.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn} external '
                f'destinations" -m addrtype --src-type LOCAL -j {svc_chain}\n'
            )
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_policy_chain}\n")

    if uses_fw_chain:
        own_chains.append(fw_chain)
        fw_args = f'-A {fw_chain} -m comment --comment "{spn} loadbalancer IP"'
        allow_from_node = False
        node_ip = options.node_ip
        for cidr in port.load_balancer_source_ranges:
            rules.append(f"{fw_args} -s {cidr} -j {ext_chain}\n")
            if node_ip and cidr_contains(cidr, node_ip):
                allow_from_node = True
        if allow_from_node:
            for ip in port.load_balancer_vips:
                rules.append(f"{fw_args} -s {ip} -j {ext_chain}\n")
        rules.append(
            f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be dropped by '
            f'{KUBE_PROXY_FIREWALL}"\n'
        )

    comment_prefix = "" if large_cluster else f'-m comment --comment "{spn} -> '
    name = port.name
    sep_key = spn + proto
    if uses_cluster_chain:
        own_chains.append(svc_chain)
        _endpoint_jumps(rules, svc_chain, sep_key, cluster_eps, port, comment_prefix)
    if uses_local_chain:
        own_chains.append(svl_chain)
        _endpoint_jumps(rules, svl_chain, sep_key, local_eps, port, comment_prefix)

    sep_comment = "" if large_cluster else f"-m comment --comment {spn} "
    affinity = port.session_affinity_client_ip
    for ep in categorized.reachable:
        address = ep.address
        sep = endpoint_chain_for_key(sep_key, address)
        own_chains.append(sep)
        # Literal chain names below (not the constants): this loop runs per endpoint.
        if affinity:
            rules.append(
                f"-A {sep} {sep_comment}-s {ep.ip} -j KUBE-MARK-MASQ\n"
                f"-A {sep} {sep_comment}-m recent --name {sep} --set {pm} -j DNAT "
                f"--to-destination {address}\n"
            )
        else:
            rules.append(
                f"-A {sep} {sep_comment}-s {ep.ip} -j KUBE-MARK-MASQ\n"
                f"-A {sep} {sep_comment}{pm} -j DNAT --to-destination {address}\n"
            )

    rules_text = "".join(rules)
    return ServiceRules(
        name=name,
        filter_services=filter_services,
        filter_external=filter_external,
        filter_nodeports=filter_nodeports,
        filter_firewall=filter_firewall,
        nat_services="".join(nat_services),
        nat_nodeports=nat_nodeports,
        chains=tuple(own_chains),
        chain_decls=":" + " - [0:0]\n:".join(own_chains) + " - [0:0]\n" if own_chains else "",
        rules=rules_text,
        rule_count=rules_text.count("\n"),
        categorized=categorized,
        no_local_internal=has_endpoints and not has_internal,
        no_local_external=has_endpoints and not has_external and port.externally_accessible,
    )


def _endpoint_jumps(
    rules: list[str],
    chain: str,
    sep_key: str,
    endpoints: Sequence[Endpoint],
    port: ServicePort,
    comment_prefix: str,
) -> None:
    """Affinity checks, then one ``statistic`` rule per endpoint (the last unconditional)."""
    eps = [(endpoint_chain_for_key(sep_key, ep.address), ep.address) for ep in endpoints]
    if port.session_affinity_client_ip:
        seconds = port.sticky_max_age_seconds
        for sep, address in eps:
            comment = f'{comment_prefix}{address}" ' if comment_prefix else ""
            rules.append(
                f"-A {chain} {comment}-m recent --name {sep} --rcheck --seconds {seconds} --reap "
                f"-j {sep}\n"
            )
    n = len(eps)
    last = n - 1
    if comment_prefix:
        for i, (sep, address) in enumerate(eps):
            if i < last:
                rules.append(
                    f'-A {chain} {comment_prefix}{address}" -m statistic --mode random '
                    f"--probability {_probability(n - i)} -j {sep}\n"
                )
            else:
                rules.append(f'-A {chain} {comment_prefix}{address}" -j {sep}\n')
    else:
        for i, (sep, _) in enumerate(eps):
            if i < last:
                rules.append(
                    f"-A {chain} -m statistic --mode random --probability "
                    f"{_probability(n - i)} -j {sep}\n"
                )
            else:
                rules.append(f"-A {chain} -j {sep}\n")


class IptablesRuleset:
    """A compiled ruleset for one IP family: fragments per service port, in sorted order.

    Build it with :func:`compile_iptables`. ``changed`` is None for a from-scratch compile, or
    the port names whose fragments differ from the previous ruleset (added, removed or
    rewritten); ``replaced`` then holds the previous fragments of those names that existed,
    and ``replaced_top_level`` the previous text of the top-level chains that changed.
    Only those are kept, not the previous ruleset: a controller holds its last ruleset for
    the process's lifetime, and a chain of predecessors would grow with every sync.
    """

    def __init__(
        self,
        *,
        options: IptablesOptions,
        services: dict[ServicePortName, ServiceRules],
        order: list[ServicePortName],
        large_cluster: bool,
        top_level: dict[tuple[str, str], str],
        port_index: dict[NamespacedName, tuple[ServicePortName, ...]],
        service_rule_count: int,
        replaced: Mapping[ServicePortName, ServiceRules] | None = None,
        changed: frozenset[ServicePortName] | None = None,
        dirty_top_level: frozenset[tuple[str, str]] | None = None,
        replaced_top_level: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self.options = options
        self.services = services
        self.order = order
        self.large_cluster = large_cluster
        self.top_level = top_level
        self.port_index = port_index
        self.service_rule_count = service_rule_count
        self.replaced = replaced
        self.changed = changed
        self.dirty_top_level = dirty_top_level
        self.replaced_top_level = replaced_top_level or {}

    @property
    def family(self) -> IPFamily:
        """The IP family of these rules."""
        return self.options.family

    def _filter_chain_names(self) -> tuple[str, ...]:
        if self.options.localhost_nodeports_active:
            return (*FILTER_CHAINS, KUBE_FIREWALL)
        return FILTER_CHAINS

    # --- full restore -----------------------------------------------------------------------

    def render(
        self, *, jumps: bool = True, canary: bool = True, delete_chains: Iterable[str] = ()
    ) -> str:
        """The complete ``iptables-restore`` input.

        With ``jumps`` the rules in the built-in chains are included (for loading into a fresh
        namespace; the controller ensures those separately, as kube-proxy does). With
        ``canary`` the KUBE-PROXY-CANARY chains are declared in mangle, nat and filter.
        ``delete_chains`` are stale nat chains found in the kernel: flushed, then deleted.
        """
        return "".join(self.render_parts(jumps=jumps, canary=canary, delete_chains=delete_chains))

    def render_parts(
        self, *, jumps: bool = True, canary: bool = True, delete_chains: Iterable[str] = ()
    ) -> list[str]:
        """:meth:`render` as the fragments it joins, to write out without one big copy."""
        stale = sorted(set(delete_chains))
        out: list[str] = []
        for table in ("filter", "nat"):
            out.append(f"*{table}\n")
            names = self._filter_chain_names() if table == "filter" else NAT_CHAINS
            out.extend(f":{c} - [0:0]\n" for c in names)
            if canary:
                out.append(f":{KUBE_PROXY_CANARY} - [0:0]\n")
            if table == "nat":
                out.extend(self.services[n].chain_decls for n in self.order)
                out.extend(f":{c} - [0:0]\n" for c in stale)
            if jumps:
                out.extend(_jump_lines(table, self.options))
            out.extend(self.top_level.get((table, c), "") for c in names)
            if table == "nat":
                out.extend(self.services[n].rules for n in self.order)
                out.extend(f"-X {c}\n" for c in stale)
            out.append("COMMIT\n")
        if canary:
            out.append(f"*mangle\n:{KUBE_PROXY_CANARY} - [0:0]\nCOMMIT\n")
        return out

    def render_service_batch(self, names: Sequence[ServicePortName]) -> str:
        """The own chains of ``names`` only, for ``--noflush``: a full sync written in batches.

        KUBE-MARK-MASQ must already exist (the controller ensures it); nothing else outside
        these services' chains is touched.
        """
        parts = [self.services[n] for n in names]
        decls = "".join(r.chain_decls for r in parts)
        return f"*nat\n{decls}{''.join(r.rules for r in parts)}COMMIT\n"

    def render_top_level(self, *, canary: bool = True, delete_chains: Iterable[str] = ()) -> str:
        """Every top-level chain (and canaries), deleting ``delete_chains``: the last step of a
        full sync written in batches, after :meth:`render_service_batch` for every service."""
        stale = sorted(set(delete_chains))
        out: list[str] = []
        for table in ("filter", "nat"):
            names = self._filter_chain_names() if table == "filter" else NAT_CHAINS
            out.append(f"*{table}\n")
            out.extend(f":{c} - [0:0]\n" for c in names)
            if canary:
                out.append(f":{KUBE_PROXY_CANARY} - [0:0]\n")
            if table == "nat":
                out.extend(f":{c} - [0:0]\n" for c in stale)
            out.extend(self.top_level.get((table, c), "") for c in names)
            if table == "nat":
                out.extend(f"-X {c}\n" for c in stale)
            out.append("COMMIT\n")
        if canary:
            out.append(f"*mangle\n:{KUBE_PROXY_CANARY} - [0:0]\nCOMMIT\n")
        return "".join(out)

    # --- partial restore --------------------------------------------------------------------

    def render_partial(self, *, rewrite_top_level: bool = False) -> str:
        """Input for ``iptables-restore --noflush`` bringing the kernel from the previous
        ruleset to this one.

        Of the changed services it writes only the chains whose rules changed (new chains
        included) and deletes the chains they no longer have. A top-level chain is touched
        only if its content changed, and then edited in place (``-D CHAIN rule``, ``-I CHAIN n``)
        when few of its rules changed, else rewritten. With ``rewrite_top_level`` it does
        what kube-proxy does: every top-level chain and every chain of the changed services
        rewritten whole. Returns "" when nothing needs writing. Without a previous ruleset it
        is the full ruleset without jumps or canaries.

        Why: on nf_tables iptables-restore re-adds every rule of a chain it writes, and the
        top-level chains hold a rule or more per service; so an endpoint change in a
        10-endpoint service writes its KUBE-SVC chain and one KUBE-SEP chain instead of eleven,
        and a new Service adds its lines to KUBE-SERVICES instead of rewriting all of them.
        """
        if self.replaced is None or self.changed is None or self.dirty_top_level is None:
            return self.render(jumps=False, canary=False)
        dirty = self.dirty_top_level
        out: list[str] = []
        filter_chains = [
            c for c in self._filter_chain_names() if rewrite_top_level or ("filter", c) in dirty
        ]
        filter_edits, filter_chains = self._top_level_edits(
            "filter", filter_chains, rewrite_top_level
        )
        if filter_chains or filter_edits:
            out.append("*filter\n")
            out.extend(f":{c} - [0:0]\n" for c in filter_chains)
            out.extend(self.top_level.get(("filter", c), "") for c in filter_chains)
            out.extend(filter_edits)
            out.append("COMMIT\n")

        nat_chains = [c for c in NAT_CHAINS if rewrite_top_level or ("nat", c) in dirty]
        nat_edits, nat_chains = self._top_level_edits("nat", nat_chains, rewrite_top_level)
        changed = sorted(self.changed)
        live: set[str] = set()
        for name in changed:
            rules = self.services.get(name)
            if rules is not None:
                live.update(rules.chains)
        stale: list[str] = []
        written: list[tuple[str, str]] = []  # (chain, its rules)
        for name in changed:
            old, new = self.replaced.get(name), self.services.get(name)
            if old is not None:
                stale.extend(c for c in old.chains if c not in live)
            if new is None:
                continue
            new_chains = _rules_by_chain(new)
            if rewrite_top_level or old is None:
                written.extend(new_chains.items())
                continue
            old_chains = _rules_by_chain(old)
            written.extend(
                (chain, text)
                for chain, text in new_chains.items()
                if chain not in old_chains or old_chains[chain] != text
            )
        if not nat_chains and not nat_edits and not written and not stale:
            return "".join(out)
        out.append("*nat\n")
        out.extend(f":{c} - [0:0]\n" for c in nat_chains)
        out.extend(f":{c} - [0:0]\n" for c, _ in written)
        out.extend(f":{c} - [0:0]\n" for c in stale)
        out.extend(self.top_level.get(("nat", c), "") for c in nat_chains)
        out.extend(nat_edits)  # after the declarations of the chains they jump to
        out.extend(text for _, text in written)
        out.extend(f"-X {c}\n" for c in stale)
        out.append("COMMIT\n")
        return "".join(out)

    def _top_level_edits(
        self, table: str, chains: list[str], rewrite: bool
    ) -> tuple[list[str], list[str]]:
        """Split the top-level ``chains`` to write into in-place edit lines (for those with a
        known previous text and few changes) and the chains to rewrite whole."""
        if rewrite:
            return [], chains
        edits: list[str] = []
        rewritten: list[str] = []
        for chain in chains:
            old = self.replaced_top_level.get((table, chain))
            new = self.top_level.get((table, chain), "")
            lines = None if old is None else _chain_edits(chain, old, new)
            if lines is None:
                rewritten.append(chain)
            else:
                edits.extend(lines)
        return edits, rewritten

    # --- reading ----------------------------------------------------------------------------

    def render_services(self, services: Collection[NamespacedName]) -> str:
        """Only the rules and chains of ``services`` (for reading, not loading)."""
        wanted = [n for n in self.order if n.service in services]
        out: list[str] = []
        for table, fields in (
            (
                "filter",
                ("filter_services", "filter_external", "filter_nodeports", "filter_firewall"),
            ),
            ("nat", ("nat_services", "nat_nodeports")),
        ):
            body = [getattr(self.services[n], f) for f in fields for n in wanted]
            if table == "nat":
                body.extend(self.services[n].rules for n in wanted)
            if any(body):
                decls = [self.services[n].chain_decls for n in wanted] if table == "nat" else []
                out.append(f"*{table}\n{''.join(decls)}{''.join(body)}COMMIT\n")
        return "".join(out)

    def all_chains(self) -> dict[str, set[str]]:
        """Every chain this ruleset owns, per table (top-level and per-service)."""
        nat = set(NAT_CHAINS)
        for rules in self.services.values():
            nat.update(rules.chains)
        return {"filter": set(self._filter_chain_names()), "nat": nat}

    def rule_counts(self) -> dict[str, int]:
        """Rules per table in the full ruleset (for ``sync_proxy_rules_iptables_total``)."""
        counts = {"filter": 0, "nat": self.service_rule_count}
        for (table, _), text in self.top_level.items():
            counts[table] += text.count("\n")
        return counts


def _chain_edits(chain: str, old_text: str, new_text: str) -> list[str] | None:
    """``-D``/``-I``/``-A`` lines turning ``chain`` from ``old_text`` into ``new_text`` (whole
    ``-A`` lines), or None when rewriting it is no more work (half its rules or more change).

    Blocks are edited from the last to the first, so the positions of the rules before a
    block are those of ``old_text``; a block's new lines are inserted one after the other
    before the first unchanged rule that follows it, or appended at the end of the chain.
    Rules are deleted by their spec, not their number: if the chain is not what we wrote
    (someone edited it), the restore fails and the next sync is full, instead of deleting
    someone else's rule.
    """
    old, new = old_text.splitlines(), new_text.splitlines()
    blocks = _changed_blocks(old, new)
    if blocks is None:
        return None
    if sum(max(i2 - i1, j2 - j1) for i1, i2, j1, j2 in blocks) * 2 >= max(len(new), 1):
        return None
    prefix = f"-A {chain} "
    lines: list[str] = []
    for i1, i2, j1, j2 in reversed(blocks):
        for line in old[i1:i2]:
            if not line.startswith(prefix):
                return None
            lines.append(f"-D {chain} {line[len(prefix) :]}\n")
        at_end = i2 == len(old)
        for k, line in enumerate(new[j1:j2]):
            if not line.startswith(prefix):
                return None
            if at_end:
                lines.append(line + "\n")
            else:
                lines.append(f"-I {chain} {i1 + 1 + k} {line[len(prefix) :]}\n")
    return lines


def _changed_blocks(
    old: Sequence[str], new: Sequence[str]
) -> list[tuple[int, int, int, int]] | None:
    """The blocks ``old[i1:i2]`` replaced by ``new[j1:j2]`` that turn ``old`` into ``new``.

    Linear (a top-level chain has a rule or more per Service: ~10^4 at 10k Services), and
    exact for what the compiler writes: lines unique within a chain, and the lines kept in
    the same relative order (each chain follows the sorted service order). None otherwise.
    """
    old_set, new_set = set(old), set(new)
    if len(old_set) != len(old) or len(new_set) != len(new):
        return None
    if [x for x in old if x in new_set] != [x for x in new if x in old_set]:
        return None
    blocks: list[tuple[int, int, int, int]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if i < len(old) and j < len(new) and old[i] == new[j]:
            i, j = i + 1, j + 1
            continue
        i1, j1 = i, j
        while i < len(old) and old[i] not in new_set:
            i += 1
        while j < len(new) and new[j] not in old_set:
            j += 1
        blocks.append((i1, i, j1, j))
    return blocks


def _rules_by_chain(rules: ServiceRules) -> dict[str, str]:
    """A service port's own chains, each with its rules (in order; "" for an empty chain)."""
    groups: dict[str, list[str]] = {c: [] for c in rules.chains}
    for line in rules.rules.splitlines(keepends=True):
        groups.setdefault(line.split(" ", 2)[1], []).append(line)  # "-A CHAIN ..."
    return {chain: "".join(lines) for chain, lines in groups.items()}


def _jump_lines(table: str, options: IptablesOptions) -> Iterable[str]:
    # Prepending each rule in turn leaves them in reverse order in the built-in chain;
    # appending in reverse order gives the same chain contents in a fresh table.
    for jump in reversed(jump_rules(options)):
        if jump.table == table:
            yield f"-A {jump.source} {jump.args()}\n"


def _top_level(
    options: IptablesOptions,
    services: Mapping[ServicePortName, ServiceRules],
    order: Sequence[ServicePortName],
    which: Iterable[tuple[str, str, str]],
    into: dict[tuple[str, str], str],
) -> None:
    for table, chain, field_name in which:
        idx = _FIELD_INDEX[field_name]
        text = "".join([services[n][idx] for n in order])  # type: ignore[misc]
        if (table, chain) == ("nat", KUBE_SERVICES):
            text += _nodeports_jumps(options)
        into[(table, chain)] = text


def compile_iptables(
    state: ProxyState,
    options: IptablesOptions,
    *,
    previous: IptablesRuleset | None = None,
    changed_services: Collection[NamespacedName] | None = None,
) -> IptablesRuleset:
    """Compile ``state`` into an :class:`IptablesRuleset`.

    With ``previous`` (the ruleset compiled from the previous state with the same options)
    and ``changed_services`` (every Service whose ports or endpoints changed since), only
    those Services are recompiled and the rest is reused; the result is identical to a
    from-scratch compile, and :meth:`IptablesRuleset.render_partial` writes the difference.
    When the cluster crosses the large-cluster threshold (which changes every endpoint
    chain) every Service is recompiled, and the result still knows what changed.
    """
    if options.family != state.family:
        raise ValueError(f"options are for {options.family}, state is {state.family}")
    large = state.total_endpoints > options.large_cluster_threshold
    incremental = (
        previous is not None and changed_services is not None and previous.options == options
    )
    if incremental and previous is not None and previous.large_cluster != large:
        changed_services = set(previous.port_index) | set(state.ports_by_service)
    if not incremental:
        with gc_paused():
            services = {
                name: compile_service_port(
                    port, state.categorize(port), options, large_cluster=large
                )
                for name, port in state.services.items()
            }
        order = sorted(services)
        top: dict[tuple[str, str], str] = {}
        _top_level(options, services, order, _DYNAMIC_CHAINS, top)
        top.update({("filter", c): t for c, t in _static_filter_rules(options).items()})
        top.update({("nat", c): t for c, t in _static_nat_rules(options).items()})
        return IptablesRuleset(
            options=options,
            services=services,
            order=order,
            large_cluster=large,
            top_level=top,
            port_index=dict(state.ports_by_service),
            service_rule_count=sum(r.rule_count for r in services.values()),
        )

    assert previous is not None and changed_services is not None
    services = dict(previous.services)
    replaced: dict[ServicePortName, ServiceRules] = {}
    order = previous.order
    changed: set[ServicePortName] = set()
    dirty_fields: set[str] = set()
    by_service = state.ports_by_service
    port_index = dict(previous.port_index)
    rule_count = previous.service_rule_count
    order_copied = False
    for svc in changed_services:
        new_names = by_service.get(svc, ())
        old_names = port_index.pop(svc, ())
        if new_names:
            port_index[svc] = new_names
        for name in old_names:
            if name not in new_names:
                old = services.pop(name)
                rule_count -= old.rule_count
                changed.add(name)
                replaced[name] = old
                dirty_fields.update(f for _, _, f in _DYNAMIC_CHAINS if old[_FIELD_INDEX[f]])
                if not order_copied:
                    order, order_copied = list(order), True
                del order[bisect.bisect_left(order, name)]
        for name in new_names:
            port = state.services[name]
            rules = compile_service_port(port, state.categorize(port), options, large_cluster=large)
            old_rules = services.get(name)
            if old_rules is None:
                if not order_copied:
                    order, order_copied = list(order), True
                bisect.insort(order, name)
                dirty_fields.update(f for _, _, f in _DYNAMIC_CHAINS if rules[_FIELD_INDEX[f]])
            elif same_rules(old_rules, rules):
                services[name] = rules  # same rules; keep the fresh endpoint categorisation
                continue
            else:
                dirty_fields.update(
                    f
                    for _, _, f in _DYNAMIC_CHAINS
                    if old_rules[_FIELD_INDEX[f]] != rules[_FIELD_INDEX[f]]
                )
            rule_count += rules.rule_count - (old_rules.rule_count if old_rules else 0)
            services[name] = rules
            changed.add(name)
            if old_rules is not None:
                replaced[name] = old_rules
    top = dict(previous.top_level)
    which = [entry for entry in _DYNAMIC_CHAINS if entry[2] in dirty_fields]
    _top_level(options, services, order, which, top)
    replaced_top = {(t, c): previous.top_level.get((t, c), "") for t, c, _ in which}
    return IptablesRuleset(
        options=options,
        services=services,
        order=order,
        large_cluster=large,
        top_level=top,
        port_index=port_index,
        service_rule_count=rule_count,
        replaced=replaced,
        changed=frozenset(changed),
        dirty_top_level=frozenset((t, c) for t, c, _ in which),
        replaced_top_level=replaced_top,
    )
