"""The IPVS applier: brings the kernel's IPVS services, ipsets and ``kube-ipvs0`` addresses to an
:class:`~minikproxy.compile.ipvs.IpvsPlan` over netlink (pyroute2), and the plan's iptables rules
through the iptables runner.

Each apply reads back what the kernel holds (as kube-proxy does) and changes only the difference:
a full apply reads every service, set and address of the family; a partial apply (the plan knows
which service ports changed since the plan last applied) reads back and fixes only what those
ports own, so one endpoint change is one real-server operation. Removed TCP real servers are
terminated gracefully as kube-proxy's ``GracefulTerminationManager`` does: deleted at once when
they hold no connection, else given weight 0 and deleted by :meth:`IpvsApplier.process_terminating`
once their active and inactive connections are gone; UDP and SCTP ones are deleted at once.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import shlex
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from minikproxy.compile.ipvs import (
    DUMMY_DEVICE,
    FILTER_CHAINS,
    IPSETS,
    JUMPS,
    NAT_CHAINS,
    WEIGHT,
    IpsetInfo,
    IpvsJump,
    IpvsPlan,
    RealServer,
    VirtualServer,
    ipset_name,
    ipvsadm_lines,
)
from minikproxy.dataplane.execer import Execer
from minikproxy.dataplane.iptables import IptablesError, IptablesRunner, RealIptables
from minikproxy.dataplane.nsenter import enter_netns
from minikproxy.model.names import IPV4, IPV6, IPFamily

ServiceKey = tuple[str, str, int]  # protocol, address, port
DestKey = tuple[str, int]  # address, port

_PROTO_NUMBERS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
_PROTO_NAMES = {v: k for k, v in _PROTO_NUMBERS.items()}
_FLAG_HASHED = 0x2  # set by the kernel on every service
_FWD_MASQ = 0


class DestState(NamedTuple):
    """A real server as the kernel reports it."""

    weight: int
    active: int
    inactive: int


class ServiceState(NamedTuple):
    """A virtual server's settings as the kernel reports them (kernel-only flags masked)."""

    scheduler: str
    flags: int
    timeout: int


class IpvsKernel(Protocol):
    """What the applier needs from the kernel (netlink), one call per kernel operation."""

    def services(self) -> dict[ServiceKey, ServiceState]: ...
    def service(self, key: ServiceKey) -> ServiceState | None: ...
    def dests(self, key: ServiceKey) -> dict[DestKey, DestState]: ...
    def add_service(self, vs: VirtualServer) -> None: ...
    def update_service(self, vs: VirtualServer) -> None: ...
    def delete_service(self, key: ServiceKey) -> None: ...
    def add_dest(self, key: ServiceKey, rs: RealServer) -> None: ...
    def update_dest(self, key: ServiceKey, rs: RealServer) -> None: ...
    def delete_dest(self, key: ServiceKey, dest: DestKey) -> None: ...
    def set_names(self) -> set[str]: ...
    def create_set(self, name: str, info: IpsetInfo, family: IPFamily) -> None: ...
    def set_entries(self, name: str, info: IpsetInfo) -> set[str]: ...
    def add_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None: ...
    def delete_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None: ...
    def destroy_set(self, name: str) -> None: ...
    def ensure_dummy(self) -> None: ...
    def delete_dummy(self) -> bool: ...
    def addresses(self, family: IPFamily) -> set[str]: ...
    def add_address(self, address: str) -> None:
        """Bind ``address`` to kube-ipvs0; already bound is no error (as kube-proxy's
        ``EnsureAddressBind``), so a partial sync need not read every address first."""
        ...

    def delete_address(self, address: str) -> None: ...


# --- ipset entries <-> netlink -------------------------------------------------------------


def _port_entry(text: str) -> tuple[int, int]:
    proto, _, port = text.partition(":")
    return int(port), _PROTO_NUMBERS[proto.upper()]


def entry_to_netlink(info: IpsetInfo, entry: str) -> tuple[Any, str]:
    """A kube-proxy entry string as pyroute2's (entry, etype) for ``info``'s set type."""
    from pyroute2.ipset import PortEntry

    if info.type == "bitmap:port":
        return int(entry), "port"
    if info.type == "hash:ip":
        return entry, "ip"
    ip, port_text, *rest = entry.split(",")
    port, proto = _port_entry(port_text)
    parts: list[Any] = [ip, PortEntry(port, protocol=proto), *rest]
    etype = {"hash:ip,port": "ip,port", "hash:ip,port,ip": "ip,port,ip"}.get(
        info.type, "ip,port,net"
    )
    return tuple(parts), etype


