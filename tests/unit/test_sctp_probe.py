"""The SCTP probe's packet builder (the kernel test proves the node's conntrack accepts it)."""

from __future__ import annotations

import struct

from minikproxy.testing.sctp import crc32c, init_packet


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the catalogue's check value of CRC-32C


def test_init_packet_layout_and_checksum() -> None:
    packet = init_packet(40000, 80, 0x1234567)
    sport, dport, vtag = struct.unpack("!HHI", packet[:8])
    assert (sport, dport, vtag) == (40000, 80, 0)
    chunk_type, _, length, tag = struct.unpack("!BBHI", packet[12:20])
    assert (chunk_type, length, tag, len(packet)) == (1, 20, 0x1234567, 32)
    zeroed = packet[:8] + b"\0\0\0\0" + packet[12:]
    assert struct.unpack("<I", packet[8:12])[0] == crc32c(zeroed)
