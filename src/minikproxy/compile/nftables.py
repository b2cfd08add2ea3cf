"""The nftables compiler, flat layout: ``ProxyState`` -> one ``nft -f`` script per family.

Pure: no I/O. The table (``ip minikproxy`` / ``ip6 minikproxy``) has a fixed skeleton of
chains, sets and maps; every service port contributes only *elements* of those sets and maps,
keyed by its frontend tuple ``address . protocol . port``. Endpoint selection goes through
shared count-class chains (``pick-<n>``: one per distinct endpoint count, shared by every
frontend with n endpoints), which DNAT to ``daddr . dport . numgen random mod n`` looked up in
a per-protocol endpoint map: the kernel scales a 32-bit random value to ``[0, n)``, so each
endpoint gets exactly 1/n of new connections. Adding, removing or (un)readying an endpoint
changes elements only; a new endpoint count also needs its (constant-size) ``pick-<n>``
chain, added in the same transaction (and deleted when no frontend has n endpoints any more).

The per-protocol endpoint maps (``typeof ... : ip daddr . tcp dport``) avoid nft 1.0.6's
``th dport``-in-map-data bug (rules added in later transactions fail); see
``/work/shared/nftables-notes.md``.

ClientIP affinity records ``client . VIP . port -> endpoint`` from the packet path (an
``update`` in ``affinity-<timeout>``, after DNAT) and looks it up before dispatch. nft 1.0.6
cannot linearize an ``update`` whose key or data exceeds 16 bytes (it aborts), which an IPv6
``client . VIP . port`` key always does. The ``ip6`` table therefore keys its affinity maps by
a 96-bit digest of that tuple (three ``jhash`` values with different seeds, computed from the
packet before DNAT and from the conntrack original tuple after it, over identical bytes) and
stores only the endpoint address; the endpoint port comes from ``affinity-ports`` (frontend ->
target port), so IPv6 affinity needs a port whose endpoints share one target port number (a
note says so otherwise). Two live (client, frontend) pairs share a digest with probability
about M^2 / 2^97 for M live entries (1e-17 at a million).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
import struct
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

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
AFFINITY_PORTS = "affinity-ports"
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
    AFFINITY_PORTS,
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
    v6 = options.family != IPV4
    target_ports = {ep.port for ep in (*cluster_eps, *local_eps)}
    # IPv6 affinity stores the endpoint address only (see the module docstring).
    affinity = (
        port.session_affinity_client_ip and has_endpoints and (not v6 or len(target_ports) == 1)
    )
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
    # As kube-proxy: source ranges are enforced whether or not there are endpoints.
    firewall = bool(port.load_balancer_source_ranges)
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
            if local_eps:
                m = len(local_eps)
                local_picks.add(m)
                out.append((LOCAL_DISPATCH, f"{key} : goto local-pick-{m}"))
                endpoint_elements(lmap, eps_key, local_eps)
            else:
                # No local endpoint: pods and the node itself still reach every endpoint
                # (external-local's short-circuits); the rest is dropped in the filter hooks.
                out.append((NO_ENDPOINT_SERVICES, f"{key} : drop"))
        dispatching.append(key)

    if affinity:
        for key in dispatching:
            out.append((AFFINITY_SERVICES, key))
            out.append((AFFINITY_TIMEOUTS, f"{key} : goto affinity-{timeout}"))
            if v6:
                out.append((AFFINITY_PORTS, f"{key} : {next(iter(target_ports))}"))
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


@dataclass(frozen=True)
class AffinityCleanup:
    """Stale ClientIP affinity entries to delete (:meth:`NftablesRuleset.affinity_cleanup`).

    ``stale`` maps each affinity map to the endpoint data (``ip . port``, or ``ip`` in the
    ``ip6`` table) whose entries go; for IPv4 only entries whose key's frontend
    (``VIP . port``) is in the given set, for IPv6 (keys are digests) every entry.
    """

    family_prefix: str
    stale: Mapping[str, Mapping[str, frozenset[str] | None]]

    @property
    def maps(self) -> tuple[str, ...]:
        """The affinity maps to read."""
        return tuple(self.stale)

    def commands(self, elements: Mapping[str, Sequence[RawElement]]) -> str:
        """The transaction deleting the stale entries among ``elements`` (each map's elements
        as the kernel reports them: ``(key, data, timeout_ms, expires_ms)``). Each entry is
        added, then deleted, so an entry that timed out since it was read is no error."""
        v4 = self.family_prefix.startswith("ip ")
        out: list[str] = []
        for mapname, entries in self.stale.items():
            target = f"{self.family_prefix} {mapname}"
            wanted = {_encode_endpoint(v4, data) for data in entries}
            adds: list[str] = []
            keys: list[str] = []
            for raw in elements.get(mapname, ()):
                if raw[1] not in wanted:  # compared raw: decoding every entry costs more
                    continue
                parts, data = decode_affinity_entry(v4, raw[0], raw[1])
                frontends = entries.get(data, ())
                if frontends == ():
                    continue
                if frontends is not None and " . ".join(parts[1:]) not in frontends:
                    continue
                key = " . ".join(parts)
                adds.append(f"{key} : {data}")
                keys.append(key)
            for start in range(0, len(keys), ELEMENTS_PER_COMMAND):
                end = start + ELEMENTS_PER_COMMAND
                out.append(f"add element {target} {{ {', '.join(adds[start:end])} }}\n")
                out.append(f"delete element {target} {{ {', '.join(keys[start:end])} }}\n")
        return "".join(out)


#: A set or map element as the kernel reports it: key and data bytes (register layout),
#: timeout and time left in milliseconds.
RawElement = tuple[bytes, bytes | None, int | None, int | None]


def _encode_endpoint(v4: bool, data: str) -> bytes:
    """The kernel's bytes of affinity data ``ip . port`` (IPv4) or ``ip`` (IPv6)."""
    if not v4:
        return socket.inet_pton(socket.AF_INET6, data)
    ip, _, port = data.partition(" . ")
    return socket.inet_pton(socket.AF_INET, ip) + int(port).to_bytes(2, "big") + b"\0\0"


