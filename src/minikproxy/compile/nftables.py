"""The nftables compiler, flat layout: ``ProxyState`` -> one ``nft -f`` script per family.

Pure: no I/O. The table (``ip minikproxy`` / ``ip6 minikproxy``) has a fixed skeleton of
chains, sets and maps; every service port contributes only *elements* of those sets and maps,
keyed by its frontend tuple ``address . protocol . port``. Endpoint selection goes through
shared count-class chains (``pick-<n>``: one per distinct endpoint count, shared by every
frontend with n endpoints), which DNAT to ``daddr . dport . numgen random mod n`` looked up in
a per-protocol endpoint map: the kernel scales a 32-bit random value to ``[0, n)``, so each
endpoint gets exactly 1/n of new connections. Adding, removing or (un)readying an endpoint
changes elements only; a new endpoint count also needs its (constant-size) ``pick-<n>``
chain, which is part of the skeleton.

The per-protocol endpoint maps (``typeof ... : ip daddr . tcp dport``) avoid nft 1.0.6's
``th dport``-in-map-data bug (rules added in later transactions fail); see
``/work/shared/nftables-notes.md``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

from minikproxy.compile.cidr import cidr_contains
from minikproxy.compile.nftables_options import NftablesOptions
from minikproxy.gcutil import gc_paused
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPV4, NamespacedName, ServicePortName
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints

TABLE = "minikproxy"
PROTOCOLS = ("tcp", "udp", "sctp")
ELEMENTS_PER_COMMAND = 1000

# Set and map names (the order is the order of declaration and of element output).
CLUSTER_IPS = "cluster-ips"
CLUSTER_VIPS = "cluster-vips"
EXTERNAL_MASQ = "external-masq"
SERVICE_DISPATCH = "service-dispatch"
CLUSTER_DISPATCH = "cluster-dispatch"
LOCAL_DISPATCH = "local-dispatch"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
FIREWALL_IPS = "firewall-ips"
FIREWALL_ALLOW = "firewall-allow"
AFFINITY_SERVICES = "affinity-services"
AFFINITY_TIMEOUTS = "affinity-timeouts"
HAIRPIN = "hairpin"


def cluster_endpoints_map(proto: str) -> str:
    """The map of all (cluster-policy) endpoints of ``proto`` frontends."""
    return f"cluster-endpoints-{proto}"


def local_endpoints_map(proto: str) -> str:
    """The map of this node's endpoints of ``proto`` frontends with externalTrafficPolicy Local."""
    return f"local-endpoints-{proto}"


def affinity_map(proto: str) -> str:
    """The dynamic map recording ClientIP affinity of ``proto`` frontends."""
    return f"affinity-{proto}"


# Element-bearing sets and maps, in output order.
ELEMENT_SETS: tuple[str, ...] = (
    CLUSTER_IPS,
    CLUSTER_VIPS,
    EXTERNAL_MASQ,
    SERVICE_DISPATCH,
    CLUSTER_DISPATCH,
    LOCAL_DISPATCH,
    NO_ENDPOINT_SERVICES,
    FIREWALL_IPS,
    FIREWALL_ALLOW,
    AFFINITY_SERVICES,
    AFFINITY_TIMEOUTS,
    HAIRPIN,
    *(cluster_endpoints_map(p) for p in PROTOCOLS),
    *(local_endpoints_map(p) for p in PROTOCOLS),
)

# Sets whose elements two service ports may share (same cluster IP, same endpoint IP): the
# script deduplicates them, an incremental applier must reference-count them.
SHARED_SETS: frozenset[str] = frozenset({CLUSTER_IPS, HAIRPIN})