def entry_from_netlink(info: IpsetInfo, attrs: Mapping[str, Any]) -> str:
    """The kube-proxy entry string of one listed member (``attrs`` by attribute name)."""
    if info.type == "bitmap:port":
        return str(attrs["IPSET_ATTR_PORT_FROM"])
    ip = attrs["IPSET_ATTR_IP_FROM"]
    if info.type == "hash:ip":
        return str(ip)
    proto = _PROTO_NAMES.get(attrs.get("IPSET_ATTR_PROTO", 6), "TCP").lower()
    text = f"{ip},{proto}:{attrs['IPSET_ATTR_PORT_FROM']}"
    if info.type == "hash:ip,port,ip":
        text += f",{attrs['IPSET_ATTR_IP2']}"
    elif info.type == "hash:ip,port,net":
        text += f",{attrs['IPSET_ATTR_IP2']}/{attrs['IPSET_ATTR_CIDR2']}"
    return text


def _nla_ip(value: Any) -> str:
    for _, addr in value["attrs"]:
        return str(addr)
    raise ValueError(f"no address in {value!r}")


_F = TypeVar("_F", bound=Callable[..., Any])


def _in_worker(fn: _F) -> _F:
    """Run the method on the kernel object's own thread (pyroute2 sockets are per thread)."""

    @functools.wraps(fn)
    def wrapper(self: NetlinkIpvsKernel, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is self._thread:
            return fn(self, *args, **kwargs)
        return self._pool.submit(fn, self, *args, **kwargs).result()

    return wrapper  # type: ignore[return-value]


class NetlinkIpvsKernel:
    """:class:`IpvsKernel` over pyroute2 sockets (IPVS generic netlink, ipset, rtnetlink).

    pyroute2 keeps a socket's transport per thread, so every call runs on one worker thread,
    switched into network namespace ``netns`` (a name under /run/netns) when given: the sockets
    are opened there and stay there. ``writes`` counts the operations that changed something.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipvs-netlink")
        try:
            self._pool.submit(self._start, netns).result()
        except BaseException:
            self._pool.shutdown()
            raise
        self.writes = 0
        self._dummy_index: int | None = None

    def _start(self, netns: str | None) -> None:
        from pyroute2 import IPVS, IPRoute, IPSet

        if netns is not None:
            enter_netns(netns)
        self._thread = threading.current_thread()
        self._ipvs = IPVS()
        self._ipset = IPSet()
        self._ipr = IPRoute()

    @_in_worker
    def _close_sockets(self) -> None:
        for sock in (self._ipvs, self._ipset, self._ipr):
            sock.close()

    def close(self) -> None:
        """Close every socket and stop the worker thread."""
        self._close_sockets()
        self._pool.shutdown()

    # --- IPVS ---------------------------------------------------------------------------

    @staticmethod
    def _service_msg(key: ServiceKey, vs: VirtualServer | None = None) -> Any:
        from pyroute2 import IPVSService

        protocol, address, port = key
        fields: dict[str, Any] = {
            "addr": address,
            "port": port,
            "protocol": _PROTO_NUMBERS[protocol],
        }
        if ":" in address:
            # The kernel wants an IPv6 service's prefix length (128) as a host-order u32 in
            # the attribute pyroute2 types as an IPv4 address.
            fields["netmask"] = socket.inet_ntoa(struct.pack("=I", 128))
        if vs is not None:
            fields.update(
                sched_name=vs.scheduler,
                flags={"flags": vs.flags, "mask": 0xFFFFFFFF},
                timeout=vs.timeout,
            )
        return IPVSService(**fields)

    @staticmethod
    def _dest_msg(address: str, port: int, weight: int | None = None) -> Any:
        from pyroute2 import IPVSDest

        fields: dict[str, Any] = {"addr": address, "port": port, "fwd_method": _FWD_MASQ}
        if weight is not None:
            fields["weight"] = weight
        return IPVSDest(**fields)

    @staticmethod
    def _parse_service(msg: Any) -> tuple[ServiceKey, ServiceState]:
        nla = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
        key = (
            _PROTO_NAMES.get(nla.get_attr("IPVS_SVC_ATTR_PROTOCOL"), "TCP"),
            str(nla.get_attr("IPVS_SVC_ATTR_ADDR")),
            int(nla.get_attr("IPVS_SVC_ATTR_PORT")),
        )
        flags = nla.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"] & ~_FLAG_HASHED
        state = ServiceState(
            str(nla.get_attr("IPVS_SVC_ATTR_SCHED_NAME")),
            flags,
            int(nla.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0),
        )
        return key, state

    @_in_worker
    def services(self) -> dict[ServiceKey, ServiceState]:
        out: dict[ServiceKey, ServiceState] = {}
        for msg in self._ipvs.service("dump"):
            if msg.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_FWMARK"):
                continue  # firewall-mark services are never ours
            key, state = self._parse_service(msg)
            out[key] = state
        return out

    @_in_worker
    def service(self, key: ServiceKey) -> ServiceState | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msgs = self._ipvs.service("get", service=self._service_msg(key))
        except NetlinkError as err:
            if err.code in (2, 3):  # ENOENT, ESRCH: no such service
                return None
            raise
        for msg in msgs:
            return self._parse_service(msg)[1]
        return None

    @_in_worker
    def dests(self, key: ServiceKey) -> dict[DestKey, DestState]:
        out: dict[DestKey, DestState] = {}
        for msg in self._ipvs.dest("dump", service=self._service_msg(key)):
            nla = msg.get_attr("IPVS_CMD_ATTR_DEST")
            dest = (
                str(nla.get_attr("IPVS_DEST_ATTR_ADDR")),
                int(nla.get_attr("IPVS_DEST_ATTR_PORT")),
            )
            out[dest] = DestState(
                int(nla.get_attr("IPVS_DEST_ATTR_WEIGHT")),
                int(nla.get_attr("IPVS_DEST_ATTR_ACTIVE_CONNS") or 0),
                int(nla.get_attr("IPVS_DEST_ATTR_INACT_CONNS") or 0),
            )
        return out

    @_in_worker
    def add_service(self, vs: VirtualServer) -> None:
        self.writes += 1
        self._ipvs.service("add", service=self._service_msg(vs.key, vs))

    @_in_worker
    def update_service(self, vs: VirtualServer) -> None:
        self.writes += 1
        self._ipvs.service("set", service=self._service_msg(vs.key, vs))

    @_in_worker
    def delete_service(self, key: ServiceKey) -> None:
        self.writes += 1
        self._ipvs.service("del", service=self._service_msg(key))

    @_in_worker
    def add_dest(self, key: ServiceKey, rs: RealServer) -> None:
        self.writes += 1
        self._ipvs.dest(
            "add",
            service=self._service_msg(key),
            dest=self._dest_msg(rs.address, rs.port, rs.weight),
        )

    @_in_worker
    def update_dest(self, key: ServiceKey, rs: RealServer) -> None:
        self.writes += 1
        self._ipvs.dest(
            "set",
            service=self._service_msg(key),
            dest=self._dest_msg(rs.address, rs.port, rs.weight),
        )

    @_in_worker
    def delete_dest(self, key: ServiceKey, dest: DestKey) -> None:
        self.writes += 1
        self._ipvs.dest("del", service=self._service_msg(key), dest=self._dest_msg(*dest))

    # --- ipset --------------------------------------------------------------------------

    @_in_worker
    def set_names(self) -> set[str]:
        return {str(m.get_attr("IPSET_ATTR_SETNAME")) for m in self._ipset.list()}

    @_in_worker
    def create_set(self, name: str, info: IpsetInfo, family: IPFamily) -> None:
        self.writes += 1
        kwargs: dict[str, Any] = {"stype": info.type, "exclusive": False}
        if info.type == "bitmap:port":
            kwargs["bitmap_ports_range"] = (0, 65535)
        else:
            kwargs.update(
                family=socket.AF_INET6 if family == IPV6 else socket.AF_INET,
                hashsize=1024,
                maxelem=65536,
            )
        self._ipset.create(name, **kwargs)

    @_in_worker
    def set_entries(self, name: str, info: IpsetInfo) -> set[str]:
        out: set[str] = set()
        for msg in self._ipset.list(name):
            adt = msg.get_attr("IPSET_ATTR_ADT")
            if not adt:
                continue
            for data in adt.get_attrs("IPSET_ATTR_DATA"):
                attrs: dict[str, Any] = {}
                for item in data["attrs"]:
                    attr, value = item[0], item[1]
                    attrs[attr] = _nla_ip(value) if isinstance(value, dict) else value
                out.add(entry_from_netlink(info, attrs))
        return out

    @_in_worker
    def add_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None:
        self.writes += 1
        value, etype = entry_to_netlink(info, entry)
        fam = socket.AF_INET6 if family == IPV6 else socket.AF_INET
        self._ipset.add(name, value, family=fam, etype=etype, exclusive=False)

    @_in_worker
    def delete_entry(self, name: str, info: IpsetInfo, entry: str, family: IPFamily) -> None:
        self.writes += 1
        value, etype = entry_to_netlink(info, entry)
        fam = socket.AF_INET6 if family == IPV6 else socket.AF_INET
        self._ipset.delete(name, value, family=fam, etype=etype)

    @_in_worker
    def destroy_set(self, name: str) -> None:
        self.writes += 1
        self._ipset.destroy(name)

    # --- kube-ipvs0 ---------------------------------------------------------------------

    def _index(self) -> int | None:
        found = self._ipr.link_lookup(ifname=DUMMY_DEVICE)
        self._dummy_index = found[0] if found else None
        return self._dummy_index

    @_in_worker
    def ensure_dummy(self) -> None:
        if self._index() is None:
            self.writes += 1
            self._ipr.link("add", ifname=DUMMY_DEVICE, kind="dummy")
            self._index()

    @_in_worker
    def delete_dummy(self) -> bool:
        index = self._index()
        if index is None:
            return False
        self.writes += 1
        self._ipr.link("del", index=index)
        self._dummy_index = None
        return True

    @_in_worker
    def addresses(self, family: IPFamily) -> set[str]:
        index = self._dummy_index if self._dummy_index is not None else self._index()
        if index is None:
            return set()
        fam = socket.AF_INET6 if family == IPV6 else socket.AF_INET
        return {str(a.get_attr("IFA_ADDRESS")) for a in self._ipr.get_addr(index=index, family=fam)}

    @_in_worker
    def add_address(self, address: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        prefix = 128 if ":" in address else 32
        try:
            self._ipr.addr(
                "add", index=self._dummy_index or self._index(), address=address, prefixlen=prefix
            )
        except NetlinkError as err:
            if err.code != errno.EEXIST:
                raise
            return  # bound already: nothing changed
        self.writes += 1

    @_in_worker
    def delete_address(self, address: str) -> None:
        self.writes += 1
        prefix = 128 if ":" in address else 32
        self._ipr.addr(
            "del", index=self._dummy_index or self._index(), address=address, prefixlen=prefix
        )


# --- the applier ---------------------------------------------------------------------------


def _with_jumps(text: str, jumps: Iterable[IpvsJump]) -> str:
    """``text`` (an ``iptables-restore`` input) with ``-I SOURCE 1`` lines for ``jumps`` at the
    end of their tables: prepended in turn, as kube-proxy's EnsureRule(Prepend) does."""
    by_table: dict[str, list[str]] = {}
    for jump in jumps:
        rule = jump.line().replace(f"-A {jump.source} ", f"-I {jump.source} 1 ", 1)
        by_table.setdefault(jump.table, []).append(rule)
    if not by_table:
        return text
    out: list[str] = []
    table = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.strip() == "COMMIT":
            out.extend(by_table.pop(table, []))
        out.append(line)
    if by_table:
        raise ValueError(f"no table {sorted(by_table)} in the iptables rules")
    return "".join(out)


def _family_of(address: str) -> IPFamily:
    return IPV6 if ":" in address else IPV4


def _in_cidrs(address: str, cidrs: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(c, strict=False) for c in cidrs)


@dataclass
class GracefulTermination:
    """Real servers waiting for their connections to end (weight 0), by virtual server."""

    pending: dict[tuple[ServiceKey, DestKey], None] = field(default_factory=dict)

    def __contains__(self, item: tuple[ServiceKey, DestKey]) -> bool:
        return item in self.pending

    def __len__(self) -> int:
        return len(self.pending)


BULK_THRESHOLD = 256
"""A full apply adding at least this many virtual servers, addresses and set entries (an
initial load) hands the additions to :class:`BulkLoader` (one process per tool instead of
one netlink round trip each: ~15x faster through pyroute2, measured in the IPVS VM)."""


class BulkLoader(Protocol):
    """Loads many additions at once with the stock tools (each raises on failure)."""

    def ipvsadm_restore(self, text: str) -> None: ...
    def ipset_restore(self, text: str) -> None: ...
    def ip_batch(self, text: str) -> None: ...


class ExecBulkLoader:
    """:class:`BulkLoader` running ``ipvsadm -R``, ``ipset restore -exist`` and ``ip -batch``
    through an execer (in its network namespace)."""

    def __init__(self, execer: Execer, timeout: float | None = 300.0) -> None:
        self.execer = execer
        self.timeout = timeout

    def _run(self, argv: list[str], text: str) -> None:
        if not text:
            return
        result = self.execer.run(argv, stdin=text.encode(), timeout=self.timeout)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise OSError(f"{' '.join(argv)} exited {result.returncode}: {stderr}")

    def ipvsadm_restore(self, text: str) -> None:
        self._run(["ipvsadm", "-R"], text)

    def ipset_restore(self, text: str) -> None:
        self._run(["ipset", "restore", "-exist"], text)

    def ip_batch(self, text: str) -> None:
        self._run(["ip", "-batch", "-"], text)


class IpvsApplier:
    """Applies one family's :class:`IpvsPlan`: IPVS, ipsets and addresses through ``kernel``
    (large initial additions through ``bulk`` when given), the iptables rules through
    ``iptables``. Raises on failure (the next apply should be full)."""

    def __init__(
        self,
        kernel: IpvsKernel,
        iptables: IptablesRunner,
        family: IPFamily,
        bulk: BulkLoader | None = None,
        *,
        bulk_threshold: int = BULK_THRESHOLD,
    ) -> None:
        self.kernel = kernel
        self.bulk = bulk
        self.bulk_threshold = bulk_threshold
        self.iptables = iptables
        self.family = family
        self.terminating = GracefulTermination()
        self._applied: IpvsPlan | None = None
        self._iptables_text: str | None = None
        # How many service ports want each entry / address / virtual server, for partial applies.
        self._entry_refs: Counter[tuple[str, str]] = Counter()
        self._address_refs: Counter[str] = Counter()
        self._vs_refs: Counter[ServiceKey] = Counter()
        self._set_sizes: Counter[str] = Counter()
        self._iptables_dirty = True
        self._pending_removals: tuple[list[str], list[ServiceKey]] = ([], [])

    # --- sync ---------------------------------------------------------------------------

    def apply(self, plan: IpvsPlan, *, full: bool = False) -> None:
        """Bring the kernel to ``plan``. Partial (only the changed service ports) when the plan
        was compiled from the last applied one and ``full`` is not asked."""
        if plan.options.family != self.family:
            raise ValueError(f"plan is for {plan.options.family}, applier for {self.family}")
        partial = (
            not full
            and self._applied is not None
            and plan.changed is not None
            and plan.options == self._applied.options
        )
        if partial:
            self._apply_partial(plan)
        else:
            self._apply_full(plan)
        self._sync_iptables(plan, full=not partial)
        self._applied = plan
        self.process_terminating()

    def _apply_full(self, plan: IpvsPlan) -> None:
        kernel = self.kernel
        kernel.ensure_dummy()
        existing_sets = kernel.set_names()
        for info in IPSETS:
            name = ipset_name(info.name, self.family)
            if name not in existing_sets:
                kernel.create_set(name, info, self.family)
        current = {k: s for k, s in kernel.services().items() if _family_of(k[1]) == self.family}
        wanted = plan.virtual_servers
        bound = kernel.addresses(self.family)
        entries: list[tuple[IpsetInfo, str, set[str], frozenset[str]]] = []
        for info in IPSETS:
            name = ipset_name(info.name, self.family)
            entries.append(
                (info, name, kernel.set_entries(name, info), plan.ipset_entries[info.name])
            )
        new_services = [vs for key, vs in wanted.items() if key not in current]
        new_addresses = [a for a in plan.bind_addresses if a not in bound]
        new_entries = sum(len(want - have) for _, _, have, want in entries)
        bulk = self.bulk
        if (
            bulk is None
            or len(new_services) + len(new_addresses) + new_entries < self.bulk_threshold
        ):
            bulk = None
        if bulk is not None:
            # An initial load (or a kernel emptied by someone): what is missing goes in with
            # one ipvsadm -R, one ip -batch and one ipset restore, as kube-proxy's users would.
            bulk.ipvsadm_restore("".join(line for vs in new_services for line in ipvsadm_lines(vs)))
            prefix = 128 if self.family == IPV6 else 32
            bulk.ip_batch(
                "".join(f"address add {a}/{prefix} dev {DUMMY_DEVICE}\n" for a in new_addresses)
            )
        for key, vs in wanted.items():
            if bulk is None or key in current:
                self._sync_service(vs, current.get(key))
        if bulk is None:
            for address in new_addresses:
                kernel.add_address(address)
        restore: list[str] = []
        for info, name, have, want in entries:
            for entry in sorted(have - want):
                kernel.delete_entry(name, info, entry, self.family)
            missing = sorted(want - have)
            if bulk is not None:
                restore.extend(f"add {name} {entry}\n" for entry in missing)
                continue
            for entry in missing:
                kernel.add_entry(name, info, entry, self.family)
        if bulk is not None and restore:
            bulk.ipset_restore("".join(restore))
        self._queue_removals(bound - set(plan.bind_addresses), set(current) - set(wanted))
        self._rebuild_refs(plan)

    def _apply_partial(self, plan: IpvsPlan) -> None:
        assert plan.changed is not None
        kernel = self.kernel
        entries_gone: set[tuple[str, str]] = set()
        addresses_gone: set[str] = set()
        vs_gone: set[ServiceKey] = set()
        entries_new: list[tuple[str, str]] = []
        addresses_new: list[str] = []
        touched: dict[ServiceKey, VirtualServer] = {}
        changed = sorted(plan.changed)
        for name in changed:  # first what the old fragments held ...
            old = plan.replaced.get(name)
            if old is None:
                continue
            for item in old.entries:
                self._entry_refs[item] -= 1
                if self._entry_refs[item] <= 0:
                    entries_gone.add(item)
            for address in old.bind_addresses:
                self._address_refs[address] -= 1
                if self._address_refs[address] <= 0:
                    addresses_gone.add(address)
            for vs in old.virtual_servers:
                self._vs_refs[vs.key] -= 1
                if self._vs_refs[vs.key] <= 0:
                    vs_gone.add(vs.key)
        for name in changed:  # ... then what the new ones want (kept if still wanted)
            new = plan.services.get(name)
            if new is None:
                continue
            for item in new.entries:
                if self._entry_refs[item] <= 0:
                    if item in entries_gone:
                        entries_gone.discard(item)
                    else:
                        entries_new.append(item)
                self._entry_refs[item] += 1
            for address in new.bind_addresses:
                if self._address_refs[address] <= 0:
                    if address in addresses_gone:
                        addresses_gone.discard(address)
                    else:
                        addresses_new.append(address)
                self._address_refs[address] += 1
            for vs in new.virtual_servers:
                self._vs_refs[vs.key] += 1
                vs_gone.discard(vs.key)
                touched[vs.key] = vs
        for key, vs in sorted(touched.items()):
            self._sync_service(vs, kernel.service(key))
        for address in addresses_new:  # no read of every bound address: "exists" is fine
            kernel.add_address(address)
        infos = {info.name: info for info in IPSETS}
        sizes = self._set_sizes
        for set_name, entry in entries_new:
            kernel.add_entry(ipset_name(set_name, self.family), infos[set_name], entry, self.family)
            sizes[set_name] += 1
            self._iptables_dirty = self._iptables_dirty or sizes[set_name] == 1
        for set_name, entry in sorted(entries_gone):
            kernel.delete_entry(
                ipset_name(set_name, self.family), infos[set_name], entry, self.family
            )
            sizes[set_name] -= 1
            self._iptables_dirty = self._iptables_dirty or sizes[set_name] == 0
        for item in entries_gone:
            self._entry_refs.pop(item, None)
        for address in addresses_gone:
            self._address_refs.pop(address, None)
        for key in vs_gone:
            self._vs_refs.pop(key, None)
        for name in plan.changed:  # the out-filter rules list these service ports' LBs
            old, new = plan.replaced.get(name), plan.services.get(name)
            if (old is not None and old.out_filter) or (new is not None and new.out_filter):
                self._iptables_dirty = True
        self._queue_removals(addresses_gone, vs_gone)

    def _queue_removals(self, addresses: set[str], services: set[ServiceKey]) -> None:
        """Unbind addresses and delete virtual servers nobody wants after the iptables
        restore, as kube-proxy does (see :meth:`_sync_iptables`)."""
        self._pending_removals = (sorted(addresses), sorted(services))

    def _sync_iptables(self, plan: IpvsPlan, *, full: bool) -> None:
        """Restore the iptables rules when they may differ (a full apply, a set becoming empty
        or non-empty, a load balancer's out-filter entry), then make the queued removals."""
        if full or self._iptables_dirty:
            text = plan.render_iptables(jumps=False)
            if full or text != self._iptables_text:
                # A full apply also prepends the missing jumps, in the same restore: one
                # iptables-save per table instead of an iptables -C (and -I) per jump.
                missing = self._missing_jumps() if full else []
                self.iptables.restore(
                    _with_jumps(text, missing).encode(), noflush=True, counters=False
                )
                self._iptables_text = text
            self._iptables_dirty = False
        addresses, services = self._pending_removals
        self._pending_removals = ([], [])
        for address in addresses:
            self.kernel.delete_address(address)
        excluded = plan.options.exclude_cidrs
        for key in services:
            if excluded and _in_cidrs(key[1], excluded):
                continue
            self.kernel.delete_service(key)
            for item in [p for p in self.terminating.pending if p[0] == key]:
                del self.terminating.pending[item]

    def _missing_jumps(self) -> list[IpvsJump]:
        """The jumps (kube-proxy's ``iptablesJumpChain``) not in their built-in chains."""
        present: set[tuple[str, ...]] = set()
        for table in {jump.table for jump in JUMPS}:
            try:
                saved = self.iptables.save(table).decode()
            except IptablesError as err:
                if "does not exist" in err.stderr:
                    continue  # no such table yet: every jump of it is missing
                # Anything else (a timeout, a busy lock) must fail the sync: taking the
                # jumps as missing would prepend duplicates of them.
                raise
            present.update(
                (table, *shlex.split(line)) for line in saved.splitlines() if line.startswith("-A ")
            )
        return [j for j in JUMPS if (j.table, "-A", j.source, *j.args()) not in present]

    def _sync_service(self, vs: VirtualServer, current: ServiceState | None) -> None:
        """kube-proxy's syncService + syncEndpoint for one virtual server."""
        kernel = self.kernel
        key = vs.key
        if current is None:
            kernel.add_service(vs)
            have: dict[DestKey, DestState] = {}
        else:
            if current != ServiceState(*vs.settings()):
                kernel.update_service(vs)
            have = kernel.dests(key)
        wanted = {dest: RealServer(dest[0], dest[1], WEIGHT) for dest in vs.real_servers}
        for dest, rs in wanted.items():
            state = have.get(dest)
            if state is None:
                kernel.add_dest(key, rs)
            elif state.weight != rs.weight:  # re-added while terminating, or a leftover
                kernel.update_dest(key, rs)
            self.terminating.pending.pop((key, dest), None)
        for dest, state in have.items():
            if dest in wanted or (key, dest) in self.terminating:
                continue
            self._graceful_delete(key, dest, state)

    def _graceful_delete(self, key: ServiceKey, dest: DestKey, state: DestState) -> None:
        if key[0] != "TCP" or state.active + state.inactive == 0:
            self.kernel.delete_dest(key, dest)
            return
        self.kernel.update_dest(key, RealServer(dest[0], dest[1], 0))
        self.terminating.pending[(key, dest)] = None

    def process_terminating(self) -> list[tuple[ServiceKey, DestKey]]:
        """Delete the terminating real servers whose connections are gone; returns them."""
        done: list[tuple[ServiceKey, DestKey]] = []
        by_service: dict[ServiceKey, list[DestKey]] = {}
        for key, dest in self.terminating.pending:
            by_service.setdefault(key, []).append(dest)
        for key, dests in by_service.items():
            have = self.kernel.dests(key) if self.kernel.service(key) is not None else {}
            for dest in dests:
                state = have.get(dest)
                if state is not None and state.active + state.inactive != 0:
                    continue
                if state is not None:
                    self.kernel.delete_dest(key, dest)
                del self.terminating.pending[(key, dest)]
                done.append((key, dest))
        return done

    def _rebuild_refs(self, plan: IpvsPlan) -> None:
        self._entry_refs = Counter(e for svc in plan.services.values() for e in svc.entries)
        self._address_refs = Counter(
            a for svc in plan.services.values() for a in svc.bind_addresses
        )
        self._vs_refs = Counter(
            vs.key for svc in plan.services.values() for vs in svc.virtual_servers
        )
        self._set_sizes = Counter(
            {name: len(entries) for name, entries in plan.ipset_entries.items()}
        )

    # --- cleanup ------------------------------------------------------------------------

    def cleanup(self, exclude_cidrs: Iterable[str] = ()) -> list[str]:
        """Remove this family's IPVS state: virtual servers (except those in
        ``exclude_cidrs``), addresses, jump rules, chains and ipsets; safe to repeat. The
        dummy device goes with :func:`delete_dummy`. Returns what was removed."""
        removed: list[str] = []
        excluded = tuple(exclude_cidrs)
        for key in sorted(self.kernel.services()):
            if _family_of(key[1]) != self.family or (excluded and _in_cidrs(key[1], excluded)):
                continue
            self.kernel.delete_service(key)
            removed.append(f"ipvs service {key[0]} {key[1]}:{key[2]}")
        for address in sorted(self.kernel.addresses(self.family)):
            self.kernel.delete_address(address)
            removed.append(f"address {address} on {DUMMY_DEVICE}")
        for jump in JUMPS:
            if not self.iptables.chain_exists(jump.table, jump.target):
                continue  # no chain, so no rule jumping to it
            if self.iptables.delete_rule(jump.table, jump.source, jump.args()):
                removed.append(f"{jump.table} {jump.source} jump to {jump.target}")
        for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
            present = [c for c in chains if self.iptables.chain_exists(table, c)]
            for chain in present:
                self.iptables.flush_chain(table, chain)
            for chain in present:
                self.iptables.delete_chain(table, chain)
                removed.append(f"{table} chain {chain}")
        names = self.kernel.set_names()
        for info in IPSETS:
            name = ipset_name(info.name, self.family)
            if name in names:
                self.kernel.destroy_set(name)
                removed.append(f"ipset {name}")
        self.terminating.pending.clear()
        self._applied = None
        self._iptables_text = None
        self._iptables_dirty = True
        return removed


def delete_dummy(kernel: IpvsKernel) -> list[str]:
    """Delete ``kube-ipvs0`` if present (after every family's :meth:`IpvsApplier.cleanup`)."""
    return [f"link {DUMMY_DEVICE}"] if kernel.delete_dummy() else []


def ipvs_unavailable(err: BaseException) -> bool:
    """Whether ``err`` (from opening :class:`NetlinkIpvsKernel`) means this kernel has no
    IPVS (the generic netlink family is unknown)."""
    return getattr(err, "code", None) == 2


def remove_ipvs_state(execer: Execer) -> list[str]:
    """Remove every IPVS mode's state (ours and kube-proxy's) in the execer's namespace: all
    virtual servers, ``kube-ipvs0``, the IPVS chains and jumps (nf_tables backend) and the
    ipsets, both families. Nothing to do on a kernel without IPVS."""
    try:
        kernel = NetlinkIpvsKernel(getattr(execer, "netns", None))
    except Exception as err:
        if ipvs_unavailable(err):
            return []
        raise
    try:
        removed: list[str] = []
        for family in (IPV4, IPV6):
            ipt = RealIptables(execer, family, "nft")
            removed += [f"{line} ({family})" for line in IpvsApplier(kernel, ipt, family).cleanup()]
        return removed + delete_dummy(kernel)
    finally:
        kernel.close()
