"""Parsing ``conntrack -L`` output (conntrack-tools), for tests and for people debugging.

minikproxy itself never runs the ``conntrack`` binary: the UDP reconciler talks ctnetlink
(:mod:`minikproxy.dataplane.ctnetlink`). The binary stays in the image for people to inspect
flows with, and the kernel tests' harness reads the node's table through it and this parser,
independently of the code under test.
"""

from __future__ import annotations

import ipaddress
from typing import TypedDict

from minikproxy.model.names import IPFamily

_TUPLE_KEYS = ("src", "dst", "sport", "dport")


class ConntrackFlow(TypedDict):
    """One conntrack entry. ``orig_*`` is the original tuple, ``reply_*`` the reply tuple (for a
    DNATed flow ``reply_src`` is the endpoint). Ports are None for port-less protocols."""

    family: IPFamily
    protocol: str
    timeout: int | None
    state: str | None
    orig_src: str
    orig_dst: str
    orig_sport: int | None
    orig_dport: int | None
    reply_src: str
    reply_dst: str
    reply_sport: int | None
    reply_dport: int | None
    flags: list[str]
    mark: int | None


def ip_family_of(ip: str) -> IPFamily:
    """``"IPv4"`` or ``"IPv6"`` for an address literal; ValueError if it is not one."""
    return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"


def parse_conntrack_output(text: str) -> list[ConntrackFlow]:
    """Parse ``conntrack -L`` output, in the default or ``-o extended`` format.

    Lines without both an original and a reply src/dst pair are skipped.
    """
    flows: list[ConntrackFlow] = []
    for line in text.splitlines():
        flow = parse_conntrack_line(line)
        if flow is not None:
            flows.append(flow)
    return flows


def parse_conntrack_line(line: str) -> ConntrackFlow | None:
    """Parse one ``conntrack -L`` line (see :func:`parse_conntrack_output`); None if it is not
    a flow."""
    tokens = line.split()
    if tokens and tokens[0] in ("ipv4", "ipv6"):
        tokens = tokens[2:]  # "ipv4 2": family name and number (extended format)
    if len(tokens) < 3:
        return None
    protocol, timeout_text = tokens[0], tokens[2]
    tuples: list[dict[str, str]] = [{}, {}]
    flags: list[str] = []
    state: str | None = None
    mark: int | None = None
    for token in tokens[3:]:
        key, sep, value = token.partition("=")
        if sep and key in _TUPLE_KEYS:
            slot = tuples[0] if key not in tuples[0] else tuples[1]
            slot.setdefault(key, value)
        elif sep and key == "mark":
            mark = int(value) if value.isdigit() else None
        elif token.startswith("[") and token.endswith("]"):
            flags.append(token[1:-1])
        elif not sep and state is None and token.isupper():
            state = token
    orig, reply = tuples
    if not all(key in t for t in tuples for key in ("src", "dst")):
        return None
    try:
        family = ip_family_of(orig["src"])
    except ValueError:
        return None
    return ConntrackFlow(
        family=family,
        protocol=protocol,
        timeout=int(timeout_text) if timeout_text.isdigit() else None,
        state=state,
        orig_src=orig["src"],
        orig_dst=orig["dst"],
        orig_sport=_opt_int(orig.get("sport")),
        orig_dport=_opt_int(orig.get("dport")),
        reply_src=reply["src"],
        reply_dst=reply["dst"],
        reply_sport=_opt_int(reply.get("sport")),
        reply_dport=_opt_int(reply.get("dport")),
        flags=flags,
        mark=mark,
    )


def _opt_int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


__all__ = ["ConntrackFlow", "ip_family_of", "parse_conntrack_line", "parse_conntrack_output"]