class ServiceElements(NamedTuple):
    """What one service port contributes: elements, and the shared chains those refer to.

    ``elements`` are ``(set or map name, element text)`` pairs in a fixed order;
    ``pick_counts``/``local_pick_counts`` the endpoint counts whose ``pick-<n>`` /
    ``local-pick-<n>`` chains the dispatch elements jump to; ``affinity_timeouts`` the
    ClientIP timeouts whose ``affinity-<seconds>`` chains they use.
    """

    name: ServicePortName
    elements: tuple[tuple[str, str], ...]
    pick_counts: frozenset[int]
    local_pick_counts: frozenset[int]
    affinity_timeouts: frozenset[int]
    categorized: CategorizedEndpoints


@lru_cache(maxsize=65536)
def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def compile_service_port(
    port: ServicePort, categorized: CategorizedEndpoints, options: NftablesOptions
) -> ServiceElements:
    """The elements one service port contributes to the flat table (kube-proxy semantics)."""
    proto = port.protocol.lower()
    sport = port.port
    cluster_eps, local_eps = categorized.cluster, categorized.local
    has_endpoints = categorized.has_any
    out: list[tuple[str, str]] = []
    picks: set[int] = set()
    local_picks: set[int] = set()
    cmap = "cluster-endpoints-" + proto
    lmap = "local-endpoints-" + proto
    # IPv6: nft 1.0.6 cannot compile an ``update`` whose key and data exceed its register
    # window (address . address . port : address . port aborts nft), so no affinity there.
    affinity = port.session_affinity_client_ip and has_endpoints and options.family == IPV4
    timeout = port.sticky_max_age_seconds
    dispatching: list[str] = []

    def endpoint_elements(mapname: str, key: str, eps: Sequence[Endpoint]) -> None:
        prefix = f"{key} . "
        for i, ep in enumerate(eps):
            out.append((mapname, f"{prefix}{i} : {ep.ip} . {ep.port}"))

    # --- the cluster IP -------------------------------------------------------------------
    cip = port.cluster_ip
    out.append((CLUSTER_IPS, cip))
    key = f"{cip} . {proto} . {sport}"
    internal_eps = local_eps if port.internal_policy_local else cluster_eps
    if not has_endpoints:
        out.append((NO_ENDPOINT_SERVICES, f"{key} : goto reject-chain"))
    elif not internal_eps:
        if port.internal_policy_local:
            out.append((NO_ENDPOINT_SERVICES, f"{key} : drop"))
    else:
        out.append((CLUSTER_VIPS, key))
        n = len(internal_eps)
        picks.add(n)
        out.append((SERVICE_DISPATCH, f"{key} : goto pick-{n}"))
        endpoint_elements(cmap, f"{cip} . {sport}", internal_eps)
        dispatching.append(key)

    # --- external frontends: external IPs, load-balancer IPs, NodePorts ------------------
    frontends: list[tuple[str, int, bool]] = [(ip, sport, False) for ip in port.external_ips]
    frontends.extend((ip, sport, True) for ip in port.load_balancer_vips)
    if port.node_port:
        addresses = options.nodeport_addresses
        if addresses is None:
            addresses = (options.node_ip,) if options.node_ip else ()
        frontends.extend((ip, port.node_port, False) for ip in addresses if not _is_loopback(ip))
    local_policy = port.external_policy_local
    firewall = bool(port.load_balancer_source_ranges) and has_endpoints
    node_ip = options.node_ip
    allow_node = firewall and any(
        cidr_contains(c, node_ip) for c in port.load_balancer_source_ranges if node_ip
    )
    for ip, fport, is_lb in frontends:
        key = f"{ip} . {proto} . {fport}"
        if is_lb and firewall:
            out.append((FIREWALL_IPS, key))
            for cidr in port.load_balancer_source_ranges:
                out.append((FIREWALL_ALLOW, f"{key} . {cidr}"))
            if allow_node:
                out.append((FIREWALL_ALLOW, f"{key} . {ip}"))
        if not has_endpoints:
            out.append((NO_ENDPOINT_SERVICES, f"{key} : goto reject-chain"))
            continue
        if local_policy and not local_eps:
            out.append((NO_ENDPOINT_SERVICES, f"{key} : drop"))
            continue
        eps_key = f"{ip} . {fport}"
        if not local_policy:
            if not cluster_eps:
                continue
            n = len(cluster_eps)
            picks.add(n)
            out.append((EXTERNAL_MASQ, key))
            out.append((SERVICE_DISPATCH, f"{key} : goto pick-{n}"))
            endpoint_elements(cmap, eps_key, cluster_eps)
        else:
            out.append((SERVICE_DISPATCH, f"{key} : goto external-local"))
            if cluster_eps:
                n = len(cluster_eps)
                picks.add(n)
                out.append((CLUSTER_DISPATCH, f"{key} : goto pick-{n}"))
                endpoint_elements(cmap, eps_key, cluster_eps)
            m = len(local_eps)
            local_picks.add(m)
            out.append((LOCAL_DISPATCH, f"{key} : goto local-pick-{m}"))
            endpoint_elements(lmap, eps_key, local_eps)
        dispatching.append(key)

    if affinity:
        for key in dispatching:
            out.append((AFFINITY_SERVICES, key))
            out.append((AFFINITY_TIMEOUTS, f"{key} : goto affinity-{timeout}"))
    for ep in categorized.reachable:
        out.append((HAIRPIN, f"{ep.ip} . {ep.ip}"))
    return ServiceElements(
        port.name,
        tuple(out),
        frozenset(picks),
        frozenset(local_picks),
        frozenset((timeout,)) if affinity and dispatching else frozenset(),
        categorized,
    )


