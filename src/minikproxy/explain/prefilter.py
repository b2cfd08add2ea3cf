"""Keep only the Services (and their endpoints) a packet can meet, before anything is parsed.

explain evaluates one packet (diff a few per changed service port), yet tracking and
compiling every Service of a 10k cluster is most of its time. Every mode compiles each
service port on its own: its own chains, sets and map elements, plus one top-level rule or
element per frontend, and each of those matches the port's frontend: a ClusterIP, external
or load-balancer IP (with the port), or a NodePort / health-check node port (on the node's
addresses). A packet to ``dst:dport`` therefore matches rules of the Services with a
frontend address ``dst`` or a node port ``dport`` only; the other rules are skipped without
matching (and explain's path lists the rules matched, never the ones skipped). After DNAT
the packet's destination is an endpoint of those Services, which the filter rules of another
Service can match (a ClusterIP without endpoints rejects; a node port without endpoints
too): the Services with a frontend address or node port among those endpoints are kept as
well. Compiling the kept Services alone thus gives exactly the rules the packet crosses.

What depends on every Service is iptables' large-cluster mode (no per-endpoint comments
above 1000 endpoints in all): :meth:`Selection.endpoints_above` decides it from the whole
input, counting the other endpoints only until the threshold is passed.

Objects are grouped by kind and name, so a later copy of an object (a second file) goes with
the first; a malformed object is kept (the tracker reports it).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from minikproxy.changes import ClusterTracker
from minikproxy.model.names import IPFamily
from minikproxy.model.parse import SERVICE_NAME_LABEL, canonical_ip
from minikproxy.sources.manifests import SourcedObject

TRACKED = ("Service", "EndpointSlice", "Endpoints")
"""The kinds the prefilter chooses among (every other object is always kept)."""
_TRACKED = frozenset(TRACKED)

_Owner = tuple[str, Any]
_GroupKey = tuple[str, str, str]


class _Malformed(Exception):
    """An object whose shape the prefilter does not read: it is kept."""


@dataclass
class _Group:
    """Every copy of one object (kind, namespace, name) across the inputs, in order."""

    key: _GroupKey
    copies: list[list[int]]  # per side: indices into that side's objects
    owners: set[_Owner] = field(default_factory=set)  # the Services its copies belong to
    always: bool = False  # malformed: kept whatever the packet


@dataclass(frozen=True)
class Selection:
    """One input split into the objects to track and the others (for counting only)."""

    kept: list[SourcedObject]
    rest_slices: list[list[SourcedObject]]  # left-out EndpointSlices, per object
    rest_endpoints: list[list[SourcedObject]]  # left-out v1 Endpoints, per object

    def endpoints_above(
        self, node_name: str, family: IPFamily, kept_total: int, threshold: int
    ) -> bool:
        """Whether the whole input has more than ``threshold`` endpoints of ``family``
        (``ProxyState.total_endpoints``), given the kept objects' ``kept_total``.

        Counted per Service (the kept and left-out objects name disjoint Services): the
        left-out EndpointSlices are tracked in growing batches until the threshold is passed
        (a Service's count only grows with more of its slices); v1 Endpoints, used only by
        Services without slices, come last, when the count is exact."""
        if kept_total > threshold:
            return True
        counter = ClusterTracker(node_name)
        batches = [*_batches(self.rest_slices), [o for g in self.rest_endpoints for o in g]]
        for batch in batches:
            if not batch:
                continue
            counter.add_objects(o.obj for o in batch)
            if kept_total + counter.snapshot(family).state.total_endpoints > threshold:
                return True
        return False


def _object_key(obj: Mapping[str, Any]) -> _GroupKey | None:
    """(kind, namespace, name) of an object the tracker names; None for one it does not
    track (a Node) or cannot name (metadata not a mapping), which it skips."""
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    if kind not in _TRACKED or not (type(meta) is dict or isinstance(meta, Mapping)):
        return None
    return (str(kind), str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _batches(groups: Sequence[list[SourcedObject]]) -> Iterator[list[SourcedObject]]:
    start, size = 0, 16
    while start < len(groups):
        yield [o for g in groups[start : start + size] for o in g]
        start += size
        size *= 2


def select(
    sides: Sequence[Sequence[SourcedObject]],
    addresses: Collection[str],
    ports: Collection[int],
) -> list[Selection]:
    """Split each input of ``sides`` (one for explain; old and new for diff, decided
    together) into the objects packets to ``addresses`` or node ports ``ports`` can meet, and
    the others. ``addresses`` must be canonical (``canonical_ip``)."""
    groups: dict[_GroupKey, _Group] = {}
    always: list[set[int]] = [set() for _ in sides]
    by_address: dict[str, list[_Group]] = {}
    by_port: dict[Any, list[_Group]] = {}
    for side, objects in enumerate(sides):
        for i, item in enumerate(objects):
            obj = item.obj
            key = _object_key(obj)
            if key is None:
                # Not chosen here (a Node), or the tracker cannot name it and skips it.
                always[side].add(i)
                continue
            kind = key[0]
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group(key, [[] for _ in sides])
            group.copies[side].append(i)
            try:
                if kind != "Service":
                    group.owners.update(_owners(kind, key, obj))
                    continue
                group.owners.add(key[1:])
                frontends, node_ports = _service_frontends(obj)
                for address in frontends:
                    by_address.setdefault(address, []).append(group)
                for port in node_ports:
                    by_port.setdefault(port, []).append(group)
            except _Malformed:
                group.always = True
    by_owner: dict[_Owner, list[_Group]] = {}
    for group in groups.values():
        for owner in group.owners:
            by_owner.setdefault(owner, []).append(group)

    def matching(addrs: Iterable[str], nports: Iterable[int]) -> Iterator[_Group]:
        yield from (g for g in groups.values() if g.always)
        for address in addrs:
            yield from by_address.get(address, ())
        for port in nports:
            yield from by_port.get(port, ())

    chosen = _closure(matching(addresses, ports), by_owner, set())
    # After DNAT: the endpoints of the chosen Services, as other Services' frontends.
    more_addresses, more_ports = set(addresses), set(ports)
    for key in chosen:
        if key[0] != "Service":
            for s, copies in enumerate(groups[key].copies):
                for i in copies:
                    _endpoint_targets(key[0], sides[s][i].obj, more_addresses, more_ports)
    chosen = _closure(matching(more_addresses, more_ports), by_owner, chosen)
    out: list[Selection] = []
    for side, objects in enumerate(sides):
        keep = set(always[side])
        rest_slices: list[list[SourcedObject]] = []
        rest_endpoints: list[list[SourcedObject]] = []
        for key, group in groups.items():
            copies = group.copies[side]
            if key in chosen:
                keep.update(copies)
            elif copies and key[0] != "Service":
                target = rest_slices if key[0] == "EndpointSlice" else rest_endpoints
                target.append([objects[i] for i in copies])
        out.append(Selection([objects[i] for i in sorted(keep)], rest_slices, rest_endpoints))
    return out


def _closure(
    seeds: Iterable[_Group], by_owner: Mapping[_Owner, list[_Group]], chosen: set[_GroupKey]
) -> set[_GroupKey]:
    """``chosen`` (group keys) plus ``seeds`` and every group sharing an owner with them, so
    that chosen and left-out objects never belong to the same Service."""
    out = set(chosen)
    todo = list(seeds)
    seen_owners: set[_Owner] = set()
    while todo:
        group = todo.pop()
        if group.key in out and group.owners <= seen_owners:
            continue
        out.add(group.key)
        for owner in group.owners - seen_owners:
            seen_owners.add(owner)
            todo.extend(g for g in by_owner.get(owner, ()) if g.key not in out)
    return out


def _owners(kind: object, key: _GroupKey, obj: Mapping[str, Any]) -> Iterator[_Owner]:
    """The Services (namespace, name) a copy of an object belongs to, as the tracker sees it."""
    if kind != "EndpointSlice":
        yield key[1], key[2]
        return
    labels = (obj.get("metadata") or {}).get("labels") or {}
    if not (type(labels) is dict or isinstance(labels, Mapping)):
        raise _Malformed
    name = labels.get(SERVICE_NAME_LABEL)
    if not name:
        return
    try:
        hash(name)
    except TypeError:
        raise _Malformed from None
    yield key[1], name


def _canonical(text: object) -> str | None:
    if isinstance(text, str) and ":" not in text and text[:1].isdigit() and text[-1:].isdigit():
        return text  # IPv4 without spaces: canonical if valid (no leading zeros), else unused
    parsed = canonical_ip(text)
    return parsed[0] if parsed else None


def _service_frontends(obj: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    """A Service's frontend addresses (canonical) and node ports, as written; _Malformed for
    a shape it does not read (the tracker decides)."""
    try:
        spec = obj.get("spec") or {}
        ips = [spec.get("clusterIP"), *(spec.get("clusterIPs") or ())]
        ips += spec.get("externalIPs") or ()
        status = obj.get("status")
        if status:
            ips += [i.get("ip") for i in (status.get("loadBalancer") or {}).get("ingress") or ()]
        node_ports = [p.get("nodePort") for p in spec.get("ports") or ()]
        node_ports.append(spec.get("healthCheckNodePort"))
        hash(tuple(node_ports))
    except (AttributeError, TypeError):
        raise _Malformed from None
    frontends = [c for c in map(_canonical, ips) if c is not None]
    return frontends, [p for p in node_ports if p]


def _endpoint_targets(
    kind: str, obj: Mapping[str, Any], addresses: set[str], ports: set[int]
) -> None:
    """Add the addresses and ports of an EndpointSlice's or Endpoints' endpoints."""
    try:
        if kind == "EndpointSlice":
            texts = [a for ep in obj.get("endpoints") or () for a in ep.get("addresses") or ()]
            numbers = [p.get("port") for p in obj.get("ports") or ()]
        else:
            texts, numbers = [], []
            for subset in obj.get("subsets") or ():
                for which in ("addresses", "notReadyAddresses"):
                    texts += [a.get("ip") for a in subset.get(which) or ()]
                numbers += [p.get("port") for p in subset.get("ports") or ()]
    except (AttributeError, TypeError):
        return  # the tracker skips it: no endpoints
    for text in texts:
        ip = _canonical(text)
        if ip is not None:
            addresses.add(ip)
    ports.update(n for n in numbers if isinstance(n, int))


def changed_frontends(
    old: Sequence[SourcedObject], new: Sequence[SourcedObject]
) -> tuple[set[str], set[int]] | None:
    """The frontend addresses and ports (service ports, node ports, health-check node ports)
    of every Service whose Service, EndpointSlices or Endpoints differ between ``old`` and
    ``new``, from both; None when something else differs (a Node: any port may change) or a
    changed Service has a shape this does not read."""
    sides: list[dict[tuple[str, str, str], list[Mapping[str, Any]]]] = [{}, {}]
    others: list[list[Mapping[str, Any]]] = [[], []]
    for side, objects in enumerate((old, new)):
        for item in objects:
            obj = item.obj
            key = _object_key(obj)
            if key is None:
                others[side].append(obj)
                continue
            sides[side].setdefault(key, []).append(obj)
    if others[0] != others[1]:
        return None
    before, after = sides
    changed: set[_Owner] = set()
    services: list[Mapping[str, Any]] = []
    for key in before.keys() | after.keys():
        if before.get(key) == after.get(key):
            continue
        try:
            for obj in [*before.get(key, ()), *after.get(key, ())]:
                changed.update(_owners(key[0], key, obj))
        except _Malformed:
            return None
    for key in before.keys() | after.keys():
        if key[0] == "Service" and (key[1], key[2]) in changed:
            services += [*before.get(key, ()), *after.get(key, ())]
    addresses: set[str] = set()
    ports: set[int] = set()
    for obj in services:
        try:
            frontends, node_ports = _service_frontends(obj)
            numbers = [p.get("port") for p in (obj.get("spec") or {}).get("ports") or ()]
        except (_Malformed, AttributeError, TypeError):
            return None
        addresses.update(frontends)
        ports.update(p for p in [*node_ports, *numbers] if isinstance(p, int))
    return addresses, ports
