"""Identity keys of the node-local model, spelled as kube-proxy spells them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IPFamily = Literal["IPv4", "IPv6"]
Protocol = Literal["TCP", "UDP", "SCTP"]

IPV4: IPFamily = "IPv4"
IPV6: IPFamily = "IPv6"
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    """A namespace/name pair; ``str()`` gives ``namespace/name``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """kube-proxy's key of one service port: ``namespace/name:portName`` plus the protocol.

    ``str()`` is kube-proxy's ``ServicePortName.String()``: the port name is left out (with
    its colon) when the port is unnamed. The chain-name hashes are computed from ``str()``
    and the lower-cased protocol.
    """

    namespace: str
    name: str
    port: str
    protocol: Protocol

    def __str__(self) -> str:
        if self.port:
            return f"{self.namespace}/{self.name}:{self.port}"
        return f"{self.namespace}/{self.name}"

    @property
    def service(self) -> NamespacedName:
        """The Service this port belongs to."""
        return NamespacedName(self.namespace, self.name)
