"""SCTP probes for kernels without SCTP sockets (tests only).

The test kernel has no ``sctp`` module, so no SCTP socket can connect. A probe therefore
sends one SCTP INIT chunk from a raw IP socket in the source namespace and captures, with a
packet socket on the destination namespace's interface, the packet that arrives: its
destination address and port show where the node's DNAT sent it (the node's conntrack NATs
SCTP and rewrites the CRC32c checksum). No answer is expected.

Example::

    landed = sctp_probe(topo.namespaces["client"], topo.namespaces["backend"], "10.96.0.10", 80)
    assert landed[0] is not None and landed[0][0] in backends
"""

from __future__ import annotations

import secrets
import select
import socket
import struct
import time

from minikproxy.dataplane.nsenter import run_in_netns

IPPROTO_SCTP = 132
_ETH_P_ALL = 0x0003
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_CRC32C_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as SCTP's checksum (RFC 9260, appendix A)."""
    if not _CRC32C_TABLE:
        for n in range(256):
            c = n
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC32C_TABLE.append(c)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def init_packet(source_port: int, dest_port: int, initiate_tag: int) -> bytes:
    """An SCTP packet holding one INIT chunk (no parameters), checksum included."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, initiate_tag, 65535, 1, 1, initiate_tag)
    header = struct.pack("!HHII", source_port, dest_port, 0, 0)
    packet = header + chunk
    checksum = crc32c(packet)
    # The checksum is stored in network order of its little-endian CRC bytes (RFC 9260 B).
    return packet[:8] + struct.pack("<I", checksum) + packet[12:]


def _parse(frame: bytes) -> tuple[str, int, int] | None:
    """(destination address, destination port, INIT initiate tag) of an SCTP INIT frame."""
    ethertype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if ethertype == _ETH_IPV4 and len(ip) >= 20 and ip[9] == IPPROTO_SCTP:
        dst, payload = socket.inet_ntop(socket.AF_INET, ip[16:20]), ip[(ip[0] & 0xF) * 4 :]
    elif ethertype == _ETH_IPV6 and len(ip) >= 40 and ip[6] == IPPROTO_SCTP:
        dst, payload = socket.inet_ntop(socket.AF_INET6, ip[24:40]), ip[40:]
    else:
        return None
    if len(payload) < 20 or payload[12] != 1:  # not an INIT chunk
        return None
    port = struct.unpack("!H", payload[2:4])[0]
    return dst, port, struct.unpack("!I", payload[16:20])[0]


def sctp_probe(
    source_ns: str,
    sink_ns: str,
    dst: str,
    port: int,
    *,
    count: int = 1,
    sink_interface: str = "eth0",
    timeout: float = 1.0,
) -> list[tuple[str, int] | None]:
    """Send ``count`` SCTP INITs (new associations) to ``dst:port`` from ``source_ns``;
    return, for each, the destination address and port it arrived with on ``sink_ns``'s
    ``sink_interface``, or None if it did not arrive within ``timeout`` seconds (dropped,
    rejected or routed elsewhere)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET

    def open_sink() -> socket.socket:
        sink = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        sink.bind((sink_interface, 0))
        return sink

    sink = run_in_netns(sink_ns, open_sink)
    try:
        sender = run_in_netns(
            source_ns, lambda: socket.socket(family, socket.SOCK_RAW, IPPROTO_SCTP)
        )
        tags = [secrets.randbits(31) | 1 for _ in range(count)]
        with sender:
            for tag in tags:
                sport = secrets.randbelow(20000) + 40000
                sender.sendto(init_packet(sport, port, tag), (dst, 0))
        arrived: dict[int, tuple[str, int]] = {}
        deadline = time.monotonic() + timeout
        while len(arrived) < count and (left := deadline - time.monotonic()) > 0:
            if not select.select([sink], [], [], left)[0]:
                break
            parsed = _parse(sink.recv(65535))
            if parsed is not None:
                arrived[parsed[2]] = (parsed[0], parsed[1])
        return [arrived.get(tag) for tag in tags]
    finally:
        sink.close()


__all__ = ["IPPROTO_SCTP", "crc32c", "init_packet", "sctp_probe"]
