"""Track API objects and turn them into ``ProxyState`` snapshots plus what changed.

``ClusterTracker`` is fed raw objects (from manifests or from watches) and keeps the parsed
model per Service. :meth:`ClusterTracker.snapshot` recomputes only the services touched since
the previous snapshot of that family and reports them, so a partial sync can rewrite only
their rules (kube-proxy's ``UpdateServiceMapResult.UpdatedServices``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from minikproxy.gcutil import gc_paused
from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import (
    NodeInfo,
    ParsedSlice,
    parse_endpoint_slice,
    parse_legacy_endpoints,
    parse_node,
    parse_service,
)
from minikproxy.model.problems import ObjectProblem, ProblemSink, ignore_problems
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.state import ProxyState

Obj = Mapping[str, Any]
FAMILIES: tuple[IPFamily, ...] = (IPV4, IPV6)


def _key(obj: Obj) -> NamespacedName:
    meta = obj.get("metadata") or {}
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


@dataclass(frozen=True)
class Snapshot:
    """A state plus the Services whose ports or endpoints changed since the last snapshot.

    ``changed`` is None when everything must be considered changed (first snapshot, or the
    node's topology labels changed).
    """

    state: ProxyState
    changed: frozenset[NamespacedName] | None
    trigger_times: Mapping[NamespacedName, tuple[str, ...]]


class ClusterTracker:
    """The Services, EndpointSlices, Endpoints and Node of a cluster, parsed once."""

    def __init__(self, node_name: str, *, report: ProblemSink = ignore_problems) -> None:
        self.node_name = node_name
        self._report = report
        self._node = NodeInfo(name=node_name)
        self._service_ports: dict[NamespacedName, dict[IPFamily, tuple[ServicePort, ...]]] = {}
        self._slices: dict[NamespacedName, dict[str, ParsedSlice]] = {}
        self._legacy: dict[NamespacedName, tuple[ParsedSlice, ...]] = {}
        self._slice_owner: dict[NamespacedName, NamespacedName] = {}
        self._ports: dict[IPFamily, dict[ServicePortName, ServicePort]] = {f: {} for f in FAMILIES}
        self._endpoints: dict[IPFamily, dict[ServicePortName, tuple[Endpoint, ...]]] = {
            f: {} for f in FAMILIES
        }
        self._by_service: dict[IPFamily, dict[NamespacedName, tuple[ServicePortName, ...]]] = {
            f: {} for f in FAMILIES
        }
        self._eps_by_service: dict[IPFamily, dict[NamespacedName, tuple[ServicePortName, ...]]] = {
            f: {} for f in FAMILIES
        }
        self._dirty: dict[IPFamily, set[NamespacedName]] = {f: set() for f in FAMILIES}
        self._full: dict[IPFamily, bool] = {f: True for f in FAMILIES}
        self._triggers: dict[IPFamily, dict[NamespacedName, list[str]]] = {f: {} for f in FAMILIES}
        # For kube-proxy's pending gauges (whatever the family): the Services whose Service
        # object changed, and the number of EndpointSlice/Endpoints changes.
        self._service_changes: set[NamespacedName] = set()
        self._endpoint_changes = 0

    # --- feeding -----------------------------------------------------------------------------

    def _touch(self, key: NamespacedName) -> None:
        for fam in FAMILIES:
            self._dirty[fam].add(key)

    def upsert_service(self, obj: Obj) -> None:
        """Add or replace a v1 Service."""
        key = _key(obj)
        spec = obj.get("spec") or {}
        cluster_ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
        has_v6 = any(isinstance(ip, str) and ":" in ip for ip in cluster_ips)
        has_v4 = any(not (isinstance(ip, str) and ":" in ip) for ip in cluster_ips)
        # Problems are family-independent: report them from the first family parsed only.
        v4 = parse_service(obj, IPV4, self._report) if has_v4 else ()
        v6 = parse_service(obj, IPV6, ignore_problems if has_v4 else self._report) if has_v6 else ()
        ports = {IPV4: v4, IPV6: v6}
        if self._service_ports.get(key) != ports:
            self._service_ports[key] = ports
            self._touch(key)
            self._service_changes.add(key)

    def delete_service(self, obj: Obj) -> None:
        """Forget a v1 Service."""
        key = _key(obj)
        if self._service_ports.pop(key, None) is not None:
            self._touch(key)
            self._service_changes.add(key)

    def upsert_endpoint_slice(self, obj: Obj) -> None:
        """Add or replace a discovery.k8s.io/v1 EndpointSlice."""
        slice_key = _key(obj)
        parsed = parse_endpoint_slice(obj, self._report)
        old_owner = self._slice_owner.pop(slice_key, None)
        if old_owner is not None:
            old = self._slices.get(old_owner, {}).pop(slice_key.name, None)
            if parsed is not None and old == parsed:
                self._slices[old_owner][slice_key.name] = parsed
                self._slice_owner[slice_key] = old_owner
                return
            self._touch(old_owner)
        if parsed is None:
            self._endpoint_changes += old_owner is not None
            return
        self._slices.setdefault(parsed.service, {})[slice_key.name] = parsed
        self._slice_owner[slice_key] = parsed.service
        self._touch(parsed.service)
        self._endpoint_changes += 1
        if parsed.trigger_time:
            by_service = self._triggers[parsed.family]
            by_service.setdefault(parsed.service, []).append(parsed.trigger_time)

    def delete_endpoint_slice(self, obj: Obj) -> None:
        """Forget an EndpointSlice."""
        slice_key = _key(obj)
        owner = self._slice_owner.pop(slice_key, None)
        if owner is not None:
            self._slices.get(owner, {}).pop(slice_key.name, None)
            if not self._slices.get(owner):
                self._slices.pop(owner, None)
            self._touch(owner)
            self._endpoint_changes += 1

    def upsert_endpoints(self, obj: Obj) -> None:
        """Add or replace a legacy v1 Endpoints (used only for Services without slices)."""
        key = _key(obj)
        parsed = parse_legacy_endpoints(obj, self._report)
        if self._legacy.get(key) != parsed:
            self._legacy[key] = parsed
            self._touch(key)
            self._endpoint_changes += 1

    def delete_endpoints(self, obj: Obj) -> None:
        """Forget a legacy v1 Endpoints."""
        key = _key(obj)
        if self._legacy.pop(key, None) is not None:
            self._touch(key)
            self._endpoint_changes += 1

    def set_node(self, obj: Obj) -> None:
        """Record this node's v1 Node; a zone-label change forces a full recompute."""
        node = parse_node(obj, self._report)
        if node is None or node.name != self.node_name:
            return
        if node.zone != self._node.zone:
            self._full = {f: True for f in FAMILIES}
        self._node = node

    def add_objects(self, objects: Iterable[Obj]) -> None:
        """Feed a batch of objects of any supported kind (others are ignored)."""
        handlers: dict[str, Callable[[Obj], None]] = {
            "Service": self.upsert_service,
            "EndpointSlice": self.upsert_endpoint_slice,
            "Endpoints": self.upsert_endpoints,
            "Node": self.set_node,
        }
        with gc_paused():
            for obj in objects:
                handler = handlers.get(str(obj.get("kind")))
                if handler is not None:
                    self.guarded(handler, obj)

    def guarded(self, handler: Callable[[Obj], None], obj: Obj) -> bool:
        """Call ``handler(obj)``; a malformed object (wrong shapes, not just bad values) is
        reported as a problem and skipped instead of raising. Returns False if skipped."""
        try:
            handler(obj)
        except (AttributeError, TypeError, ValueError, KeyError) as err:
            meta = obj.get("metadata")
            meta = meta if isinstance(meta, Mapping) else {}
            self._report(
                ObjectProblem(
                    str(obj.get("kind") or "object"),
                    str(meta.get("namespace") or ""),
                    str(meta.get("name") or ""),
                    "(structure)",
                    f"malformed object, skipped: {type(err).__name__}: {err}",
                )
            )
            return False
        return True

    @property
    def node(self) -> NodeInfo:
        """This node, as last seen."""
        return self._node

    def pending_services(self, family: IPFamily) -> int:
        """How many Services changed since the last snapshot of ``family``."""
        return len(self._dirty[family])

    @property
    def pending_service_changes(self) -> int:
        """Services whose Service object changed since :meth:`checkout_pending`, in any
        family (kube-proxy's ``sync_proxy_rules_service_changes_pending``)."""
        return len(self._service_changes)

    @property
    def pending_endpoint_changes(self) -> int:
        """EndpointSlice (or Endpoints) changes since :meth:`checkout_pending`, in any family
        (kube-proxy's ``sync_proxy_rules_endpoint_changes_pending``)."""
        return self._endpoint_changes

    def checkout_pending(self) -> None:
        """Reset the pending counts (a sync is taking the changes)."""
        self._service_changes = set()
        self._endpoint_changes = 0

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(self, family: IPFamily) -> Snapshot:
        """Recompute the changed Services of ``family`` and return the new state."""
        with gc_paused():
            return self._snapshot(family)

    def _snapshot(self, family: IPFamily) -> Snapshot:
        full = self._full[family]
        dirty = (
            set(self._service_ports) | set(self._slices) | set(self._legacy)
            if full
            else (self._dirty[family])
        )
        if full:
            dirty |= set(self._by_service[family]) | set(self._eps_by_service[family])
        ports, endpoints = self._ports[family], self._endpoints[family]
        for key in dirty:
            for name in self._by_service[family].pop(key, ()):
                ports.pop(name, None)
            for name in self._eps_by_service[family].pop(key, ()):
                endpoints.pop(name, None)
            svc_ports = self._service_ports.get(key, {}).get(family, ())
            if svc_ports:
                self._by_service[family][key] = tuple(p.name for p in svc_ports)
                for p in svc_ports:
                    ports[p.name] = p
            eps = self._endpoints_for(key, family)
            if eps:
                self._eps_by_service[family][key] = tuple(eps)
                endpoints.update(eps)
        self._dirty[family] = set()
        self._full[family] = False
        pending = self._triggers[family]  # per family, as kube-proxy's change trackers
        triggers = {k: tuple(pending.pop(k)) for k in dirty if k in pending}
        state = ProxyState(
            family, self._node, dict(ports), dict(endpoints), dict(self._by_service[family])
        )
        return Snapshot(state, None if full else frozenset(dirty), triggers)

    def _endpoints_for(
        self, key: NamespacedName, family: IPFamily
    ) -> dict[ServicePortName, tuple[Endpoint, ...]]:
        slices = self._slices.get(key)
        if slices:
            sources: Iterable[ParsedSlice] = (slices[n] for n in sorted(slices))
        else:
            sources = self._legacy.get(key, ())
        merged: dict[ServicePortName, dict[str, Endpoint]] = {}
        node_name = self.node_name
        # tuple.__new__ directly: the NamedTuple's own __new__ is a Python frame per call.
        new = tuple.__new__
        for sl in sources:
            if sl.family != family:
                continue
            # Per endpoint once (not per port): the host part of the address and the fields
            # after ``port`` in Endpoint's order. This runs for every endpoint of the cluster.
            prepared = [
                (
                    f"[{se.ip}]" if ":" in se.ip else se.ip,
                    se.ip,
                    (
                        se.ready,
                        se.serving,
                        se.terminating,
                        bool(se.node_name) and se.node_name == node_name,
                        se.zone_hints,
                        se.node_hints,
                        se.node_name,
                        se.zone,
                    ),
                )
                for se in sl.endpoints
            ]
            for sp in sl.ports:
                name = ServicePortName(key.namespace, key.name, sp.name, sp.protocol)
                bucket = merged.setdefault(name, {})
                suffix, port = f":{sp.port}", sp.port
                for host, ip, rest in prepared:
                    address = host + suffix
                    if address not in bucket or rest[3]:  # rest[3]: is_local wins duplicates
                        bucket[address] = new(Endpoint, (address, ip, port, *rest))
        return {
            name: tuple(bucket[a] for a in sorted(bucket))
            for name, bucket in merged.items()
            if bucket
        }
