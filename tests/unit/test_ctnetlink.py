"""The ctnetlink codec on bytes: messages captured from a 6.18 kernel, messages encoded here in
the kernel's layout (property-tested), and the request/acknowledgement logic of batched
deletions over a scripted socket."""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from minikproxy.ctreconcile import frontend, is_stale, stale_rows
from minikproxy.dataplane import ctnetlink as ct
from minikproxy.dataplane.ctnetlink import (
    CtNetlink,
    CtNetlinkError,
    UdpDump,
    delete_attributes,
    encode_tuple,
    pack_port,
    udp_dump_request,
)
from minikproxy.model.names import IPFamily

# One UDP flow message of a dump, as the kernel sent it: 10.1.0.107:1058 -> 10.96.0.10:53,
# DNATed to 10.244.0.3:5353 (status, mark, id, use, timeout and a nested attribute follow).
KERNEL_FLOW = bytes.fromhex(
    "c00000000001220053c3000020610000020000003400018014000180080001000a01006b080002000a60000a"
    "1c0002800500010011000000060002000422000006000300003500003400028014000180080001000af40003"
    "080002000a01006b1c00028005000100110000000600020014e9000006000300042200000800030000000008"
    "080008000000000008000c00be62be2408000b000000000108000700000002571c0018800800010000000000"
    "08000200000000000800030000000000"
)
# The same shape with a zone inside the original tuple (CTA_TUPLE_ZONE, ``--orig-zone 4``):
# 10.1.0.1:1000 -> 10.96.0.21:53, DNATed to 10.244.0.3:8053. Not the fast parser's layout.
KERNEL_ZONED_FLOW = bytes.fromhex(
    "c80000000001220001000000d5540000020000003c00018014000180080001000a010001080002000a600015"
    "1c00028005000100110000000600020003e80000060003000035000006000300000400003400028014000180"
    "080001000af40003080002000a0100011c0002800500010011000000060002001f7500000600030003e80000"
    "0800030000000008080008000000000008000c0030d9cb5b08000b000000000108000700000000631c001880"
    "080001000000000008000200000000000800030000000000"
)
DONE = struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, 1, 0, 0)


def text(row: Any) -> tuple[str, int, str, int, str, int]:
    return (
        str(ipaddress.ip_address(row[1])),
        int.from_bytes(row[3], "big"),
        str(ipaddress.ip_address(row[2])),
        int.from_bytes(row[4], "big"),
        str(ipaddress.ip_address(row[5])),
        int.from_bytes(row[6], "big"),
    )


def test_dump_request_filters_udp_in_the_kernel() -> None:
    request = udp_dump_request("IPv6", seq=7)
    assert request.hex() == (
        "30000000"
        "0101"
        "0103"
        "07000000"
        "00000000"  # nlmsghdr: CT_GET, REQUEST|DUMP, seq 7
        "0a000000"  # nfgenmsg: AF_INET6, version 0
        "10000180"
        "0c000280"
        "05000100"
        "11000000"  # CTA_TUPLE_ORIG{PROTO{NUM=17}}
        "0c001980"
        "08000100"
        "08000000"  # CTA_FILTER{ORIG_FLAGS=CTA_FILTER_FLAG(PROTO_NUM)}
    )
    unfiltered = udp_dump_request("IPv4", seq=1, kernel_filter=False)
    assert len(unfiltered) == 20 and unfiltered[16] == 2


def test_kernel_message_parses_on_the_fast_path() -> None:
    dump = UdpDump([KERNEL_FLOW + DONE], "IPv4")
    assert [text(r) for r in dump.rows] == [
        ("10.1.0.107", 1058, "10.96.0.10", 53, "10.244.0.3", 5353)
    ]
    assert isinstance(dump.rows[0][0], bytes)  # the fast path's locator
    ((chunk, start),) = dump.locate(dump.rows)
    assert start == 0
    attrs = delete_attributes(chunk, start)
    assert attrs == KERNEL_FLOW[20:72] + bytes.fromhex("08000c00be62be24")  # orig tuple, id


