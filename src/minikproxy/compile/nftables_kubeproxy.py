"""kube-proxy's own nftables layout: ``ProxyState`` -> an ``nft -f`` script for one family.

This compiles exactly the ``kube-proxy`` table kube-proxy's nftables mode installs (its
chain, set, map and comment names, its hashed per-service chain names, its rules), so users
can compare with a real kube-proxy and the mode benchmark can compare the two layouts. It is
checked rule for rule against kube-proxy's ``TestOverallNFTablesRules`` (see
tests/unit/test_nftables_kubeproxy_golden.py for the version and the documented differences).

Pure: no I/O, no clock. Every service port compiles to a :class:`ServiceNft` fragment (its own
chains and affinity sets, and its elements in the shared maps and sets), so an applier can send
per-service updates the way kube-proxy's partial syncs do.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from minikproxy.compile.cidr import cidr_contains
from minikproxy.compile.names import hash8
from minikproxy.compile.nftables_options import NftablesOptions
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPV4, NamespacedName, ServicePortName
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints

TABLE = "kube-proxy"

# kube-proxy's names (pkg/proxy/nftables/proxier.go).
SERVICES_CHAIN = "services"
SERVICE_IPS_MAP = "service-ips"
SERVICE_NODEPORTS_MAP = "service-nodeports"
NODEPORT_IPS_SET = "nodeport-ips"
CLUSTER_IPS_SET = "cluster-ips"
SERVICE_ENDPOINTS_CHECK_CHAIN = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK_CHAIN = "nodeport-endpoints-check"
NO_ENDPOINT_SERVICES_MAP = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS_MAP = "no-endpoint-nodeports"
REJECT_CHAIN = "reject-chain"
CLUSTER_IPS_CHECK_CHAIN = "cluster-ips-check"
FIREWALL_IPS_MAP = "firewall-ips"
FIREWALL_CHECK_CHAIN = "firewall-check"
MARK_MASQ_CHAIN = "mark-for-masquerade"
MASQUERADING_CHAIN = "masquerading"

# The shared maps and sets whose elements belong to services, in render order.
SHARED_CONTAINERS = (
    CLUSTER_IPS_SET,
    SERVICE_IPS_MAP,
    SERVICE_NODEPORTS_MAP,
    FIREWALL_IPS_MAP,
    NO_ENDPOINT_SERVICES_MAP,
    NO_ENDPOINT_NODEPORTS_MAP,
)

# kube-proxy's base chains (name, type, hook, priority) as its test's fake prints them:
# numeric priorities, which nft 1.0.6 also accepts on every hook (it refuses the symbolic
# "dstnat" on the output hook).
BASE_CHAINS = (
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-forward", "filter", "forward", 0),
    ("filter-input", "filter", "input", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
    ("nat-prerouting", "nat", "prerouting", -100),
)

# (destination, source, extra match) of the jumps from the base chains, in kube-proxy's order.
JUMP_CHAINS = (
    (NODEPORT_ENDPOINTS_CHECK_CHAIN, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-input", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-forward", "ct state new"),
    (SERVICE_ENDPOINTS_CHECK_CHAIN, "filter-output", "ct state new"),
    (FIREWALL_CHECK_CHAIN, "filter-prerouting-pre-dnat", "ct state new"),
    (FIREWALL_CHECK_CHAIN, "filter-output-pre-dnat", "ct state new"),
    (SERVICES_CHAIN, "nat-output", ""),
    (SERVICES_CHAIN, "nat-prerouting", ""),
    (MASQUERADING_CHAIN, "nat-postrouting", ""),
    (CLUSTER_IPS_CHECK_CHAIN, "filter-forward", "ct state new"),
    (CLUSTER_IPS_CHECK_CHAIN, "filter-output", "ct state new"),
)

REGULAR_CHAINS = (
    CLUSTER_IPS_CHECK_CHAIN,
    FIREWALL_CHECK_CHAIN,
    MARK_MASQ_CHAIN,
    MASQUERADING_CHAIN,
    NODEPORT_ENDPOINTS_CHECK_CHAIN,
    SERVICES_CHAIN,
    SERVICE_ENDPOINTS_CHECK_CHAIN,
)

# knftables.NameLengthMax (256) minus the longest prefix kube-proxy allows (16).
CHAIN_NAME_BASE_LENGTH_MAX = 256 - 16


@lru_cache(maxsize=65536)
def hash_and_truncate(name: str) -> str:
    """kube-proxy's ``hashAndTruncate``: ``HASH8-name``, cut to 240 characters with ``...``.

    HASH8 is the first 8 characters of base32(SHA-256(name)), standard alphabet.
    """
    result = hash8(name) + "-" + name
    if len(result) > CHAIN_NAME_BASE_LENGTH_MAX:
        result = result[: CHAIN_NAME_BASE_LENGTH_MAX - 3] + "..."
    return result


def service_chain_base(name: ServicePortName) -> str:
    """kube-proxy's ``servicePortChainNameBase``, e.g. ``ULMVA6XW-ns1/svc1/tcp/p80``."""
    return hash_and_truncate(f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}")


