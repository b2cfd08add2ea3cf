"""``ProxyState``: the immutable node-local snapshot every compiler reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from minikproxy.model.endpoint import Endpoint
from minikproxy.model.names import IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.serviceport import ServicePort
from minikproxy.model.topology import CategorizedEndpoints, categorize_endpoints


@dataclass(frozen=True)
class ProxyState:
    """All service ports of one IP family with their endpoints, as seen from ``node``.

    ``endpoints`` holds every endpoint of a port, sorted by address; use :meth:`categorize`
    for the subsets each traffic policy uses.
    """

    family: IPFamily
    node: NodeInfo
    services: Mapping[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)
    port_index: Mapping[NamespacedName, tuple[ServicePortName, ...]] | None = None

    @cached_property
    def ports_by_service(self) -> Mapping[NamespacedName, tuple[ServicePortName, ...]]:
        """The port names of each Service (``port_index`` when the tracker supplied it)."""
        if self.port_index is not None:
            return self.port_index
        index: dict[NamespacedName, list[ServicePortName]] = {}
        for name in self.services:
            index.setdefault(name.service, []).append(name)
        return {k: tuple(v) for k, v in index.items()}

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        """All endpoints of a service port (empty if none)."""
        return self.endpoints.get(name, ())

    def categorize(self, port: ServicePort) -> CategorizedEndpoints:
        """kube-proxy's categorisation of ``port``'s endpoints for this node."""
        return categorize_endpoints(
            self.endpoints.get(port.name, ()), port, self.node.name, self.node.zone
        )

    @property
    def total_endpoints(self) -> int:
        """The number of endpoints of all ports (drives kube-proxy's large-cluster mode)."""
        return sum(len(eps) for eps in self.endpoints.values())