def test_zoned_kernel_message_parses_on_the_walk() -> None:
    dump = UdpDump([KERNEL_FLOW + KERNEL_ZONED_FLOW + DONE], "IPv4")
    assert [text(r) for r in dump.rows] == [
        ("10.1.0.107", 1058, "10.96.0.10", 53, "10.244.0.3", 5353),
        ("10.1.0.1", 1000, "10.96.0.21", 53, "10.244.0.3", 8053),
    ]
    refs = dump.locate(dump.rows)
    assert [start for _, start in refs] == [0, len(KERNEL_FLOW)]
    zoned = delete_attributes(*refs[1])
    assert zoned == KERNEL_ZONED_FLOW[20:80] + bytes.fromhex("08000c0030d9cb5b")
    assert UdpDump([KERNEL_FLOW], "IPv6").rows == []  # another family's messages


def test_locate_follows_rows_across_chunks_and_identical_twins() -> None:
    """Twins (same tuples, other zones) are selected together, and each finds its message."""
    twin = bytearray(KERNEL_FLOW)
    twin[-48:-44] = b"\x08\x00\x12\x00"  # same tuples, another attribute where the id was
    dump = UdpDump([KERNEL_FLOW + bytes(twin), bytes(twin) + DONE], "IPv4")
    assert len(dump) == 3
    refs = dump.locate(dump.rows)
    assert [(dump.chunks.index(c), s) for c, s in refs] == [(0, 0), (0, 192), (1, 0)]


def test_a_failed_dump_raises_without_falling_back() -> None:
    class Refusing(ScriptedSocket):
        def send(self, data: bytes) -> int:
            self.sent.append(data)
            seq = struct.unpack_from("=I", data, 8)[0]
            error = struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, seq, 0, -errno.EPERM)
            self.replies.append(error + data[:16])
            return len(data)

    sock = Refusing()
    try:
        CtNetlink(sock).dump_udp("IPv4")  # type: ignore[arg-type]
    except CtNetlinkError as err:
        assert err.errno == errno.EPERM and len(sock.sent) == 1
    else:
        raise AssertionError("no error raised")


# --- messages encoded in the kernel's layout -------------------------------------------------

ips_v4 = st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big"))
ips_v6 = st.integers(0, 2**128 - 1).map(lambda n: n.to_bytes(16, "big"))
ports = st.integers(1, 65535).map(pack_port)


def kernel_message(
    family: IPFamily, flow: tuple[bytes, ...], *, zone: int, flow_id: int, tuple_zone: bool
) -> bytes:
    """A flow message as ctnetlink_fill_info lays it out (the attributes that matter)."""
    osrc, sport, odst, dport, rsrc, rsport = flow
    orig = encode_tuple(ct.CTA_TUPLE_ORIG, family, osrc, odst, sport, dport)
    if tuple_zone:  # a direction-specific zone: CTA_TUPLE_ZONE inside the tuple
        inner = orig[4:] + ct._attr(ct.CTA_TUPLE_ZONE, struct.pack(">H", zone))
        orig = ct._attr(ct.CTA_TUPLE_ORIG | ct.NLA_F_NESTED, inner)
    reply = encode_tuple(ct.CTA_TUPLE_REPLY, family, rsrc, osrc, rsport, sport)
    body = orig + reply + ct._attr(ct.CTA_STATUS, struct.pack(">I", 0x188))
    if zone and not tuple_zone:
        body += ct._attr(ct.CTA_ZONE, struct.pack(">H", zone))
    body += ct._attr(ct.CTA_ID, struct.pack(">I", flow_id))
    body += ct._attr(ct.CTA_TIMEOUT, struct.pack(">I", 30))
    payload = struct.pack("=BBH", ct.AF[family], 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), ct.CT_NEW, ct.NLM_F_MULTI, 1, 0) + payload