@dataclass(frozen=True, eq=False)
class NftablesRuleset:
    """A compiled flat-layout ruleset for one IP family.

    ``skeleton`` holds the ``add`` commands of the table, its chains (the count-class and
    affinity chains this ruleset needs included), sets, maps and rules; ``services`` the
    elements of every service port; ``notes`` what of the input it cannot express.
    :meth:`render` is the complete ``nft -f`` script; :meth:`update_script` the element-only
    transaction from a previous ruleset.
    """

    options: NftablesOptions
    skeleton: tuple[str, ...]
    services: dict[ServicePortName, ServiceElements]
    order: tuple[ServicePortName, ...]
    notes: tuple[str, ...] = ()
    #: Ports recompiled from the previous ruleset (None: compiled from scratch).
    changed: frozenset[ServicePortName] | None = None

    @property
    def family_prefix(self) -> str:
        """``ip minikproxy`` or ``ip6 minikproxy``: what every command names."""
        return f"{self.options.nft_family} {TABLE}"

    @property
    def nft_table(self) -> tuple[str, str]:
        """``(family, table)`` of the table this ruleset owns: ``("ip", "minikproxy")``."""
        return self.options.nft_family, TABLE

    def incremental_script(
        self, previous: NftablesRuleset, changed: Iterable[ServicePortName]
    ) -> str | None:
        """The dataplane's name for :meth:`update_script` (shared with the kube-proxy layout)."""
        return self.update_script(previous, changed)

    def elements_by_set(
        self, names: Iterable[ServicePortName] | None = None
    ) -> dict[str, list[str]]:
        """Every element of ``names`` (default: all ports), per set, deduplicated, in order."""
        buckets: dict[str, dict[str, None]] = {s: {} for s in ELEMENT_SETS}
        services = self.services
        for name in self.order if names is None else names:
            for setname, text in services[name].elements:
                buckets[setname][text] = None
        return {s: list(b) for s, b in buckets.items() if b}

    def element_commands(self, verb: str, elements: dict[str, list[str]]) -> list[str]:
        """``add``/``delete element`` commands for ``elements`` (per set), chunked."""
        prefix = self.family_prefix
        out: list[str] = []
        for setname, texts in elements.items():
            for start in range(0, len(texts), ELEMENTS_PER_COMMAND):
                chunk = ", ".join(texts[start : start + ELEMENTS_PER_COMMAND])
                out.append(f"{verb} element {prefix} {setname} {{ {chunk} }}\n")
        return out

    def render_parts(self) -> list[str]:
        """:meth:`render` as the fragments it joins."""
        prefix = self.family_prefix
        # add + delete + add: loads into a fresh namespace and atomically replaces a table
        # that already exists (one transaction).
        head = [f"add table {prefix}\n", f"delete table {prefix}\n", f"add table {prefix}\n"]
        return head + list(self.skeleton) + self.element_commands("add", self.elements_by_set())

    def render(self) -> str:
        """The complete ``nft -f`` script: replaces (or creates) the whole table at once."""
        return "".join(self.render_parts())

    @cached_property
    def skeleton_refs(self) -> Counter[tuple[str, int]]:
        """How many ports use each count-class and affinity chain of the skeleton."""
        refs: Counter[tuple[str, int]] = Counter()
        for svc in self.services.values():
            refs.update(_skeleton_refs(svc))
        return refs

    @cached_property
    def shared_refs(self) -> Counter[tuple[str, str]]:
        """How many ports hold each element of the :data:`SHARED_SETS`."""
        refs: Counter[tuple[str, str]] = Counter()
        for svc in self.services.values():
            refs.update(_shared_items(svc))
        return refs

    def update_script(
        self, previous: NftablesRuleset, changed: Iterable[ServicePortName]
    ) -> str | None:
        """The element-only transaction taking the kernel from ``previous`` to this ruleset,
        given every port whose elements may differ; None if the skeleton differs (a new count
        class or affinity timeout, other options): then :meth:`render` it whole.

        Deletions come first (a map key whose data changes is deleted, then added); a shared
        element is deleted only when no port holds it any more.
        """
        if previous.skeleton != self.skeleton:
            return None
        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        refs = self.shared_refs
        for name in sorted(set(changed)):
            old = previous.services.get(name)
            new = self.services.get(name)
            old_items = set(old.elements) if old else set()
            new_items = set(new.elements) if new else set()
            for item in old.elements if old else ():
                if item not in new_items and not (item[0] in SHARED_SETS and refs[item]):
                    # Maps are deleted by key.
                    deletes.setdefault(item[0], []).append(item[1].partition(" : ")[0])
            for item in new.elements if new else ():
                if item not in old_items:
                    adds.setdefault(item[0], []).append(item[1])
        out = self.element_commands("delete", _in_set_order(deletes))
        out += self.element_commands("add", _in_set_order(adds))
        return "".join(out)

    def render_services(self, services: Collection[NamespacedName]) -> str:
        """Only the elements of ``services``' ports, as ``add element`` commands (for reading)."""
        wanted = [n for n in self.order if n.service in services]
        return "".join(self.element_commands("add", self.elements_by_set(wanted)))

    def render_service(self, name: NamespacedName) -> str:
        """:meth:`render_services` for one Service."""
        return self.render_services({name})


