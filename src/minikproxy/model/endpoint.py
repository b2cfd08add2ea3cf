"""One endpoint of one service port, as seen from this node."""

from __future__ import annotations

from typing import NamedTuple

NO_HINTS: frozenset[str] = frozenset()


class Endpoint(NamedTuple):
    """An endpoint with the conditions kube-proxy reads from EndpointSlices.

    ``address`` is kube-proxy's ``Endpoint.String()`` (``net.JoinHostPort``: IPv6 bracketed);
    endpoint chain names are hashed from it. Build with :func:`make_endpoint`. A NamedTuple
    because a cluster has hundreds of thousands of these and they are rebuilt on every slice
    change: creation and comparison run in C.
    """

    address: str
    ip: str
    port: int
    ready: bool
    serving: bool
    terminating: bool
    is_local: bool
    zone_hints: frozenset[str] = NO_HINTS
    node_hints: frozenset[str] = NO_HINTS
    node_name: str = ""
    zone: str = ""

    def __str__(self) -> str:
        return self.address


def join_host_port(ip: str, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def make_endpoint(
    ip: str,
    port: int,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    is_local: bool = False,
    zone_hints: frozenset[str] = NO_HINTS,
    node_hints: frozenset[str] = NO_HINTS,
    node_name: str = "",
    zone: str = "",
) -> Endpoint:
    """An :class:`Endpoint`; ``serving`` defaults to ``ready`` as in EndpointSlices."""
    return Endpoint(
        join_host_port(ip, port),
        ip,
        port,
        ready,
        ready if serving is None else serving,
        terminating,
        is_local,
        zone_hints,
        node_hints,
        node_name,
        zone,
    )