def decode_affinity_entry(v4: bool, key: bytes, data: bytes | None) -> tuple[list[str], str]:
    """An affinity map element's key parts and data as nft writes them: ``client``, ``VIP``,
    ``port`` and ``endpoint . port`` (IPv4); the three digest values and the endpoint
    address (IPv6). Each concatenated part fills 4 bytes (16 for an IPv6 address)."""
    value = data or b""
    if v4:
        parts = [
            socket.inet_ntop(socket.AF_INET, key[0:4]),
            socket.inet_ntop(socket.AF_INET, key[4:8]),
            str(int.from_bytes(key[8:10], "big")),
        ]
        ep = f"{socket.inet_ntop(socket.AF_INET, value[0:4])} . {int.from_bytes(value[4:6], 'big')}"
        return parts, ep
    digest = [str(part) for part in struct.unpack("=III", key[:12])]
    return digest, socket.inet_ntop(socket.AF_INET6, value[:16])


@dataclass(frozen=True, eq=False)
class NftablesRuleset:
    """A compiled flat-layout ruleset for one IP family.

    ``skeleton`` holds the ``add`` commands of the table, its chains (the count-class and
    affinity chains this ruleset needs included), sets, maps and rules; ``services`` the
    elements of every service port; ``notes`` what of the input it cannot express.
    :meth:`render` is the complete ``nft -f`` script; :meth:`update_script` the transaction
    from a previous ruleset (elements, plus count-class chains that come or go).
    """

    options: NftablesOptions
    skeleton: tuple[str, ...]
    services: dict[ServicePortName, ServiceElements]
    order: tuple[ServicePortName, ...]
    notes: tuple[str, ...] = ()
    #: Ports recompiled from the previous ruleset (None: compiled from scratch).
    changed: frozenset[ServicePortName] | None = None
    #: The port names of each Service (the compiled state's ``ports_by_service``).
    port_index: Mapping[NamespacedName, tuple[ServicePortName, ...]] = field(
        default_factory=dict, repr=False
    )
    #: The ports ``notes`` are about, one each, in the same order.
    noted: tuple[ServicePortName, ...] = ()

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
        """The transaction taking the kernel from ``previous`` to this ruleset, given every
        port whose elements may differ: element deletions and additions, plus the count-class
        and affinity chains (``pick-<n>``, ``local-pick-<n>``, ``affinity-<seconds>``) that
        appear or disappear with them; None if the rest of the skeleton differs (other
        options): then :meth:`render` it whole.

        Deletions come first (a map key whose data changes is deleted, then added), then
        chains nothing refers to any more are deleted (kernel 6.2+ allows this in the
        transaction that removes the last reference), new chains and their rules are added,
        and new elements last. A shared element is deleted only when no port holds it any more.
        The table itself stays, so the affinity maps keep what they learned.
        """
        delta = _skeleton_delta(previous.skeleton, self.skeleton)
        if delta is None:
            return None
        gone_chains, new_lines = delta
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
        prefix = self.family_prefix
        out = self.element_commands("delete", _in_set_order(deletes))
        for chain_name in gone_chains:
            out += [f"flush chain {prefix} {chain_name}\n", f"delete chain {prefix} {chain_name}\n"]
        out += new_lines
        out += self.element_commands("add", _in_set_order(adds))
        return "".join(out)

    def affinity_cleanup(
        self, previous: NftablesRuleset, changed: Iterable[ServicePortName]
    ) -> AffinityCleanup | None:
        """What the packet path learned that ``changed`` ports made stale: ClientIP affinity
        entries pointing to an endpoint that left its port (removed, no longer ready, the
        port gone or its affinity off). None when there is none. The kernel does not know:
        those entries would keep sending their clients to the old endpoint until they time
        out; kube-proxy's per-endpoint affinity sets go with their endpoint."""
        v4 = self.options.family == IPV4
        stale: dict[str, dict[str, set[str] | None]] = {}
        for name in changed:
            old = previous.services.get(name)
            if old is None or not old.affinity_timeouts:
                continue
            new = self.services.get(name)
            kept = new.categorized.reachable if new is not None and new.affinity_timeouts else ()
            live = {f"{ep.ip} . {ep.port}" if v4 else ep.ip for ep in kept}
            frontends = {
                " . ".join(key.split(" . ")[::2])  # VIP . proto . port -> VIP . port
                for setname, key in old.elements
                if setname == AFFINITY_SERVICES
            }
            entries = stale.setdefault(affinity_map(name.protocol.lower()), {})
            for ep in old.categorized.reachable:
                data = f"{ep.ip} . {ep.port}" if v4 else ep.ip
                if data in live:
                    continue
                if not v4:  # the key is a digest: any frontend's entries go
                    entries[data] = None
                    continue
                current = entries.setdefault(data, set())
                if current is not None:
                    current.update(frontends)
        if not any(stale.values()):
            return None
        return AffinityCleanup(
            self.family_prefix,
            {
                m: {d: None if f is None else frozenset(f) for d, f in e.items()}
                for m, e in sorted(stale.items())
                if e
            },
        )

    @property
    def affinity_maps(self) -> tuple[str, ...]:
        """The dynamic maps the packet path fills with ClientIP affinity."""
        return tuple(affinity_map(proto) for proto in PROTOCOLS)

    def affinity_restore(self, elements: Mapping[str, Sequence[RawElement]]) -> str:
        """``add element`` commands re-creating, with their timeout and the time they have
        left, the affinity entries among ``elements`` (each affinity map's elements as the
        kernel reports them, read from the table this ruleset replaces) that still point to a
        live endpoint of their frontend: appended to :meth:`render`, a full replace keeps what
        clients learned, as kube-proxy's full syncs keep its affinity sets."""
        v4 = self.options.family == IPV4
        live: set[str] = set()
        for svc in self.services.values():
            if not svc.affinity_timeouts:
                continue
            ends = {f"{ep.ip} . {ep.port}" if v4 else ep.ip for ep in svc.categorized.reachable}
            if not v4:
                live |= ends
                continue
            for setname, key in svc.elements:
                if setname == AFFINITY_SERVICES:
                    frontend = " . ".join(key.split(" . ")[::2])
                    live.update(f"{frontend} -> {end}" for end in ends)
        restored: dict[str, list[str]] = {}
        for mapname in self.affinity_maps:
            for raw, data, timeout_ms, expires_ms in elements.get(mapname, ()):
                if not expires_ms:
                    continue
                parts, endpoint = decode_affinity_entry(v4, raw, data)
                wanted = f"{' . '.join(parts[1:])} -> {endpoint}" if v4 else endpoint
                if wanted in live:
                    timeout = f" timeout {timeout_ms}ms" if timeout_ms else ""
                    restored.setdefault(mapname, []).append(
                        f"{' . '.join(parts)}{timeout} expires {expires_ms}ms : {endpoint}"
                    )
        return "".join(self.element_commands("add", restored))

    def render_services(self, services: Collection[NamespacedName]) -> str:
        """Only the elements of ``services``' ports, as ``add element`` commands (for reading)."""
        wanted = [n for n in self.order if n.service in services]
        return "".join(self.element_commands("add", self.elements_by_set(wanted)))

    def render_service(self, name: NamespacedName) -> str:
        """:meth:`render_services` for one Service."""
        return self.render_services({name})