def _shared_items(svc: ServiceElements) -> Iterator[tuple[str, str]]:
    return (item for item in svc.elements if item[0] in SHARED_SETS)


def _in_set_order(elements: dict[str, list[str]]) -> dict[str, list[str]]:
    return {s: list(dict.fromkeys(elements[s])) for s in ELEMENT_SETS if s in elements}


def _skeleton(
    options: NftablesOptions,
    picks: Collection[int],
    local_picks: Collection[int],
    timeouts: Collection[int],
) -> tuple[str, ...]:
    fam = options.nft_family
    prefix = f"{fam} {TABLE}"
    v4 = options.family == IPV4
    addr = "ipv4_addr" if v4 else "ipv6_addr"
    ipf = "ip" if v4 else "ip6"
    tuple_type = f"{addr} . inet_proto . inet_service"
    frontend = f"{ipf} daddr . meta l4proto . th dport"
    mark = options.masquerade_mark
    out: list[str] = []

    def chain(name: str, base: str = "") -> None:
        out.append(f"add chain {prefix} {name}{f' {{ {base} ; }}' if base else ''}\n")

    def rule(chain_name: str, text: str) -> None:
        out.append(f"add rule {prefix} {chain_name} {text}\n")

    # Sets and maps.
    out.append(f"add set {prefix} {CLUSTER_IPS} {{ type {addr} ; }}\n")
    for name in (CLUSTER_VIPS, EXTERNAL_MASQ, FIREWALL_IPS, AFFINITY_SERVICES):
        out.append(f"add set {prefix} {name} {{ type {tuple_type} ; }}\n")
    out.append(
        f"add set {prefix} {FIREWALL_ALLOW} {{ type {tuple_type} . {addr} ; flags interval ; }}\n"
    )
    out.append(f"add set {prefix} {HAIRPIN} {{ type {addr} . {addr} ; }}\n")
    for proto in PROTOCOLS:
        for name in (cluster_endpoints_map(proto), local_endpoints_map(proto)):
            out.append(
                f"add map {prefix} {name} {{ typeof {ipf} daddr . {proto} dport . numgen random "
                f"mod 16 : {ipf} daddr . {proto} dport ; }}\n"
            )
        if not v4:
            continue
        out.append(
            f"add map {prefix} {affinity_map(proto)} {{ typeof {ipf} saddr . {ipf} daddr . "
            f"{proto} dport : {ipf} daddr . {proto} dport ; flags dynamic,timeout ; "
            "timeout 3h ; size 1048576 ; }\n"
        )

    # Chains: base chains first, then regular ones (verdict maps refer to them).
    chain("filter-prerouting", "type filter hook prerouting priority -110")
    chain("filter-input", "type filter hook input priority -110")
    chain("filter-forward", "type filter hook forward priority -110")
    chain("filter-output", "type filter hook output priority -110")
    chain("filter-output-post-dnat", "type filter hook output priority -90")
    chain("nat-prerouting", "type nat hook prerouting priority -100")
    chain("nat-output", "type nat hook output priority -100")
    chain("nat-postrouting", "type nat hook postrouting priority 100")
    if v4:
        chain("affinity-record", "type filter hook postrouting priority 90")
    for name in (
        "firewall-check",
        "service-endpoints-check",
        "cluster-ips-check",
        "reject-chain",
        "mark-for-masquerade",
        "masquerading",
        "services",
        "external-local",
    ):
        chain(name)
    for n in sorted(picks):
        chain(f"pick-{n}")
    for n in sorted(local_picks):
        chain(f"local-pick-{n}")
    for t in sorted(timeouts):
        chain(f"affinity-{t}")
    for name in (CLUSTER_DISPATCH, LOCAL_DISPATCH, SERVICE_DISPATCH, NO_ENDPOINT_SERVICES):
        out.append(f"add map {prefix} {name} {{ type {tuple_type} : verdict ; }}\n")
    out.append(f"add map {prefix} {AFFINITY_TIMEOUTS} {{ type {tuple_type} : verdict ; }}\n")

    # Filter side (before DNAT at -110; after DNAT at -90 in output).
    rule("filter-prerouting", "ct state new jump firewall-check")
    rule("filter-input", "ct state new jump service-endpoints-check")
    if not options.conntrack_tcp_be_liberal:
        rule("filter-forward", "ct state invalid drop")
    rule("filter-forward", "ct state new jump service-endpoints-check")
    rule("filter-forward", "ct state new jump cluster-ips-check")
    rule("filter-output", "ct state new jump service-endpoints-check")
    rule("filter-output", "ct state new jump firewall-check")
    rule("filter-output-post-dnat", "ct state new jump cluster-ips-check")
    rule(
        "firewall-check",
        f"{frontend} @{FIREWALL_IPS} {frontend} . {ipf} saddr != @{FIREWALL_ALLOW} drop",
    )
    rule("service-endpoints-check", f"{frontend} vmap @{NO_ENDPOINT_SERVICES}")
    rule("cluster-ips-check", f"{ipf} daddr @{CLUSTER_IPS} reject")
    if options.service_cidrs:
        rule("cluster-ips-check", f"{ipf} daddr {{ {', '.join(options.service_cidrs)} }} drop")
    rule("reject-chain", "reject")

    # NAT side.
    rule("nat-prerouting", "jump services")
    rule("nat-output", "jump services")
    rule("nat-postrouting", "jump masquerading")
    rule("mark-for-masquerade", f"meta mark set meta mark | {mark}")
    rule(
        "masquerading",
        f"ct status dnat {ipf} saddr . {ipf} daddr @{HAIRPIN} masquerade fully-random",
    )
    rule("masquerading", f"meta mark & {mark} == 0 return")
    rule("masquerading", f"meta mark set meta mark ^ {mark}")
    rule("masquerading", "masquerade fully-random")
    local = options.local
    local_match = not_local_match = ""
    if local is not None:
        field = f"{ipf} saddr" if local.kind == "saddr" else "iifname"
        value = local.value if local.kind == "saddr" else f'"{local.value}"'
        local_match = f"{field} {value}"
        not_local_match = f"{field} != {value}"
    if options.masquerade_all:
        rule("services", f"{frontend} @{CLUSTER_VIPS} jump mark-for-masquerade")
    elif local is not None:
        rule("services", f"{frontend} @{CLUSTER_VIPS} {not_local_match} jump mark-for-masquerade")
    rule("services", f"{frontend} @{EXTERNAL_MASQ} jump mark-for-masquerade")
    for proto in PROTOCOLS if v4 else ():
        rule(
            "services",
            f"meta l4proto {proto} {frontend} @{AFFINITY_SERVICES} dnat {ipf} to {ipf} saddr . "
            f"{ipf} daddr . {proto} dport map @{affinity_map(proto)}",
        )
    rule("services", f"{frontend} vmap @{SERVICE_DISPATCH}")
    # externalTrafficPolicy Local: pods and the node itself use every endpoint (the node's
    # traffic masqueraded); other sources only this node's.
    if local is not None:
        rule("external-local", f"{local_match} {frontend} vmap @{CLUSTER_DISPATCH}")
    rule("external-local", "fib saddr type local jump mark-for-masquerade")
    rule("external-local", f"fib saddr type local {frontend} vmap @{CLUSTER_DISPATCH}")
    rule("external-local", f"{frontend} vmap @{LOCAL_DISPATCH}")
    for chain_name, counts, mapper in (
        ("pick", picks, cluster_endpoints_map),
        ("local-pick", local_picks, local_endpoints_map),
    ):
        for n in sorted(counts):
            for proto in PROTOCOLS:
                rule(
                    f"{chain_name}-{n}",
                    f"meta l4proto {proto} dnat {ipf} to {ipf} daddr . {proto} dport . "
                    f"numgen random mod {n} map @{mapper(proto)}",
                )
    if v4:
        rule(
            "affinity-record",
            "ct state new ct status dnat meta l4proto { tcp, udp, sctp } "
            f"ct original {ipf} daddr . meta l4proto . ct original proto-dst "
            f"vmap @{AFFINITY_TIMEOUTS}",
        )
    for t in sorted(timeouts):
        for proto in PROTOCOLS:
            rule(
                f"affinity-{t}",
                f"meta l4proto {proto} update @{affinity_map(proto)} {{ {ipf} saddr . ct "
                f"original {ipf} daddr . ct original proto-dst timeout {t}s : {ipf} daddr . "
                f"{proto} dport }}",
            )
    return tuple(out)


