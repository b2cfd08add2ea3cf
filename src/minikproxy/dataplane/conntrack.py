"""Targeted conntrack cleanup through the ``conntrack`` tool (conntrack-tools).

kube-proxy deletes stale UDP (and SCTP) flows when a service IP, a NodePort or an endpoint goes
away, so that traffic stops sticking to a DNAT target that no longer exists (kubernetes#48370).
Every deletion here is filtered (by original destination, port, or NAT pair): the table is never
flushed wholesale. ``conntrack -D`` exits 1 with "0 flow entries have been deleted" when nothing
matched; that is success, not an error.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

from minikproxy.dataplane.execer import Execer, ExecError, ExecResult
from minikproxy.model.names import IPFamily

logger = logging.getLogger(__name__)

L4Protocol = Literal["tcp", "udp", "sctp"]
PROTOCOLS: frozenset[str] = frozenset({"tcp", "udp", "sctp"})

_DELETED_RE = re.compile(rb"(\d+) flow entries have been deleted")
_FAMILY_ARG: dict[IPFamily, str] = {"IPv4": "ipv4", "IPv6": "ipv6"}
_TUPLE_KEYS = ("src", "dst", "sport", "dport")


class ConntrackError(RuntimeError):
    """A conntrack command failed; carries argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")


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


class Conntrack(Protocol):
    """Deletes conntrack flows matching one filter; each clear returns how many were deleted."""

    def clear_entries_for_ip(self, ip: str, protocol: str) -> int:
        """Delete ``protocol`` flows whose original destination is ``ip`` (a service IP)."""
        ...

    def clear_entries_for_port(self, port: int, protocol: str, family: IPFamily) -> int:
        """Delete ``protocol`` flows of ``family`` to original destination port ``port``
        (a NodePort)."""
        ...

    def clear_entries_for_nat(self, orig_ip: str, dest_ip: str, protocol: str) -> int:
        """Delete ``protocol`` flows to ``orig_ip`` that were DNATed to ``dest_ip`` (original
        destination ``orig_ip``, reply source ``dest_ip``): flows to a removed endpoint."""
        ...

    def clear_entries_for_port_nat(self, port: int, dest_ip: str, protocol: str) -> int:
        """Delete ``protocol`` flows to original destination port ``port`` (a NodePort) that
        were DNATed to ``dest_ip`` (reply source): NodePort flows to a removed endpoint."""
        ...

    def list_entries(
        self, protocol: str | None = None, family: IPFamily | None = None
    ) -> list[ConntrackFlow]:
        """The flows of ``protocol`` (None: all) in ``family`` (None: both)."""
        ...


def check_protocol(protocol: str) -> str:
    """Return ``protocol`` lowercased; ValueError unless tcp, udp or sctp."""
    lowered = protocol.lower()
    if lowered not in PROTOCOLS:
        raise ValueError(f"unsupported conntrack protocol {protocol!r}")
    return lowered


def ip_family_of(ip: str) -> IPFamily:
    """``"IPv4"`` or ``"IPv6"`` for an address literal; ValueError if it is not one."""
    return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"


def check_port(port: int) -> int:
    """Return ``port``; ValueError unless it is in 1..65535."""
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    return port


class RealConntrack:
    """:class:`Conntrack` running the ``conntrack`` binary through an execer."""

    def __init__(
        self, execer: Execer, *, binary: str = "conntrack", timeout: float | None = 30.0
    ) -> None:
        self.execer = execer
        self.binary = binary
        self.timeout = timeout

    def _run(self, args: Sequence[str]) -> tuple[list[str], ExecResult]:
        argv = [self.binary, *args]
        try:
            return argv, self.execer.run(argv, timeout=self.timeout)
        except (OSError, ExecError) as exc:
            raise ConntrackError(argv, None, str(exc)) from exc

    def _delete(self, args: Sequence[str]) -> int:
        argv, result = self._run(["-D", *args])
        match = _DELETED_RE.search(result.stderr)
        if result.returncode == 0 or (result.returncode == 1 and match and match.group(1) == b"0"):
            deleted = int(match.group(1)) if match else 0
            logger.debug("conntrack %s: %d deleted", args, deleted)
            return deleted
        raise ConntrackError(argv, result.returncode, result.stderr.decode(errors="replace"))

    def clear_entries_for_ip(self, ip: str, protocol: str) -> int:
        """``conntrack -D -f FAMILY -p PROTO --orig-dst IP``."""
        family = _FAMILY_ARG[ip_family_of(ip)]
        return self._delete(["-f", family, "-p", check_protocol(protocol), "--orig-dst", ip])

    def clear_entries_for_port(self, port: int, protocol: str, family: IPFamily) -> int:
        """``conntrack -D -f FAMILY -p PROTO --orig-port-dst PORT``."""
        return self._delete(
            [
                "-f",
                _FAMILY_ARG[family],
                "-p",
                check_protocol(protocol),
                "--orig-port-dst",
                str(check_port(port)),
            ]
        )

    def clear_entries_for_port_nat(self, port: int, dest_ip: str, protocol: str) -> int:
        """``conntrack -D -f FAMILY -p PROTO --orig-port-dst PORT --reply-src DEST``."""
        family = _FAMILY_ARG[ip_family_of(dest_ip)]
        proto = check_protocol(protocol)
        port_arg = str(check_port(port))
        return self._delete(
            ["-f", family, "-p", proto, "--orig-port-dst", port_arg, "--reply-src", dest_ip]
        )

    def clear_entries_for_nat(self, orig_ip: str, dest_ip: str, protocol: str) -> int:
        """``conntrack -D -f FAMILY -p PROTO --orig-dst ORIG --reply-src DEST``."""
        family = ip_family_of(orig_ip)
        if ip_family_of(dest_ip) != family:
            raise ValueError(f"{orig_ip} and {dest_ip} are not of the same IP family")
        return self._delete(
            [
                "-f",
                _FAMILY_ARG[family],
                "-p",
                check_protocol(protocol),
                "--orig-dst",
                orig_ip,
                "--reply-src",
                dest_ip,
            ]
        )

    def list_entries(
        self, protocol: str | None = None, family: IPFamily | None = None
    ) -> list[ConntrackFlow]:
        """``conntrack -L -o extended -f FAMILY [-p PROTO]`` for each family, parsed."""
        flows: list[ConntrackFlow] = []
        families: tuple[IPFamily, ...] = ("IPv4", "IPv6") if family is None else (family,)
        for fam in families:
            args = ["-L", "-o", "extended", "-f", _FAMILY_ARG[fam]]
            if protocol is not None:
                args += ["-p", check_protocol(protocol)]
            argv, result = self._run(args)
            if result.returncode != 0:
                raise ConntrackError(
                    argv, result.returncode, result.stderr.decode(errors="replace")
                )
            flows += parse_conntrack_output(result.stdout.decode(errors="replace"))
        return flows


if TYPE_CHECKING:  # RealConntrack implements Conntrack (checked by mypy)

    def _conforms(execer: Execer) -> Conntrack:
        return RealConntrack(execer)


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


__all__ = [
    "PROTOCOLS",
    "Conntrack",
    "ConntrackError",
    "ConntrackFlow",
    "L4Protocol",
    "RealConntrack",
    "check_port",
    "check_protocol",
    "ip_family_of",
    "parse_conntrack_line",
    "parse_conntrack_output",
]
