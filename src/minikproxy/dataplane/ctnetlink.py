"""Conntrack over netlink (ctnetlink), without the ``conntrack`` binary and without a process.

Just what the UDP reconciler needs, hand-encoded with :mod:`struct`:

* :meth:`CtNetlink.dump_udp` lists one family's UDP flows in one dump, filtered by the kernel
  (``CTA_FILTER`` on the L4 protocol, the family from the request header), so TCP flows never
  reach Python. The flows come back as rows (:data:`FlowRow`) whose addresses and ports stay
  packed (network byte order ``bytes``): the reconciler compares them with packed keys, and an
  address is never turned into text.
* :meth:`CtNetlink.delete` deletes flows in batched netlink messages: many delete requests per
  ``sendmsg``, only the last one asking for an acknowledgement; the kernel answers errors only.
  Each request carries the flow's original tuple, zone and conntrack id, copied verbatim from
  the dumped message, so a flow that was replaced since the dump (same tuple, new id) is not
  deleted.
* :meth:`CtNetlink.create` inserts flows (tests and benchmarks build tables with it).

The dump parser matches the exact layout kernels emit for a UDP flow's two tuples with one
compiled regular expression over each received chunk (``findall``, in C), and counts the
chunk's original-tuple signatures: if some tuple did not match (a zone inside the tuples, an
attribute a future kernel adds), that chunk is parsed by a general attribute walk instead. Both
give the same rows.

Kernel filtering of dumps (``CTA_FILTER``) exists since Linux 5.8; older kernels reject it with
EOPNOTSUPP/EINVAL, and :meth:`CtNetlink.dump_udp` then dumps the family unfiltered and skips
non-UDP flows itself.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from minikproxy.dataplane.closing import Closing
from minikproxy.dataplane.netinfo import netlink_addresses
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.names import IPFamily

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_TIMEOUT = 7
CTA_ID = 12
CTA_ZONE = 18
CTA_FILTER = 25
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_FLAG_CTA_PROTO_NUM = 1 << 3

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
IPPROTO_UDP = 17
IPS_CONFIRMED = 1 << 3
IPS_DST_NAT = 1 << 5

AF: dict[IPFamily, int] = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}
_IP_LEN: dict[IPFamily, int] = {"IPv4": 4, "IPv6": 16}

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, always 0 here)
_ERRNO = struct.Struct("=i")
_SEND_CHUNK = 64 * 1024
_RECV_SIZE = 256 * 1024
_RCVBUF = 4 * 1024 * 1024
_TIMEOUT = 10.0


class CtNetlinkError(OSError):
    """A ctnetlink request failed (``errno`` is set)."""


FlowRef = tuple[bytes, int]
"""Where a flow's message starts in a received dump chunk: (chunk, offset)."""

FlowRow = tuple[Any, bytes, bytes, bytes, bytes, bytes, bytes]
"""One dumped UDP flow, packed: (locator, orig src IP, orig dst IP, orig src port, orig dst
port, reply src IP, reply src port). IPs are 4 or 16 bytes, ports 2 bytes, network order.
The locator is private to :class:`UdpDump` (it finds the flow's message again)."""


class UdpFlow(NamedTuple):
    """One UDP conntrack flow, addresses and ports packed in network byte order.

    ``frontend`` is the original destination (IP, port): a Service IP or a node address and
    NodePort for Service traffic. ``backend`` is the reply source (IP, port): the endpoint a
    DNATed flow goes to (for a flow that was not DNATed, the frontend itself). ``origin`` is the
    original source.
    """

    origin: tuple[bytes, bytes]
    frontend: tuple[bytes, bytes]
    backend: tuple[bytes, bytes]

    @classmethod
    def of(cls, row: FlowRow) -> UdpFlow:
        """The flow of a dump row."""
        return cls((row[1], row[3]), (row[2], row[4]), (row[5], row[6]))


class DeleteResult(NamedTuple):
    """What a batch of deletions did: deleted, already gone (ENOENT), and other errors."""

    deleted: int
    missing: int
    errors: tuple[str, ...]


def pack_port(port: int) -> bytes:
    """A port as the 2 bytes ctnetlink carries (big-endian)."""
    return port.to_bytes(2, "big")


def _attr(kind: int, payload: bytes) -> bytes:
    pad = -(len(payload)) % 4
    return _NLATTR.pack(4 + len(payload), kind) + payload + b"\0" * pad


def _nested(kind: int, *children: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(children))


