"""One endpoint of one service port, as seen from this node."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint (``ip:port``) with the conditions kube-proxy reads from EndpointSlices.

    ``address`` is kube-proxy's ``Endpoint.String()`` (``net.JoinHostPort``): IPv6 addresses are
    bracketed. It is also what endpoint chain names are hashed from.
    """

    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    is_local: bool
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()
    node_name: str = ""
    zone: str = ""

    @property
    def address(self) -> str:
        """``ip:port``, or ``[ip]:port`` for IPv6."""
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def __str__(self) -> str:
        return self.address
