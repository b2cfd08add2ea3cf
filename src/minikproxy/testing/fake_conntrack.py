"""An in-memory :class:`~minikproxy.ctreconcile.UdpFlowTable`: UDP flows held per family.

Seed it with :func:`udp_flow` (address literals in, packed flows held), run the reconciler,
then read what is left with :meth:`FakeFlowTable.remaining` (as text) and what was deleted in
:attr:`FakeFlowTable.deleted`. ``fail_next`` makes the next dump raise, as a netlink error
would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minikproxy.dataplane.ctnetlink import DeleteResult, FlowRow, UdpFlow, pack_port
from minikproxy.model.names import IPFamily


def _pack(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def _family(flow: UdpFlow) -> IPFamily:
    return "IPv4" if len(flow.frontend[0]) == 4 else "IPv6"


def udp_flow(
    src: str,
    sport: int,
    dst: str,
    dport: int,
    *,
    reply_src: str | None = None,
    reply_sport: int | None = None,
) -> UdpFlow:
    """A UDP flow from ``src:sport`` to ``dst:dport``, answered by ``reply_src:reply_sport``
    (its DNAT target; default: not DNATed, answered by the destination itself)."""
    return UdpFlow(
        (_pack(src), pack_port(sport)),
        (_pack(dst), pack_port(dport)),
        (
            _pack(reply_src or dst),
            pack_port(reply_sport if reply_sport is not None else dport),
        ),
    )


def describe(flow: UdpFlow) -> str:
    """``"SRC:SPORT>DST:DPORT@REPLYSRC:REPLYSPORT"``, for assertions."""

    def text(ip_port: tuple[bytes, bytes]) -> str:
        ip = ipaddress.ip_address(ip_port[0])
        port = int.from_bytes(ip_port[1], "big")
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"

    return f"{text(flow.origin)}>{text(flow.frontend)}@{text(flow.backend)}"


@dataclass
class FakeDump:
    """A dump: rows whose locator is the flow's index in the table at dump time."""

    family: IPFamily
    rows: list[FlowRow]


@dataclass
class FakeFlowTable:
    """UDP flows of both families; ``addresses`` are the node's (packed) per family."""

    flows: list[UdpFlow] = field(default_factory=list)
    addresses: dict[IPFamily, set[bytes]] = field(default_factory=dict)
    deleted: list[UdpFlow] = field(default_factory=list)
    dumps: int = 0
    fail_next: Exception | None = None

    def add(self, *flows: UdpFlow) -> None:
        """Add flows (as the kernel would when traffic passes)."""
        self.flows.extend(flows)

    def set_addresses(self, family: IPFamily, ips: Iterable[str]) -> None:
        """The node's ``family`` addresses."""
        self.addresses[family] = {_pack(ip) for ip in ips}

    def remaining(self) -> set[str]:
        """The held flows, described."""
        return {describe(flow) for flow in self.flows}

    def dump_udp(self, family: IPFamily) -> FakeDump:
        """The held flows of ``family`` as rows."""
        self.dumps += 1
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        rows: list[FlowRow] = [
            (i, f.origin[0], f.frontend[0], f.origin[1], f.frontend[1], f.backend[0], f.backend[1])
            for i, f in enumerate(self.flows)
            if _family(f) == family
        ]
        return FakeDump(family, rows)

    def delete_rows(self, dump: FakeDump, rows: Sequence[FlowRow]) -> DeleteResult:
        """Remove the flows of ``rows``."""
        doomed = {row[0] for row in rows}
        self.deleted += [f for i, f in enumerate(self.flows) if i in doomed]
        self.flows = [f for i, f in enumerate(self.flows) if i not in doomed]
        return DeleteResult(len(doomed), 0, ())

    def local_addresses(self, family: IPFamily) -> set[bytes]:
        """The configured addresses of ``family``."""
        return set(self.addresses.get(family, ()))

    def close(self) -> None:
        """Nothing to release."""


if TYPE_CHECKING:
    from minikproxy.ctreconcile import UdpFlowTable

    _: UdpFlowTable = FakeFlowTable()

__all__ = ["FakeDump", "FakeFlowTable", "describe", "udp_flow"]
