"""The node-local view of one service port, parsed once from a v1 Service."""

from __future__ import annotations

from dataclasses import dataclass

from minikproxy.model.names import IPFamily, ServicePortName

DEFAULT_STICKY_SECONDS = 10800
"""kube-proxy's default ClientIP affinity timeout (3 hours)."""


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything a proxy mode needs to know about one service port in one IP family.

    Addresses are canonical strings of ``family`` only (a dual-stack Service yields one
    ``ServicePort`` per family). Source ranges are canonical CIDR strings.
    """

    name: ServicePortName
    family: IPFamily
    cluster_ip: str
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_vips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity_client_ip: bool = False
    sticky_max_age_seconds: int = DEFAULT_STICKY_SECONDS
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0
    traffic_distribution: str = ""

    @property
    def protocol(self) -> str:
        """``TCP``, ``UDP`` or ``SCTP``."""
        return self.name.protocol

    @property
    def externally_accessible(self) -> bool:
        """True if the port has a NodePort, external IPs or load-balancer IPs."""
        return bool(self.node_port or self.external_ips or self.load_balancer_vips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """True if some traffic to this port uses cluster-wide endpoints.

        Even with ``externalTrafficPolicy: Local``, external traffic from pods and from the
        node itself is short-circuited to the cluster-wide endpoints, as in kube-proxy.
        """
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        """True if some traffic to this port uses only this node's endpoints."""
        return self.internal_policy_local or (
            self.externally_accessible and self.external_policy_local
        )