#: Skeleton lines that depend on the services (count-class and affinity-timeout chains).
_VARIABLE_LINE = re.compile(r"^add (chain|rule) \S+ \S+ ((?:local-)?pick-\d+|affinity-\d+)[ \n]")


def _skeleton_delta(old: Sequence[str], new: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """The chains to delete and the ``add chain``/``add rule`` lines to send when ``old``
    and ``new`` differ only in count-class and affinity chains; None otherwise."""
    if old == new:
        return [], []
    old_lines, new_lines = set(old), set(new)
    removed = [line for line in old if line not in new_lines]
    added = [line for line in new if line not in old_lines]
    gone: list[str] = []
    for line in removed:
        match = _VARIABLE_LINE.match(line)
        if match is None:
            return None
        if match.group(1) == "chain":
            gone.append(match.group(2))
    if any(_VARIABLE_LINE.match(line) is None for line in added):
        return None
    return gone, added


def _shared_items(svc: ServiceElements) -> Iterator[tuple[str, str]]:
    return (item for item in svc.elements if item[0] in SHARED_SETS)


def _in_set_order(elements: dict[str, list[str]]) -> dict[str, list[str]]:
    return {s: list(dict.fromkeys(elements[s])) for s in ELEMENT_SETS if s in elements}


#: Seeds of the three ``jhash`` values that key IPv6 affinity (see the module docstring).
DIGEST_SEEDS = (0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35)


def _digest(tuple_expr: str) -> str:
    """The 96-bit affinity key of an IPv6 ``client . VIP . port`` expression: three seeded
    ``jhash`` values (12 bytes: short enough for nft 1.0.6's ``update``)."""
    return " . ".join(f"jhash {tuple_expr} mod 4294967295 seed {seed:#x}" for seed in DIGEST_SEEDS)


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
        affinity_key = (
            f"{ipf} saddr . {ipf} daddr . {proto} dport : {ipf} daddr . {proto} dport"
            if v4
            else f"{' . '.join(['numgen random mod 16'] * len(DIGEST_SEEDS))} : ip6 daddr"
        )
        out.append(
            f"add map {prefix} {affinity_map(proto)} {{ typeof {affinity_key} ; "
            "flags dynamic,timeout ; timeout 3h ; size 1048576 ; }\n"
        )
    if not v4:
        out.append(f"add map {prefix} {AFFINITY_PORTS} {{ type {tuple_type} : inet_service ; }}\n")

    # Chains: base chains first, then regular ones (verdict maps refer to them).
    chain("filter-prerouting", "type filter hook prerouting priority -110")
    chain("filter-input", "type filter hook input priority -110")
    chain("filter-forward", "type filter hook forward priority -110")
    chain("filter-output", "type filter hook output priority -110")
    chain("filter-output-post-dnat", "type filter hook output priority -90")
    chain("nat-prerouting", "type nat hook prerouting priority -100")
    chain("nat-output", "type nat hook output priority -100")
    chain("nat-postrouting", "type nat hook postrouting priority 100")
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
    for proto in PROTOCOLS:
        if v4:
            target = f"{ipf} saddr . {ipf} daddr . {proto} dport map @{affinity_map(proto)}"
        else:
            digest = _digest(f"ip6 saddr . ip6 daddr . {proto} dport")
            target = f"{digest} map @{affinity_map(proto)} : {frontend} map @{AFFINITY_PORTS}"
        rule(
            "services",
            f"meta l4proto {proto} {frontend} @{AFFINITY_SERVICES} dnat {ipf} to {target}",
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
    rule(
        "affinity-record",
        "ct state new ct status dnat meta l4proto { tcp, udp, sctp } "
        f"ct original {ipf} daddr . meta l4proto . ct original proto-dst "
        f"vmap @{AFFINITY_TIMEOUTS}",
    )
    original = f"{ipf} saddr . ct original {ipf} daddr . ct original proto-dst"
    for t in sorted(timeouts):
        for proto in PROTOCOLS:
            if v4:
                entry = f"{original} timeout {t}s : {ipf} daddr . {proto} dport"
            else:
                entry = f"{_digest(original)} timeout {t}s : ip6 daddr"
            rule(
                f"affinity-{t}", f"meta l4proto {proto} update @{affinity_map(proto)} {{ {entry} }}"
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
    old_index, new_index = previous.port_index, state.ports_by_service
    dropped = [services.pop(name) for key in changed for name in old_index.get(key, ())]
    recompiled = [name for key in changed for name in new_index.get(key, ())]
    for name in recompiled:
        port = state.services[name]
        services[name] = compile_service_port(port, state.categorize(port), options)
    ports = frozenset(recompiled).union(svc.name for svc in dropped)
    if not ports:
        same = NftablesRuleset(
            options, previous.skeleton, services, previous.order, previous.notes, frozenset(),
            new_index, previous.noted,
        )  # fmt: skip
        for counts in ("skeleton_refs", "shared_refs"):  # handed on, as below
            if counts in previous.__dict__:
                same.__dict__[counts] = previous.__dict__.pop(counts)
        return same
    added = [services[name] for name in recompiled]
    order = _updated_order(previous.order, previous.services, services, dropped, recompiled)
    # The reference counts move from the previous ruleset to this one (updated for the ports
    # recompiled: a copy would cost a pass over every port); the previous one recounts its
    # own if it is ever asked again.
    had_skeleton_refs = set(previous.skeleton_refs)
    refs = previous.__dict__.pop("skeleton_refs")
    _move_refs(refs, map(_skeleton_refs, dropped), map(_skeleton_refs, added))
    skeleton = previous.skeleton
    if refs.keys() != had_skeleton_refs:
        skeleton = _skeleton_of(options, services.values())
    # Only the recompiled ports' notes can change: the others are carried over.
    kept = {n: t for n, t in zip(previous.noted, previous.notes, strict=True) if n not in ports}
    notes, noted = _notes(state, options, recompiled, services, kept)
    ruleset = NftablesRuleset(
        options, skeleton, services, order, notes, ports, new_index, noted=noted
    )
    ruleset.__dict__["skeleton_refs"] = refs
    if "shared_refs" in previous.__dict__:
        shared = previous.__dict__.pop("shared_refs")
        _move_refs(shared, map(_shared_items, dropped), map(_shared_items, added))
        ruleset.__dict__["shared_refs"] = shared
    return ruleset


def _updated_order(
    order: tuple[ServicePortName, ...],
    before: Mapping[ServicePortName, object],
    after: Mapping[ServicePortName, object],
    dropped: Iterable[ServiceElements],
    recompiled: Iterable[ServicePortName],
) -> tuple[ServicePortName, ...]:
    """``order`` (sorted port names) with the ports that went away removed and the new ones
    inserted in place: no re-sort of every port for one Service added or deleted."""
    gone = {svc.name for svc in dropped if svc.name not in after}
    new = sorted(name for name in recompiled if name not in before)
    if not gone and not new:
        return order
    names = list(order)
    for name in gone:  # by bisection: hashing every port name to filter costs more
        del names[bisect.bisect_left(names, name)]
    for name in new:
        bisect.insort(names, name)
    return tuple(names)


def _move_refs(
    refs: Counter[Any], removed: Iterable[Iterable[Any]], added: Iterable[Iterable[Any]]
) -> None:
    """Update reference counts in place: drop ``removed``'s references, take ``added``'s, and
    forget what nothing refers to any more."""
    touched: list[Any] = []
    for items in removed:
        for item in items:
            refs[item] -= 1
            touched.append(item)
    for items in added:
        refs.update(items)
    for item in touched:
        if refs.get(item, 0) <= 0:
            refs.pop(item, None)


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


def _port_note(state: ProxyState, name: ServicePortName, svc: ServiceElements) -> str | None:
    """What the flat layout cannot express for one IPv6 port, if anything."""
    if (
        state.services[name].session_affinity_client_ip
        and svc.categorized.has_any
        and not svc.affinity_timeouts
        and len({ep.port for ep in svc.categorized.reachable}) > 1
    ):
        return (
            f"{name} ({name.protocol}): ClientIP session affinity over IPv6 needs one target "
            "port number for all endpoints in the flat nftables layout (nft 1.0.6); "
            "connections are balanced without it"
        )
    return None


def _notes(
    state: ProxyState,
    options: NftablesOptions,
    names: Iterable[ServicePortName],
    services: Mapping[ServicePortName, ServiceElements],
    kept: Mapping[ServicePortName, str] | None = None,
) -> tuple[tuple[str, ...], tuple[ServicePortName, ...]]:
    """The notes of ``names``' ports (plus the ``kept`` ones), and the ports they are about,
    in port order."""
    if options.family == IPV4:
        return (), ()
    noted = dict(kept or {})
    for name in names:
        note = _port_note(state, name, services[name])
        if note is not None:
            noted[name] = note
    order = sorted(noted)
    return tuple(noted[name] for name in order), tuple(order)


def _compile_all(state: ProxyState, options: NftablesOptions) -> NftablesRuleset:
    with gc_paused():
        services = {
            name: compile_service_port(port, state.categorize(port), options)
            for name, port in state.services.items()
        }
    order = tuple(sorted(services))
    notes, noted = _notes(state, options, order, services)
    ruleset = NftablesRuleset(
        options=options,
        skeleton=_skeleton_of(options, services.values()),
        services=services,
        order=order,
        notes=notes,
        port_index=state.ports_by_service,
        noted=noted,
    )
    # Counted now, with the full compile, not by the first incremental one (which then
    # carries them forward): an endpoint change must not pay a pass over every port.
    ruleset.shared_refs  # noqa: B018
    ruleset.skeleton_refs  # noqa: B018
    return ruleset
