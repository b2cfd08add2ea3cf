"""The node's own IP addresses, read once before compiling (compilers never look them up).

Used to resolve ``--nodeport-addresses`` CIDRs into the addresses NodePorts answer on.
Addresses come from ``ip -j addr show`` (iproute2's JSON output) run through an execer, or,
where a process per call is too much (the conntrack reconciler, after every sync), straight
from rtnetlink with :func:`netlink_addresses`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from typing import Any

from minikproxy.dataplane.execer import Execer, ExecError
from minikproxy.model.names import IPFamily

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_JSON_FAMILY: dict[IPFamily, str] = {"IPv4": "inet", "IPv6": "inet6"}


class NetInfoError(RuntimeError):
    """The node's addresses could not be read."""


def local_addresses(
    execer: Execer, family: IPFamily, *, timeout: float | None = 10.0
) -> list[IPAddress]:
    """Every address of ``family`` configured on any interface of the node, sorted, without
    duplicates (loopback and link-local included, as in kube-proxy's interface scan).

    Raises :class:`NetInfoError` if ``ip`` fails or prints something unparsable.
    """
    argv = ["ip", "-j", "-f", _JSON_FAMILY[family], "addr", "show"]
    try:
        result = execer.run(argv, timeout=timeout)
    except (OSError, ExecError) as exc:
        raise NetInfoError(f"cannot run {' '.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise NetInfoError(f"{' '.join(argv)} exited {result.returncode}: {stderr}")
    return parse_ip_addr_json(result.stdout, family)


def parse_ip_addr_json(output: bytes, family: IPFamily) -> list[IPAddress]:
    """The ``family`` addresses in ``ip -j addr show`` output, sorted and deduplicated."""
    try:
        links: Any = json.loads(output or b"[]")
    except ValueError as exc:
        raise NetInfoError(f"unparsable `ip -j addr show` output: {exc}") from exc
    if not isinstance(links, list):
        raise NetInfoError("unexpected `ip -j addr show` output: not a list")
    wanted = _JSON_FAMILY[family]
    found: set[IPAddress] = set()
    for link in links:
        if not isinstance(link, dict):
            continue
        for info in link.get("addr_info", ()):
            if not isinstance(info, dict) or info.get("family") != wanted:
                continue
            try:
                found.add(ipaddress.ip_address(str(info.get("local", ""))))
            except ValueError as exc:
                raise NetInfoError(f"bad address in `ip -j addr show` output: {exc}") from exc
    return sorted(found, key=int)


_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_AF: dict[IPFamily, int] = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}


def netlink_addresses(family: IPFamily, sock: socket.socket | None = None) -> set[bytes]:
    """Every ``family`` address on any interface of this network namespace, packed (4 or 16
    bytes), from one rtnetlink dump (``RTM_GETADDR``). ``sock``: a NETLINK_ROUTE socket to use
    (and leave open), e.g. one created in another namespace; by default a new one.

    Raises :class:`NetInfoError` if the dump fails."""
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        af = _AF[family]
        request = _HDR.pack(24, _RTM_GETADDR, 0x301, 1, 0) + struct.pack("=BBBBI", af, 0, 0, 0, 0)
        sock.send(request)
        return parse_addr_dump(_recv_dump(sock), af)
    except OSError as exc:
        raise NetInfoError(f"cannot list {family} addresses over rtnetlink: {exc}") from exc
    finally:
        if own:
            sock.close()


def _recv_dump(sock: socket.socket) -> list[bytes]:
    chunks = []
    while True:
        data = sock.recv(65536)
        chunks.append(data)
        pos = 0
        while pos + 16 <= len(data):
            length, kind = _HDR.unpack_from(data, pos)[:2]
            if kind == _NLMSG_DONE:
                return chunks
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, pos + 16)
                if code:
                    raise OSError(-code, "RTM_GETADDR")
                return chunks
            if length < 16:
                break
            pos += (length + 3) & ~3


def parse_addr_dump(chunks: list[bytes], af: int) -> set[bytes]:
    """The addresses (``IFA_LOCAL``, else ``IFA_ADDRESS``) of the ``af`` messages of an
    ``RTM_GETADDR`` dump."""
    found: set[bytes] = set()
    for data in chunks:
        pos = 0
        while pos + 16 <= len(data):
            length, kind = _HDR.unpack_from(data, pos)[:2]
            if length < 16:
                break
            if kind == _RTM_NEWADDR and data[pos + 16] == af:
                values: dict[int, bytes] = {}
                at, end = pos + 24, pos + length
                while at + 4 <= end:
                    alen, atype = _NLA.unpack_from(data, at)
                    if alen < 4:
                        break
                    values[atype & 0x3FFF] = data[at + 4 : at + alen]
                    at += (alen + 3) & ~3
                address = values.get(_IFA_LOCAL) or values.get(_IFA_ADDRESS)
                if address is not None:
                    found.add(address)
            pos += (length + 3) & ~3
    return found


__all__ = [
    "IPAddress",
    "NetInfoError",
    "local_addresses",
    "netlink_addresses",
    "parse_addr_dump",
    "parse_ip_addr_json",
]