def endpoint_chain_base(name: ServicePortName, endpoint: Endpoint) -> str:
    """kube-proxy's ``servicePortEndpointChainNameBase``: ``HASH8-ns/svc/proto/port__ip/port``.

    IPv6 colons become dots (colons are not allowed in chain names).
    """
    ip = endpoint.ip.replace(":", ".")
    return hash_and_truncate(
        f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}__{ip}/{endpoint.port}"
    )


@dataclass(frozen=True, slots=True)
class ServiceNft:
    """What one service port contributes to the ``kube-proxy`` table.

    - ``chains``: its own chains (``service-``, ``local-``, ``external-``, ``firewall-``,
      ``endpoint-``) with their rule bodies, in kube-proxy's rule order;
    - ``sets``: its affinity set declarations (whole ``add set`` lines);
    - ``elements``: (shared map or set, element body) pairs, e.g.
      ``("service-ips", "172.30.0.41 . tcp . 80 : goto service-…")``.
    """

    name: ServicePortName
    chains: tuple[tuple[str, tuple[str, ...]], ...]
    sets: tuple[str, ...]
    elements: tuple[tuple[str, str], ...]
    #: The endpoint categorisation the rules were compiled from (not part of equality).
    categorized: CategorizedEndpoints = field(compare=False)