@st.composite
def dumps(draw: st.DrawFn) -> tuple[IPFamily, list[tuple[bytes, ...]], list[bytes], list[bytes]]:
    family: IPFamily = draw(st.sampled_from(["IPv4", "IPv6"]))
    ips = ips_v4 if family == "IPv4" else ips_v6
    # Few distinct values, so frontends and backends repeat as in a real table.
    pool = draw(st.lists(ips, min_size=1, max_size=4))
    port_pool = draw(st.lists(ports, min_size=1, max_size=3))
    flow = st.tuples(
        st.sampled_from(pool),
        ports,
        st.sampled_from(pool),
        st.sampled_from(port_pool),
        st.sampled_from(pool),
        st.sampled_from(port_pool),
    )
    flows = draw(st.lists(flow, max_size=30))
    messages = [
        kernel_message(
            family,
            f,
            zone=draw(st.sampled_from([0, 0, 7])),
            flow_id=i,
            tuple_zone=draw(st.booleans()) and draw(st.booleans()),
        )
        for i, f in enumerate(flows)
    ]
    cuts = sorted(draw(st.lists(st.integers(0, len(messages)), max_size=4)))
    chunks = [
        b"".join(messages[a:b]) for a, b in zip([0, *cuts], [*cuts, len(messages)], strict=True)
    ]
    chunks[-1] += DONE
    return family, flows, messages, chunks


@settings(max_examples=150, deadline=None)
@given(dumps(), st.data())
def test_encoded_dumps_parse_select_and_locate_exactly(
    dump_data: tuple[IPFamily, list[tuple[bytes, ...]], list[bytes], list[bytes]],
    data: st.DataObject,
) -> None:
    family, flows, messages, chunks = dump_data
    dump = UdpDump(chunks, family)
    assert [row[1:] for row in dump.rows] == [
        (osrc, odst, sport, dport, rsrc, rsport) for osrc, sport, odst, dport, rsrc, rsport in flows
    ]
    # Any wanted state: the inlined selection is is_stale row by row.
    keys = sorted({(f[2], f[3]) for f in flows} | {(f[4], f[5]) for f in flows})
    wanted = {
        key: frozenset(data.draw(st.lists(st.sampled_from(keys), max_size=3)) if keys else [])
        for key in data.draw(st.lists(st.sampled_from(keys), max_size=4) if keys else st.just([]))
    }
    stale = stale_rows(dump.rows, wanted)
    indices = [i for i, r in enumerate(dump.rows) if is_stale(wanted, (r[2], r[4]), (r[5], r[6]))]
    assert stale == [dump.rows[i] for i in indices]
    # Each stale row leads back to its own message (twins included): tuple, zone and id.
    for index, (chunk, start) in zip(indices, dump.locate(stale), strict=True):
        (length,) = struct.unpack_from("=I", chunk, start)
        assert chunk[start : start + length] == messages[index]
        flow_id = ct._attr(ct.CTA_ID, struct.pack(">I", index))
        assert delete_attributes(chunk, start).endswith(flow_id)


def test_twins_after_a_walked_message_locate_their_own_messages() -> None:
    """Found by the property test: a twin after a message re-parsed attribute by attribute
    (zone inside the tuple) was searched for inside that message and located it again."""
    # 10.0.0.1:1 -> 10.96.0.10:53, answered by 10.244.0.3:5353 (osrc, sport, odst, dport, ...)
    flow = (b"\x0a\x00\x00\x01", b"\x00\x01", b"\x0a\x60\x00\x0a", b"\x00\x35")
    flow += (b"\x0a\xf4\x00\x03", b"\x14\xe9")
    walked = kernel_message("IPv4", flow, zone=7, flow_id=0, tuple_zone=True)
    twins = [kernel_message("IPv4", flow, zone=0, flow_id=i, tuple_zone=False) for i in (1, 2)]
    chunks = [walked + twins[0], twins[1] + DONE]
    dump = UdpDump(chunks, "IPv4")
    refs = dump.locate(dump.rows)
    assert refs == [(chunks[0], 0), (chunks[0], len(walked)), (chunks[1], 0)]