def compile_nftables(
    state: ProxyState,
    options: NftablesOptions,
    previous: NftablesRuleset | None = None,
    changed_services: Collection[NamespacedName] | None = None,
) -> NftablesRuleset:
    """Compile ``state`` into the flat-layout :class:`NftablesRuleset` for its family.

    With ``previous`` (compiled with the same options) and ``changed_services``, only the
    ports of those Services are recompiled and everything else is reused; the result's
    ``changed`` names the ports recompiled. The output equals a from-scratch compile.
    """
    if options.family != state.family:
        raise ValueError(f"options are for {options.family}, state is {state.family}")
    if previous is None or changed_services is None or previous.options != options:
        return _compile_all(state, options)
    changed = frozenset(changed_services)
    services = dict(previous.services)
    dropped = [services.pop(name) for name in previous.order if name.service in changed]
    recompiled = [name for name in state.services if name.service in changed]
    for name in recompiled:
        port = state.services[name]
        services[name] = compile_service_port(port, state.categorize(port), options)
    ports = frozenset(recompiled).union(svc.name for svc in dropped)
    if not ports:
        return NftablesRuleset(
            options, previous.skeleton, services, previous.order, previous.notes, frozenset()
        )
    added = [services[name] for name in recompiled]
    same_ports = len(services) == len(previous.services) and all(
        name in previous.services for name in recompiled
    )
    order = previous.order if same_ports else tuple(sorted(services))
    refs = previous.skeleton_refs.copy()
    for svc in dropped:
        refs.subtract(_skeleton_refs(svc))
    for svc in added:
        refs.update(_skeleton_refs(svc))
    refs = +refs  # drop the zero counts
    skeleton = previous.skeleton
    if refs.keys() != previous.skeleton_refs.keys():
        skeleton = _skeleton_of(options, services.values())
    ruleset = NftablesRuleset(
        options, skeleton, services, order, _notes(state, options, order), ports
    )
    ruleset.__dict__["skeleton_refs"] = refs
    if "shared_refs" in previous.__dict__:  # carry the reference counts forward
        shared = previous.shared_refs.copy()
        for svc in dropped:
            shared.subtract(_shared_items(svc))
        for svc in added:
            shared.update(_shared_items(svc))
        ruleset.__dict__["shared_refs"] = +shared
    return ruleset