@dataclass(frozen=True)
class KubeProxyNftRuleset:
    """A compiled ``kube-proxy`` table for one family: base objects plus one fragment per port."""

    options: NftablesOptions
    services: dict[ServicePortName, ServiceNft] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The nftables family, ``ip`` or ``ip6``."""
        return self.options.nft_family

    @property
    def nft_table(self) -> tuple[str, str]:
        """``(family, table)`` of the table this ruleset owns: ``("ip", "kube-proxy")``."""
        return self.family, TABLE

    def incremental_script(
        self, previous: KubeProxyNftRuleset, changed: Iterable[ServicePortName]
    ) -> str | None:
        """:meth:`render_update` from ``previous`` (which finds the changed ports itself, so
        ``changed`` is ignored); None when the node options differ and the table must be
        replaced whole."""
        del changed
        if previous.options != self.options:
            return None
        return self.render_update(previous)

    def _prefix(self, kind: str) -> str:
        return f"add {kind} {self.family} {TABLE} "

    def base_lines(self) -> list[str]:
        """The table, its shared sets and maps, base and top-level chains and their rules."""
        opts = self.options
        ipx = self.family
        addr = "ipv4_addr" if opts.family == IPV4 else "ipv6_addr"
        no_localhost = "ip daddr != 127.0.0.0/8" if opts.family == IPV4 else "ip6 daddr != ::1"
        mark = opts.masquerade_mark
        table = f'add table {ipx} {TABLE} {{ comment "rules for kube-proxy" ; }}'
        s, m, c, r = (self._prefix(k) for k in ("set", "map", "chain", "rule"))
        vip = f"{addr} . inet_proto . inet_service : verdict"
        lines = [
            table,
            f'{s}{CLUSTER_IPS_SET} {{ type {addr} ; comment "Active ClusterIPs" ; }}',
        ]
        match_all = opts.nodeport_addresses is None
        if not match_all:
            lines.append(
                f"{s}{NODEPORT_IPS_SET} {{ type {addr} ; "
                'comment "IPs that accept NodePort traffic" ; }'
            )
        lines += [
            f"{m}{FIREWALL_IPS_MAP} {{ type {vip} ; "
            'comment "destinations that are subject to LoadBalancerSourceRanges" ; }',
            f"{m}{NO_ENDPOINT_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict ; "
            'comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }',
            f"{m}{NO_ENDPOINT_SERVICES_MAP} {{ type {vip} ; "
            'comment "vmap to drop or reject packets to services with no endpoints" ; }',
            f"{m}{SERVICE_IPS_MAP} {{ type {vip} ; "
            'comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }',
            f"{m}{SERVICE_NODEPORTS_MAP} {{ type inet_proto . inet_service : verdict ; "
            'comment "NodePort traffic" ; }',
        ]
        for name, ctype, hook, prio in BASE_CHAINS:
            lines.append(f"{c}{name} {{ type {ctype} hook {hook} priority {prio} ; }}")
        lines += [f"{c}{name}" for name in REGULAR_CHAINS]
        lines.append(
            f"{c}{REJECT_CHAIN} "
            '{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }'
        )
        for dst, src, extra in JUMP_CHAINS:
            lines.append(f"{r}{src} {extra + ' ' if extra else ''}jump {dst}")
        lines += [
            f"{r}{MARK_MASQ_CHAIN} mark set mark or {mark}",
            f"{r}{MASQUERADING_CHAIN} mark and {mark} == 0 return",
            f"{r}{MASQUERADING_CHAIN} mark set mark xor {mark}",
            f"{r}{MASQUERADING_CHAIN} masquerade fully-random",
            f"{r}{CLUSTER_IPS_CHECK_CHAIN} {ipx} daddr @{CLUSTER_IPS_SET} reject "
            'comment "Reject traffic to invalid ports of ClusterIPs"',
        ]
        if opts.service_cidrs:
            lines.append(
                f"{r}{CLUSTER_IPS_CHECK_CHAIN} {ipx} daddr {{ {','.join(opts.service_cidrs)} }} "
                'drop comment "Drop traffic to unallocated ClusterIPs"'
            )
        lines.append(f"{r}{REJECT_CHAIN} reject")
        lines.append(
            f"{r}{SERVICE_ENDPOINTS_CHECK_CHAIN} {ipx} daddr . meta l4proto . th dport "
            f"vmap @{NO_ENDPOINT_SERVICES_MAP}"
        )
        nodeport_match = no_localhost if match_all else f"{ipx} daddr @{NODEPORT_IPS_SET}"
        lines.append(
            f"{r}{NODEPORT_ENDPOINTS_CHECK_CHAIN} {nodeport_match} meta l4proto . th dport "
            f"vmap @{NO_ENDPOINT_NODEPORTS_MAP}"
        )
        lines.append(
            f"{r}{FIREWALL_CHECK_CHAIN} {ipx} daddr . meta l4proto . th dport "
            f"vmap @{FIREWALL_IPS_MAP}"
        )
        lines.append(
            f"{r}{SERVICES_CHAIN} {ipx} daddr . meta l4proto . th dport vmap @{SERVICE_IPS_MAP}"
        )
        services_nodeport = (
            f"fib daddr type local {no_localhost}"
            if match_all
            else f"{ipx} daddr @{NODEPORT_IPS_SET}"
        )
        lines.append(
            f"{r}{SERVICES_CHAIN} {services_nodeport} meta l4proto . th dport "
            f"vmap @{SERVICE_NODEPORTS_MAP}"
        )
        if not match_all:
            for ip in opts.nodeport_addresses or ():
                if not ipaddress.ip_address(ip).is_loopback:
                    lines.append(f"add element {ipx} {TABLE} {NODEPORT_IPS_SET} {{ {ip} }}")
        return lines

    def _fragment_lines(self, frags: Iterable[ServiceNft]) -> list[str]:
        frags = list(frags)
        c, r = self._prefix("chain"), self._prefix("rule")
        lines: list[str] = []
        for frag in frags:
            lines += frag.sets
        # Every chain before any rule: a goto needs its target to exist already.
        for frag in frags:
            lines += [c + chain for chain, _ in frag.chains]
        for frag in frags:
            for chain, rules in frag.chains:
                lines += [f"{r}{chain} {rule}" for rule in rules]
        seen: set[tuple[str, str]] = set()
        for frag in frags:
            for container, element in frag.elements:
                if (container, element) not in seen:
                    seen.add((container, element))
                    lines.append(f"add element {self.family} {TABLE} {container} {{ {element} }}")
        return lines

    def lines(self) -> list[str]:
        """Every object of the table as kube-proxy's ``add …`` lines (no replacement preamble)."""
        return self.base_lines() + self._fragment_lines(
            self.services[name] for name in sorted(self.services)
        )

    def render(self) -> str:
        """A complete ``nft -f`` script: installs the table, or replaces it in one transaction.

        The ``add table`` + ``delete table`` preamble makes the load atomic whether or not the
        table exists: nft runs the whole file as one transaction.
        """
        preamble = [
            f"add table {self.family} {TABLE}",
            f"delete table {self.family} {TABLE}",
        ]
        return "\n".join(preamble + self.lines()) + "\n"

    def render_service(self, name: NamespacedName | str) -> str:
        """The objects of one Service (all its ports), for reading (``--service``)."""
        return self.render_services({name})

    def render_services(self, names: Collection[NamespacedName | str]) -> str:
        """The objects of the given Services, for reading."""
        wanted = {str(n) for n in names}
        frags = [
            self.services[key]
            for key in sorted(self.services)
            if f"{key.namespace}/{key.name}" in wanted
        ]
        text = "\n".join(self._fragment_lines(frags))
        return text + "\n" if text else ""

    def elements(self) -> dict[tuple[str, str], str]:
        """Every service element: (map or set, key) -> element body."""
        out: dict[tuple[str, str], str] = {}
        for name in sorted(self.services):
            for container, body in self.services[name].elements:
                out[(container, _element_key(body))] = body
        return out

    def render_update(self, previous: KubeProxyNftRuleset) -> str:
        """An ``nft -f`` script turning the table ``previous`` installed into this one.

        Like kube-proxy's partial sync: only the chains of changed service ports are
        re-created (``add`` + ``flush`` + rules), element changes are sent as element deletes
        and adds, stale chains are flushed and deleted and stale affinity sets deleted, all in
        one transaction. (kube-proxy delays deleting chains because kernels before 6.2 may
        still see them referenced; this script deletes them at once, so it needs kernel 6.2+.)
        If the node options changed, this is the full :meth:`render`.
        """
        if previous.options != self.options:
            return self.render()
        fam, c, r = self.family, self._prefix("chain"), self._prefix("rule")
        changed = [
            frag
            for name, frag in sorted(self.services.items())
            if previous.services.get(name) != frag
        ]
        old_chains = previous.chain_names()
        new_chains = self.chain_names()
        old_sets = {_set_name(line) for f in previous.services.values() for line in f.sets}
        new_sets = {_set_name(line) for f in self.services.values() for line in f.sets}
        old_elements, new_elements = previous.elements(), self.elements()
        lines: list[str] = []
        for frag in changed:
            lines += frag.sets
        for frag in changed:
            for chain, _ in frag.chains:
                lines += [c + chain, f"flush chain {fam} {TABLE} {chain}"]
        for frag in changed:
            for chain, rules in frag.chains:
                lines += [f"{r}{chain} {rule}" for rule in rules]
        for (container, key), body in old_elements.items():
            if new_elements.get((container, key)) != body:
                lines.append(f"delete element {fam} {TABLE} {container} {{ {key} }}")
        for (container, key), body in new_elements.items():
            if old_elements.get((container, key)) != body:
                lines.append(f"add element {fam} {TABLE} {container} {{ {body} }}")
        stale = sorted(old_chains - new_chains)
        lines += [f"flush chain {fam} {TABLE} {chain}" for chain in stale]
        lines += [f"delete chain {fam} {TABLE} {chain}" for chain in stale]
        lines += [f"delete set {fam} {TABLE} {name}" for name in sorted(old_sets - new_sets)]
        return "\n".join(lines) + "\n" if lines else ""

    @property
    def affinity_maps(self) -> tuple[str, ...]:
        """The per-endpoint affinity sets the packet path fills (``update @affinity-*``)."""
        return tuple(
            sorted({_set_name(line) for frag in self.services.values() for line in frag.sets})
        )

    def affinity_restore(
        self, elements: Mapping[str, Sequence[tuple[bytes, bytes | None, int | None, int | None]]]
    ) -> str:
        """``add element`` commands re-creating, with the time they have left, the entries
        among ``elements`` (each affinity set's elements as the kernel reports them: ``(key,
        data, timeout_ms, expires_ms)``, read from the table this ruleset replaces) of the
        affinity sets this ruleset still has: appended to :meth:`render`, a full replace keeps
        what clients learned, as kube-proxy's full syncs (which never delete its table) do."""
        af = socket.AF_INET if self.options.family == IPV4 else socket.AF_INET6
        lines: list[str] = []
        for name in self.affinity_maps:
            restored = []
            for key, _data, timeout_ms, expires_ms in elements.get(name, ()):
                if not expires_ms:
                    continue
                timeout = f" timeout {timeout_ms}ms" if timeout_ms else ""
                restored.append(f"{socket.inet_ntop(af, key)}{timeout} expires {expires_ms}ms")
            if restored:
                lines.append(
                    f"add element {self.family} {TABLE} {name} {{ {', '.join(restored)} }}"
                )
        return "".join(f"{line}\n" for line in lines)

    def chain_names(self) -> set[str]:
        """The names of all per-service chains (kube-proxy's: they contain a ``/``)."""
        return {chain for frag in self.services.values() for chain, _ in frag.chains}