def test_frontend_keys_match_dumped_bytes() -> None:
    dump = UdpDump([KERNEL_FLOW], "IPv4")
    row = dump.rows[0]
    assert (row[2], row[4]) == frontend("10.96.0.10", 53)
    assert (row[5], row[6]) == frontend("10.244.0.3", 5353)


# --- batched requests over a scripted socket -------------------------------------------------


class ScriptedSocket:
    """Stands in for a netlink socket: records sends, answers as the kernel would: one error
    message per failing request (by sequence number), the acknowledgement of the last."""

    def __init__(self, failures: dict[int, int] | None = None) -> None:
        self.sent: list[bytes] = []
        self.failures = failures or {}
        self.replies: list[bytes] = []

    def bind(self, address: object) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        out = b""
        for start, _kind, flags, seq in self.messages(data):
            code = self.failures.get(seq, 0)
            if code or flags & ct.NLM_F_ACK:
                header = data[start : start + 16]
                out += struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, seq, 0, -code) + header
        if out:
            self.replies.append(out)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.replies.pop(0)

    @staticmethod
    def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
        pos = 0
        while pos < len(data):
            length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, pos)
            yield pos, kind, flags, seq
            pos += length


def test_deletes_go_in_few_sends_with_one_ack_and_count_errors() -> None:
    sock = ScriptedSocket({3: errno.ENOENT, 500: errno.EPERM, 900: errno.ENOENT})
    table = CtNetlink(sock)  # type: ignore[arg-type]
    refs = [(KERNEL_FLOW, 0)] * 1000
    result = table.delete("IPv4", refs)
    assert (result.deleted, result.missing, result.errors) == (997, 2, ("Operation not permitted",))
    assert 1 < len(sock.sent) <= 3 and all(len(d) <= 64 * 1024 for d in sock.sent)
    messages = [m for d in sock.sent for m in ScriptedSocket.messages(d)]
    assert len(messages) == 1000
    assert [m[2] & ct.NLM_F_ACK for m in messages].count(ct.NLM_F_ACK) == 1
    assert messages[-1][2] & ct.NLM_F_ACK and {m[1] for m in messages} == {ct.CT_DELETE}


def test_a_dump_falls_back_to_unfiltered_on_an_old_kernel() -> None:
    class OldKernel(ScriptedSocket):
        def send(self, data: bytes) -> int:
            self.sent.append(data)
            seq = struct.unpack_from("=I", data, 8)[0]
            if len(data) > 20:  # a filtered dump: refused as before Linux 5.8
                error = struct.pack("=IHHIIi", 36, ct.NLMSG_ERROR, 0, seq, 0, -errno.EOPNOTSUPP)
                self.replies.append(error + data[:16])
            else:
                done = struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, seq, 0, 0)
                self.replies.append(KERNEL_FLOW + done)
            return len(data)

    sock = OldKernel()
    table = CtNetlink(sock)  # type: ignore[arg-type]
    assert [text(r) for r in table.dump_udp("IPv4").rows] == [
        ("10.1.0.107", 1058, "10.96.0.10", 53, "10.244.0.3", 5353)
    ]
    assert not table.kernel_filter and [len(d) for d in sock.sent] == [48, 20]
    table.dump_udp("IPv4")
    assert [len(d) for d in sock.sent] == [48, 20, 20]  # not asked again


def test_an_interrupted_dump_keeps_what_it_saw_and_other_errors_raise() -> None:
    class Interrupted(ScriptedSocket):
        code = -errno.EINTR

        def send(self, data: bytes) -> int:
            seq = struct.unpack_from("=I", data, 8)[0]
            done = struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, ct.NLM_F_MULTI, seq, 0, self.code)
            self.replies.append(KERNEL_FLOW + done)
            return len(data)

    sock = Interrupted()
    assert len(CtNetlink(sock).dump_udp("IPv4")) == 1  # type: ignore[arg-type]
    sock.code = -errno.ENOMEM
    try:
        CtNetlink(sock).dump_udp("IPv4")  # type: ignore[arg-type]
    except CtNetlinkError as err:
        assert err.errno == errno.ENOMEM
    else:
        raise AssertionError("no error raised")
