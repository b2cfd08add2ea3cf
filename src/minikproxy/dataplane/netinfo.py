"""The node's own IP addresses, read once before compiling (compilers never look them up).

Used to resolve ``--nodeport-addresses`` CIDRs into the addresses NodePorts answer on.
Addresses come from ``ip -j addr show`` (iproute2's JSON output) run through an execer.
"""

from __future__ import annotations

import ipaddress
import json
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


__all__ = ["IPAddress", "NetInfoError", "local_addresses", "parse_ip_addr_json"]