def compile_nftables_kubeproxy(state: ProxyState, options: NftablesOptions) -> KubeProxyNftRuleset:
    """Compile ``state`` into kube-proxy's ``kube-proxy`` table for ``options.family``."""
    frags = {
        name: _compile_port(state, port, options) for name, port in sorted(state.services.items())
    }
    return KubeProxyNftRuleset(options, frags)


def _local_match(options: NftablesOptions, negate: bool) -> str:
    """kube-proxy's ``IfLocalNFT``/``IfNotLocalNFT``."""
    local = options.local
    if local is None:
        return ""
    op = "!= " if negate else ""
    if local.kind == "saddr":
        return f"{options.nft_family} saddr {op}{local.value}"
    return f'iifname {op}"{local.value}"'


def _compile_port(state: ProxyState, port: ServicePort, opts: NftablesOptions) -> ServiceNft:
    name = port.name
    ipx = opts.nft_family
    proto = port.protocol.lower()
    base = service_chain_base(name)
    cluster_chain, local_chain = "service-" + base, "local-" + base
    external_chain, fw_chain = "external-" + base, "firewall-" + base
    cat = state.categorize(port)
    has_endpoints = cat.has_any
    affinity = port.session_affinity_client_ip
    ep_base = {ep.address: endpoint_chain_base(name, ep) for ep in cat.reachable}

    uses_cluster = bool(cat.cluster) and port.uses_cluster_endpoints
    uses_local = bool(cat.local) and port.uses_local_endpoints
    internal_chain = cluster_chain
    has_internal = has_endpoints
    if port.internal_policy_local:
        internal_chain = local_chain
        has_internal = has_internal and bool(cat.local)
    external_policy_chain = cluster_chain
    has_external = has_endpoints
    if port.external_policy_local:
        external_policy_chain = local_chain
        has_external = has_external and bool(cat.local)
    uses_external = has_endpoints and port.externally_accessible

    if not has_endpoints:
        internal_verdict = external_verdict = f"goto {REJECT_CHAIN}"
    else:
        internal_verdict = "" if has_internal else "drop"
        external_verdict = "" if has_external else "drop"

    comment = f'comment "{_port_name_string(name)}"'
    elements: list[tuple[str, str]] = [(CLUSTER_IPS_SET, port.cluster_ip)]
    vip = f"{port.cluster_ip} . {proto} . {port.port}"
    if has_internal:
        elements.append((SERVICE_IPS_MAP, f"{vip} : goto {internal_chain}"))
    else:
        elements.append((NO_ENDPOINT_SERVICES_MAP, f"{vip} {comment} : {internal_verdict}"))
    for ip in port.external_ips:
        key = f"{ip} . {proto} . {port.port}"
        if has_endpoints:
            elements.append((SERVICE_IPS_MAP, f"{key} : goto {external_chain}"))
        if not has_external:
            elements.append((NO_ENDPOINT_SERVICES_MAP, f"{key} {comment} : {external_verdict}"))
    uses_fw = bool(port.load_balancer_vips) and bool(port.load_balancer_source_ranges)
    for ip in port.load_balancer_vips:
        key = f"{ip} . {proto} . {port.port}"
        if has_endpoints:
            elements.append((SERVICE_IPS_MAP, f"{key} : goto {external_chain}"))
        if uses_fw:
            elements.append((FIREWALL_IPS_MAP, f"{key} : goto {fw_chain}"))
    if not has_external:
        for ip in port.load_balancer_vips:
            key = f"{ip} . {proto} . {port.port}"
            elements.append((NO_ENDPOINT_SERVICES_MAP, f"{key} {comment} : {external_verdict}"))
    if port.node_port:
        key = f"{proto} . {port.node_port}"
        if has_endpoints:
            elements.append((SERVICE_NODEPORTS_MAP, f"{key} : goto {external_chain}"))
        if not has_external:
            elements.append((NO_ENDPOINT_NODEPORTS_MAP, f"{key} {comment} : {external_verdict}"))

    chains: dict[str, list[str]] = {}
    # Chain creation order follows kube-proxy's ensureChain calls: endpoints first.
    for ep in cat.reachable:
        chains["endpoint-" + ep_base[ep.address]] = []
    if uses_cluster:
        chains[cluster_chain] = []
    if uses_local:
        chains[local_chain] = []
    if uses_external:
        chains[external_chain] = []
    if uses_fw:
        chains[fw_chain] = []

    if has_internal:
        if opts.masquerade_all:
            chains[internal_chain].append(f"{ipx} daddr {port.cluster_ip} jump {MARK_MASQ_CHAIN}")
        elif opts.local is not None:
            chains[internal_chain].append(
                f"{ipx} daddr {port.cluster_ip} {_local_match(opts, True)} jump {MARK_MASQ_CHAIN}"
            )
    if uses_external:
        ext = chains[external_chain]
        if not port.external_policy_local:
            ext.append(f"jump {MARK_MASQ_CHAIN}")
        else:
            if opts.local is not None:
                ext.append(
                    f"{_local_match(opts, False)} goto {cluster_chain} "
                    'comment "short-circuit pod traffic"'
                )
            ext.append(
                f'fib saddr type local jump {MARK_MASQ_CHAIN} comment "masquerade local traffic"'
            )
            ext.append(
                f'fib saddr type local goto {cluster_chain} comment "short-circuit local traffic"'
            )
        if has_external:
            ext.append(f"goto {external_policy_chain}")
    if uses_fw:
        sources = list(port.load_balancer_source_ranges)
        if opts.node_ip and any(cidr_contains(cidr, opts.node_ip) for cidr in sources):
            sources += list(port.load_balancer_vips)
        chains[fw_chain].append(f"{ipx} saddr != {{ {' , '.join(sources)} }} drop")

    sets: list[str] = []
    if affinity:
        addr = "ipv4_addr" if opts.family == IPV4 else "ipv6_addr"
        for ep in cat.reachable:
            sets.append(
                f"add set {ipx} {TABLE} affinity-{ep_base[ep.address]} "
                f"{{ type {addr} ; flags dynamic,timeout ; "
                f"timeout {port.sticky_max_age_seconds}s ; }}"
            )
    if uses_cluster:
        chains[cluster_chain] += _dispatch_rules(ipx, cat.cluster, ep_base, affinity)
    if uses_local:
        chains[local_chain] += _dispatch_rules(ipx, cat.local, ep_base, affinity)
    for ep in cat.reachable:
        rules = chains["endpoint-" + ep_base[ep.address]]
        rules.append(f"{ipx} saddr {ep.ip} jump {MARK_MASQ_CHAIN}")
        if affinity:
            rules.append(f"update @affinity-{ep_base[ep.address]} {{ {ipx} saddr }}")
        rules.append(f"meta l4proto {proto} dnat to {ep.address}")

    return ServiceNft(
        name,
        tuple((chain, tuple(rules)) for chain, rules in chains.items()),
        tuple(sets),
        tuple(elements),
        cat,
    )