def encode_tuple(
    kind: int,
    family: IPFamily,
    src: bytes,
    dst: bytes,
    sport: bytes,
    dport: bytes,
    protocol: int = IPPROTO_UDP,
) -> bytes:
    """A ``CTA_TUPLE_ORIG``/``CTA_TUPLE_REPLY`` attribute of a UDP (or other port-carrying
    ``protocol``) tuple, from packed values."""
    src_type, dst_type = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == "IPv4" else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    return _nested(
        kind,
        _nested(CTA_TUPLE_IP, _attr(src_type, src), _attr(dst_type, dst)),
        _nested(
            CTA_TUPLE_PROTO,
            _attr(CTA_PROTO_NUM, bytes([protocol])),
            _attr(CTA_PROTO_SRC_PORT, sport),
            _attr(CTA_PROTO_DST_PORT, dport),
        ),
    )


def _message(kind: int, flags: int, seq: int, family: IPFamily, body: bytes) -> bytes:
    payload = _NFGENMSG.pack(AF[family], 0, 0) + body
    return _NLMSGHDR.pack(16 + len(payload), kind, flags, seq, 0) + payload


def udp_dump_request(family: IPFamily, seq: int = 1, *, kernel_filter: bool = True) -> bytes:
    """The dump request for ``family``'s flows; with ``kernel_filter``, UDP flows only."""
    body = b""
    if kernel_filter:
        body = _nested(
            CTA_TUPLE_ORIG, _nested(CTA_TUPLE_PROTO, _attr(CTA_PROTO_NUM, bytes([IPPROTO_UDP])))
        ) + _nested(CTA_FILTER, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", 1 << 3)))
    return _message(CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, body)


def _fast_pattern(family: IPFamily) -> re.Pattern[bytes]:
    """Matches the original and reply tuples of a UDP flow in the layout kernels emit (the
    first two attributes of a flow message); groups: both tuples whole, orig src, orig dst,
    orig sport, orig dport, reply src, reply sport."""
    n = _IP_LEN[family]
    src_type, dst_type = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == "IPv4" else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    ip_len = 4 + 2 * (4 + n)
    proto_len = 4 + 8 + 8 + 8
    tuple_len = 4 + ip_len + proto_len
    ip_value, skip_ip = b"(.{%d})" % n, b".{%d}" % n

    def tup(kind: int, capture_dst: bool, capture_dport: bool) -> bytes:
        return b"".join(
            [
                re.escape(_NLATTR.pack(tuple_len, kind | NLA_F_NESTED)),
                re.escape(_NLATTR.pack(ip_len, CTA_TUPLE_IP | NLA_F_NESTED)),
                re.escape(_NLATTR.pack(4 + n, src_type)),
                ip_value,
                re.escape(_NLATTR.pack(4 + n, dst_type)),
                ip_value if capture_dst else skip_ip,
                re.escape(_NLATTR.pack(proto_len, CTA_TUPLE_PROTO | NLA_F_NESTED)),
                re.escape(_NLATTR.pack(5, CTA_PROTO_NUM) + bytes([IPPROTO_UDP])),
                b"...",
                re.escape(_NLATTR.pack(6, CTA_PROTO_SRC_PORT)),
                b"(..)..",
                re.escape(_NLATTR.pack(6, CTA_PROTO_DST_PORT)),
                b"(..).." if capture_dport else b"....",
            ]
        )

    return re.compile(
        b"(" + tup(CTA_TUPLE_ORIG, True, True) + tup(CTA_TUPLE_REPLY, False, False) + b")",
        re.DOTALL,
    )


def _tuple_signature(family: IPFamily) -> bytes:
    """Bytes every original tuple starts with after its length, whatever follows its source
    address: counting them finds flows the fast pattern did not match."""
    n = _IP_LEN[family]
    src_type = CTA_IP_V4_SRC if family == "IPv4" else CTA_IP_V6_SRC
    return (
        struct.pack("=H", CTA_TUPLE_ORIG | NLA_F_NESTED)
        + _NLATTR.pack(4 + 2 * (4 + n), CTA_TUPLE_IP | NLA_F_NESTED)
        + _NLATTR.pack(4 + n, src_type)
    )


_SIGNATURE: dict[IPFamily, bytes] = {f: _tuple_signature(f) for f in ("IPv4", "IPv6")}
_FAST: dict[IPFamily, re.Pattern[bytes]] = {f: _fast_pattern(f) for f in ("IPv4", "IPv6")}


def _attrs(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type without flags, payload start, payload end) of each attribute in data[start:end]."""
    unpack = _NLATTR.unpack_from
    pos = start
    while pos + 4 <= end:
        length, kind = unpack(data, pos)
        if length < 4 or pos + length > end:
            break
        yield kind & NLA_TYPE_MASK, pos + 4, pos + length
        pos += (length + 3) & ~3


def _parse_tuple(data: bytes, start: int, end: int) -> dict[int, bytes] | None:
    """{CTA_IP_*/-CTA_PROTO_* type: value} of a tuple attribute's payload (ports keyed
    negative), None unless it is UDP."""
    values: dict[int, bytes] = {}
    for kind, lo, hi in _attrs(data, start, end):
        if kind == CTA_TUPLE_IP:
            for ip_kind, a, b in _attrs(data, lo, hi):
                values[ip_kind] = data[a:b]
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, a, b in _attrs(data, lo, hi):
                values[-proto_kind] = data[a:b]
    if values.get(-CTA_PROTO_NUM, b"")[:1] != bytes([IPPROTO_UDP]):
        return None
    return values


def parse_flow_message(data: bytes, start: int, end: int, family: IPFamily) -> FlowRow | None:
    """The row of one ctnetlink message (``data[start:end]``, netlink header included) by a
    general attribute walk; None unless it is a UDP flow of ``family``. Its locator is
    ``(None, start)``."""
    if end - start < 20 or data[start + 16] != AF[family]:
        return None
    src_t, dst_t = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == "IPv4" else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    orig = reply = None
    for kind, lo, hi in _attrs(data, start + 20, end):
        if kind == CTA_TUPLE_ORIG:
            orig = _parse_tuple(data, lo, hi)
        elif kind == CTA_TUPLE_REPLY:
            reply = _parse_tuple(data, lo, hi)
    if orig is None or reply is None:
        return None
    try:
        return (
            (None, start),
            orig[src_t],
            orig[dst_t],
            orig[-CTA_PROTO_SRC_PORT],
            orig[-CTA_PROTO_DST_PORT],
            reply[src_t],
            reply[-CTA_PROTO_SRC_PORT],
        )
    except KeyError:
        return None


def _walk_messages(data: bytes, family: IPFamily) -> list[FlowRow]:
    """Every UDP flow row of one chunk, message by message (the exact, slower path)."""
    rows: list[FlowRow] = []
    pos, size = 0, len(data)
    while pos + 16 <= size:
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < 16 or pos + length > size:
            break
        if kind == CT_NEW:
            row = parse_flow_message(data, pos, pos + length, family)
            if row is not None:
                rows.append(row)
        elif kind == NLMSG_ERROR:
            (code,) = _ERRNO.unpack_from(data, pos + 16)
            if code:
                raise CtNetlinkError(-code, f"conntrack dump: {os.strerror(-code)}")
        pos = (pos + length + 3) & ~3
    return rows


def delete_attributes(data: bytes, start: int) -> bytes:
    """The attributes of a delete request for the flow whose message starts at ``start``:
    its original tuple, zone and conntrack id, copied from the message."""
    (length,) = struct.unpack_from("=I", data, start)
    out = []
    for kind, lo, hi in _attrs(data, start + 20, start + length):
        if kind in (CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID):
            out.append(data[lo - 4 : hi] + b"\0" * (-(hi - lo) % 4))
    return b"".join(out)


class UdpDump:
    """The UDP flows of one family from one dump: ``rows`` (see :data:`FlowRow`), in dump
    order, and what :meth:`locate` needs to find their messages again."""

    def __init__(self, chunks: Sequence[bytes], family: IPFamily) -> None:
        self.family = family
        self.chunks = list(chunks)
        self.rows: list[FlowRow] = []
        findall = _FAST[family].findall
        signature = _SIGNATURE[family]
        for index, data in enumerate(self.chunks):
            rows = findall(data)
            # Every original tuple starts with the signature; more signatures than matches
            # means a flow in another layout (a zone inside its tuples): walk this chunk.
            if len(rows) != data.count(signature):
                rows = [((index, loc[1]), *rest) for loc, *rest in _walk_messages(data, family)]
            self.rows += rows

    def __len__(self) -> int:
        return len(self.rows)

    def flows(self) -> list[UdpFlow]:
        """The rows as :class:`UdpFlow` (for reading; the reconciler uses rows)."""
        return [UdpFlow.of(row) for row in self.rows]

    def locate(self, rows: Iterable[FlowRow]) -> list[FlowRef]:
        """Where the messages of ``rows`` start. ``rows`` is a subsequence of :attr:`rows`, in
        order, selected by the rows' addresses and ports: flows with the same tuples (twins in
        different zones) are then selected together, and each finds its own message."""
        refs: list[FlowRef] = []
        chunks = self.chunks
        index, pos = 0, 0
        for row in rows:
            loc = row[0]
            if isinstance(loc, tuple):  # from the message walk: (chunk index, offset)
                index, pos = loc
                refs.append((chunks[index], pos))
                # Past this whole message: a twin's tuple bytes must not be found inside it.
                pos += _NLMSGHDR.unpack_from(chunks[index], pos)[0]
                continue
            while index < len(chunks):
                data = chunks[index]
                found = data.find(loc, pos)
                if found >= 20 and _NLMSGHDR.unpack_from(data, found - 20)[1] == CT_NEW:
                    refs.append((data, found - 20))
                    pos = found + len(loc)
                    break
                if found < 0:
                    index, pos = index + 1, 0
                else:
                    pos = found + 1
            else:
                raise ValueError("a row is not in this dump (or out of order)")
        return refs


def _errors(data: bytes) -> Iterator[tuple[int, int]]:
    """(sequence number, errno) of each netlink error or acknowledgement in ``data``."""
    pos, size = 0, len(data)
    while pos + 16 <= size:
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < 16:
            break
        if kind == NLMSG_ERROR and pos + 20 <= size:
            (code,) = _ERRNO.unpack_from(data, pos + 16)
            # The acknowledged request's header follows: its sequence number is the one
            # that counts (the error message's own is the same, but be exact).
            if pos + 36 <= size:
                seq = _NLMSGHDR.unpack_from(data, pos + 20)[3]
            yield seq, -code
        pos = (pos + length + 3) & ~3


class CtNetlink(Closing):
    """A ctnetlink socket of the network namespace it was created in.

    Not thread-safe: one request at a time. Close it (or use it as a context manager).
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock = sock
        try:
            sock.bind((0, 0))
            # Errors quote only the failed request's header, not the whole request.
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, _RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        except BaseException:
            sock.close()
            raise
        # A reply that never comes (it cannot, but a hung sync thread would be worse) raises
        # socket.timeout, an OSError, like any other failure.
        sock.settimeout(_TIMEOUT)
        self._seq = 0
        self.kernel_filter = True

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _dump(self, request: bytes, seq: int) -> list[bytes]:
        self._sock.send(request)
        chunks: list[bytes] = []
        recv = self._sock.recv
        while True:
            data = recv(_RECV_SIZE)
            chunks.append(data)
            # A dump ends with NLMSG_DONE as the last message of a chunk; a failed dump is
            # one error message.
            if len(data) >= 20:
                length, kind, flags, seq_done, _pid = _NLMSGHDR.unpack_from(data, len(data) - 20)
                if kind == NLMSG_DONE and length == 20 and seq_done == seq and flags & NLM_F_MULTI:
                    # Its payload is the dump's status: EINTR means the table changed under
                    # the dump and some flows may be missing: what was seen is still true.
                    (code,) = _ERRNO.unpack_from(data, len(data) - 4)
                    if code and code != -errno.EINTR:
                        raise CtNetlinkError(-code, f"conntrack dump: {os.strerror(-code)}")
                    return chunks
            if len(data) >= 20:
                _length, kind, _flags, seq_err, _pid = _NLMSGHDR.unpack_from(data, 0)
                if kind == NLMSG_ERROR and seq_err == seq:
                    (code,) = _ERRNO.unpack_from(data, 16)
                    if code:
                        raise CtNetlinkError(-code, f"conntrack dump: {os.strerror(-code)}")
                    return chunks

    def dump_udp(self, family: IPFamily) -> UdpDump:
        """Every UDP flow of ``family`` (one dump; raises :class:`CtNetlinkError`)."""
        if self.kernel_filter:
            seq = self._next_seq()
            try:
                chunks = self._dump(udp_dump_request(family, seq), seq)
            except CtNetlinkError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.kernel_filter = False  # a kernel older than 5.8: filter here
            else:
                return UdpDump(chunks, family)
        seq = self._next_seq()
        chunks = self._dump(udp_dump_request(family, seq, kernel_filter=False), seq)
        return UdpDump(chunks, family)

    def _batch(
        self, family: IPFamily, kind: int, flags: int, bodies: Sequence[bytes]
    ) -> DeleteResult:
        """Send one request per body, many per sendmsg; only the last asks for an ack.

        Returns (done, ENOENT count, other errors) counted over the bodies."""
        if not bodies:
            return DeleteResult(0, 0, ())
        first = self._seq + 1
        messages = []
        for i, body in enumerate(bodies):
            last = i == len(bodies) - 1
            seq = self._next_seq()
            messages.append(_message(kind, flags | (NLM_F_ACK if last else 0), seq, family, body))
        final = self._seq
        pending = b""
        for message in messages:
            if len(pending) + len(message) > _SEND_CHUNK:
                self._sock.send(pending)
                pending = b""
            pending += message
        if pending:
            self._sock.send(pending)
        missing = 0
        errors: list[str] = []
        failed = 0
        while True:
            data = self._sock.recv(_RECV_SIZE)
            done = False
            for seq, code in _errors(data):
                if seq == final:
                    done = True
                if not code or not first <= seq <= final:
                    continue
                failed += 1
                if code == errno.ENOENT:
                    missing += 1
                elif len(errors) < 10:
                    errors.append(os.strerror(code))
            if done:
                break
        return DeleteResult(len(bodies) - failed, missing, tuple(errors))

    def delete(self, family: IPFamily, refs: Iterable[FlowRef]) -> DeleteResult:
        """Delete the dumped flows at ``refs`` (all of ``family``) in batched requests.

        A flow already gone, or replaced by one with the same tuple since the dump, counts as
        ``missing`` (ENOENT), not as an error."""
        bodies = [delete_attributes(data, start) for data, start in refs]
        return self._batch(family, CT_DELETE, NLM_F_REQUEST, bodies)

    def create(
        self,
        family: IPFamily,
        flows: Iterable[tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]],
        *,
        timeout: int = 600,
        protocol: int = IPPROTO_UDP,
    ) -> DeleteResult:
        """Insert flows (UDP by default; TCP is 6) given as packed (origin, frontend, backend)
        triples: traffic from origin to frontend, answered by backend (DNATed when backend
        differs from frontend). Returns how many were created and the errors (EEXIST for
        duplicates)."""
        tail = _attr(CTA_TIMEOUT, struct.pack(">I", timeout))
        bodies = []
        for (src, sport), (dst, dport), (bsrc, bsport) in flows:
            status = IPS_CONFIRMED | (IPS_DST_NAT if (bsrc, bsport) != (dst, dport) else 0)
            bodies.append(
                encode_tuple(CTA_TUPLE_ORIG, family, src, dst, sport, dport, protocol)
                + encode_tuple(CTA_TUPLE_REPLY, family, bsrc, src, bsport, sport, protocol)
                + _attr(CTA_STATUS, struct.pack(">I", status))
                + tail
            )
        return self._batch(family, CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL, bodies)


