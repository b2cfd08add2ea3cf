"""Identity keys of the node-local model, spelled as kube-proxy spells them."""

from __future__ import annotations

from typing import Literal, NamedTuple

IPFamily = Literal["IPv4", "IPv6"]
Protocol = Literal["TCP", "UDP", "SCTP"]

IPV4: IPFamily = "IPv4"
IPV6: IPFamily = "IPv6"
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")


class NamespacedName(NamedTuple):
    """A namespace/name pair; ``str()`` gives ``namespace/name``.

    A NamedTuple (not a dataclass) so hashing, comparison and sorting run in C: these keys
    are used in every dictionary lookup of the model and compilers.
    """

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ServicePortName(NamedTuple):
    """kube-proxy's key of one service port: ``namespace/name:portName`` plus the protocol.

    ``str()`` is kube-proxy's ``ServicePortName.String()``: the port name is left out (with
    its colon) when the port is unnamed. The chain-name hashes are computed from ``str()``
    and the lower-cased protocol. Tuple order is the output order of every compiler.
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