def _skeleton_refs(svc: ServiceElements) -> Iterator[tuple[str, int]]:
    """The skeleton parts (count-class and affinity chains) ``svc``'s elements refer to."""
    yield from (("pick", n) for n in svc.pick_counts)
    yield from (("local-pick", n) for n in svc.local_pick_counts)
    yield from (("affinity", t) for t in svc.affinity_timeouts)


def _skeleton_of(options: NftablesOptions, services: Iterable[ServiceElements]) -> tuple[str, ...]:
    picks: set[int] = set()
    local_picks: set[int] = set()
    timeouts: set[int] = set()
    for svc in services:
        picks |= svc.pick_counts
        local_picks |= svc.local_pick_counts
        timeouts |= svc.affinity_timeouts
    return _skeleton(options, picks, local_picks, timeouts)


def _notes(
    state: ProxyState, options: NftablesOptions, order: Sequence[ServicePortName]
) -> tuple[str, ...]:
    if options.family == IPV4:
        return ()
    return tuple(
        f"{name} ({name.protocol}): ClientIP session affinity is not supported for IPv6 "
        "in the flat nftables layout (nft 1.0.6); connections are balanced without it"
        for name in order
        if state.services[name].session_affinity_client_ip
    )


def _compile_all(state: ProxyState, options: NftablesOptions) -> NftablesRuleset:
    with gc_paused():
        services = {
            name: compile_service_port(port, state.categorize(port), options)
            for name, port in state.services.items()
        }
    order = tuple(sorted(services))
    return NftablesRuleset(
        options=options,
        skeleton=_skeleton_of(options, services.values()),
        services=services,
        order=order,
        notes=_notes(state, options, order),
    )