class NetlinkConntrack:
    """The reconciler's :class:`~minikproxy.ctreconcile.UdpFlowTable` over netlink: ctnetlink
    for flows, rtnetlink for the node's addresses, in the network namespace ``netns`` (a name
    under ``/run/netns``; None: this process's). Sockets open on first use and are reopened
    after any error, so a half-read reply can never leak into the next request."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ct: CtNetlink | None = None
        self._route: socket.socket | None = None

    def _open(self) -> CtNetlink:
        if self._ct is None:
            if self.netns is None:
                self._ct = CtNetlink()
            else:
                self._ct = run_in_netns(self.netns, CtNetlink)
        return self._ct

    def close(self) -> None:
        """Close the sockets (a later call opens new ones)."""
        if self._ct is not None:
            self._ct.close()
            self._ct = None
        if self._route is not None:
            self._route.close()
            self._route = None

    def dump_udp(self, family: IPFamily) -> UdpDump:
        """Every UDP flow of ``family`` (see :meth:`CtNetlink.dump_udp`)."""
        try:
            return self._open().dump_udp(family)
        except BaseException:
            self.close()
            raise

    def delete_rows(self, dump: UdpDump, rows: Sequence[FlowRow]) -> DeleteResult:
        """Delete the flows of ``rows`` of ``dump`` in batched requests."""
        try:
            return self._open().delete(dump.family, dump.locate(rows))
        except BaseException:
            self.close()
            raise

    def local_addresses(self, family: IPFamily) -> set[bytes]:
        """The node's ``family`` addresses, packed (one rtnetlink dump)."""
        if self._route is None:

            def route_socket() -> socket.socket:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

            self._route = (
                route_socket() if self.netns is None else run_in_netns(self.netns, route_socket)
            )
        try:
            return netlink_addresses(family, self._route)
        except BaseException:
            self.close()
            raise