def _dispatch_rules(
    ipx: str, endpoints: Iterable[Endpoint], ep_base: dict[str, str], affinity: bool
) -> list[str]:
    """kube-proxy's ``writeServiceToEndpointRules``: affinity gotos, then the numgen vmap."""
    eps = list(endpoints)
    rules = []
    if affinity:
        for ep in eps:
            b = ep_base[ep.address]
            rules.append(f"{ipx} saddr @affinity-{b} goto endpoint-{b}")
    vmap = " , ".join(f"{i} : goto endpoint-{ep_base[ep.address]}" for i, ep in enumerate(eps))
    rules.append(f"numgen random mod {len(eps)} vmap {{ {vmap} }}")
    return rules


def _port_name_string(name: ServicePortName) -> str:
    """kube-proxy's ``ServicePortName.String()``: ``ns/svc:port`` (``ns/svc`` if unnamed)."""
    return (
        f"{name.namespace}/{name.name}:{name.port}"
        if name.port
        else f"{name.namespace}/{name.name}"
    )


def _element_key(body: str) -> str:
    """The key of an element body: before `` : `` (maps) without its comment."""
    key = body.split(" : ", 1)[0]
    return key.split(' comment "', 1)[0]


def _set_name(line: str) -> str:
    """The set name of an ``add set <family> kube-proxy <name> { … }`` line."""
    return line.split(" ", 5)[4]
