"""Evaluate IPVS mode's state on a flow: the iptables rules (with their ipset matches), the
addresses bound to ``kube-ipvs0``, and the IPVS virtual servers with their real servers.

The state is what ``render --proxy-mode ipvs`` prints (or the kernel holds: ``ipset save``,
``ipvsadm -S -n``, the addresses of ``kube-ipvs0``, ``iptables-save``). The packet crosses
netfilter as in the kernel: an arriving packet goes through nat PREROUTING, then (its
destination being local: a node address or one bound to ``kube-ipvs0``) filter INPUT, then
IPVS at LOCAL_IN, which schedules it to a real server and sends it on through the LOCAL_OUT
path (filter OUTPUT) and nat POSTROUTING (where ``KUBE-POSTROUTING`` masquerades marked and
hairpin connections); a packet the node sends crosses nat OUTPUT, then IPVS at LOCAL_OUT, then
filter OUTPUT and nat POSTROUTING. Without a virtual server the packet is delivered locally
(or forwarded) as any other.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from minikproxy.compile.ipvs import (
    DUMMY_DEVICE,
    FLAG_PERSISTENT,
    FLAG_SOURCE_HASH,
    IPSETS,
    WEIGHT,
    IpvsPlan,
    VirtualServer,
)
from minikproxy.config import ProxyConfig
from minikproxy.explain.engine import (
    ExplainError,
    Flow,
    Outcome,
    Walk,
    final_verdict,
    run_chains,
    start_flow,
)
from minikproxy.explain.iptables import IptablesRules
from minikproxy.explain.packet import Packet
from minikproxy.explain.reasons import Target
from minikproxy.explain.result import Step, Verdict
from minikproxy.model.endpoint import join_host_port
from minikproxy.model.names import IPFamily, NamespacedName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.state import ProxyState

_FILTER_INPUT = ((0, "filter", "INPUT"),)
_FILTER_FORWARD = ((0, "filter", "FORWARD"),)
_FILTER_OUTPUT = ((0, "filter", "OUTPUT"),)
_NAT_OUTPUT = ((-100, "nat", "OUTPUT"),)
_NAT_PREROUTING = ((-100, "nat", "PREROUTING"),)
_NAT_POSTROUTING = ((100, "nat", "POSTROUTING"),)

_BY_LOAD = ("lc", "wlc", "sed", "nq", "lblc", "lblcr")
_BY_HASH = {"sh": "source address", "dh": "destination address", "mh": "source address"}


@lru_cache(maxsize=65536)
def _canonical(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


@lru_cache(maxsize=65536)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


# --- ipsets ------------------------------------------------------------------------------


class IpsetTable:
    """The ipsets by kernel name: each one's type and entries (``ipset save`` syntax),
    indexed for the ``-m set`` matches of the iptables rules."""

    def __init__(self, sets: Mapping[str, tuple[str, Collection[str]]]) -> None:
        self.sets = sets
        self._index: dict[str, dict[tuple[object, ...], list[tuple[str, str]]]] = {}

    @classmethod
    def from_plan(cls, plan: IpvsPlan) -> IpsetTable:
        """The sets of a compiled plan (every set kube-proxy creates, with its entries)."""
        entries = plan.ipset_entries
        return cls({plan.set_name(info.name): (info.type, entries[info.name]) for info in IPSETS})

    @classmethod
    def from_save(cls, text: str) -> IpsetTable:
        """The sets of ``ipset save`` (or ``ipset restore`` input): ``create``, ``add``."""
        types: dict[str, str] = {}
        entries: dict[str, list[str]] = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "create":
                types[parts[1]] = parts[2]
                entries.setdefault(parts[1], [])
            elif len(parts) >= 3 and parts[0] == "add":
                entries.setdefault(parts[1], []).append(parts[2])
        missing = sorted(set(entries) - set(types))
        if missing:
            raise ExplainError(f"ipset entries of sets never created: {', '.join(missing)}")
        return cls({name: (types[name], entries[name]) for name in types})

    def entries(self, name: str) -> Collection[str]:
        """The entries of set ``name`` (ExplainError when there is no such set)."""
        if name not in self.sets:
            raise ExplainError(f"no ipset {name}")
        return self.sets[name][1]

    def _indexed(self, name: str) -> dict[tuple[object, ...], list[tuple[str, str]]]:
        index = self._index.get(name)
        if index is None:
            kind, entries = self.sets[name]
            index = {}
            for entry in entries:
                key, net = _entry_key(kind, entry)
                index.setdefault(key, []).append((net, entry))
            self._index[name] = index
        return index

    def match(self, name: str, dirs: str, flow: Flow) -> str | None:
        """The entry of set ``name`` that ``flow`` matches in directions ``dirs``, or None."""
        if name not in self.sets:
            raise ExplainError(f"-m set --match-set {name}: no such ipset")
        kind = self.sets[name][0]
        want = dirs.split(",")
        comps = kind.split(":", 1)[1].split(",")
        if len(want) < len(comps):
            raise ExplainError(f"-m set --match-set {name} {dirs}: {kind} needs {len(comps)}")
        key: list[object] = []
        last = ""
        for comp, d in zip(comps, want, strict=False):
            if comp == "port":
                if d != "dst":
                    raise ExplainError(f"{name} {dirs}: source ports are not followed")
                key.extend(("", flow.dport) if kind == "bitmap:port" else (flow.proto, flow.dport))
            elif comp == "ip":
                key.append(flow.dst if d == "dst" else flow.src)
            elif comp == "net":
                last = flow.dst if d == "dst" else flow.src
            else:
                raise ExplainError(f"ipset type {kind} not understood")
        for net, entry in self._indexed(name).get(tuple(key), ()):
            if not net or ipaddress.ip_address(last) in _network(net):
                return entry
        return None


def _entry_key(kind: str, entry: str) -> tuple[tuple[object, ...], str]:
    """The index key of one entry (``10.0.0.1,tcp:80``), and its network for ``net`` types."""
    if kind == "bitmap:port":
        return ("", int(entry)), ""
    parts = entry.split(",")
    comps = kind.split(":", 1)[1].split(",")
    if len(parts) != len(comps):
        raise ExplainError(f"ipset entry {entry!r} does not fit {kind}")
    key: list[object] = []
    net = ""
    for comp, part in zip(comps, parts, strict=True):
        if comp == "ip":
            key.append(_canonical(part))
        elif comp == "port":
            proto, _, port = part.rpartition(":")
            key.extend((proto or "tcp", int(port)))
        elif comp == "net":
            net = part if "/" in part else f"{part}/{128 if ':' in part else 32}"
        else:
            raise ExplainError(f"ipset type {kind} not understood")
    return tuple(key), net


# --- IPVS --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """A real server: address, port, weight and forwarding method (``m`` masquerading)."""

    address: str
    port: int
    weight: int
    method: str = "m"

    @property
    def hostport(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6)."""
        return join_host_port(self.address, self.port)


@dataclass(frozen=True, slots=True)
class Service:
    """An IPVS virtual server: protocol (``TCP``/``UDP``/``SCTP``), VIP, port, scheduler,
    persistence timeout (None: no persistence), and its real servers."""

    protocol: str
    address: str
    port: int
    scheduler: str
    persistence: int | None
    destinations: tuple[Destination, ...]
    text: str

    @classmethod
    def of(cls, vs: VirtualServer) -> Service:
        """The virtual server of a compiled plan (each real server of weight 1)."""
        persistent = vs.timeout if vs.flags & FLAG_PERSISTENT else None
        text = f"-A {_OPT[vs.protocol]} {vs.hostport} -s {vs.scheduler}"
        if persistent is not None:
            text += f" -p {persistent}"
        if vs.flags & FLAG_SOURCE_HASH:
            text += f" -b {vs.scheduler}-port"
        dests = tuple(Destination(a, p, WEIGHT) for a, p in vs.real_servers)
        return cls(vs.protocol, vs.address, vs.port, vs.scheduler, persistent, dests, text)


_OPT = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}
_PROTO = {"-t": "TCP", "--tcp-service": "TCP", "-u": "UDP", "--udp-service": "UDP",
          "--sctp-service": "SCTP"}  # fmt: skip


def _hostport(text: str, line: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ExplainError(f"address not understood in ipvsadm line {line!r}")
    try:
        return _canonical(host.strip("[]")), int(port)
    except ValueError:
        raise ExplainError(f"address not understood in ipvsadm line {line!r}") from None


def parse_ipvsadm(text: str) -> dict[tuple[str, str, int], Service]:
    """The virtual servers of ``ipvsadm -S -n`` output (or ``ipvsadm -R`` input), by
    (protocol, VIP, port)."""
    services: dict[tuple[str, str, int], Service] = {}
    dests: dict[tuple[str, str, int], list[Destination]] = {}
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] in ("-A", "-a") and len(tokens) > 1 and tokens[1] in _FWMARK:
            # A firewall-mark service (keepalived, LVS): never kube-proxy's, and chosen by a
            # mangle-table mark, which explain does not model.
            continue
        if tokens[0] not in ("-A", "-a") or len(tokens) < 3 or tokens[1] not in _PROTO:
            raise ExplainError(f"ipvsadm line not understood: {line!r}")
        key = (_PROTO[tokens[1]], *_hostport(tokens[2], line))
        opts = _options(tokens[3:], line)
        if tokens[0] == "-A":
            timeout = opts.get("-p")
            services[key] = Service(
                key[0],
                key[1],
                key[2],
                opts.get("-s", "wlc"),
                int(timeout) if timeout is not None else None,
                (),
                line.strip(),
            )
            dests.setdefault(key, [])
        else:
            if "-r" not in opts:
                raise ExplainError(f"real server without -r: {line!r}")
            address, port = _hostport(opts["-r"], line)
            method = next((m for m in ("m", "g", "i") if f"-{m}" in opts), "g")
            dests.setdefault(key, []).append(
                Destination(address, port, int(opts.get("-w", "1")), method)
            )
    missing = [k for k in dests if k not in services]
    if missing:
        raise ExplainError(f"real servers of a virtual server never added: {missing[0]}")
    return {
        key: Service(s.protocol, s.address, s.port, s.scheduler, s.persistence,
                     tuple(dests[key]), s.text)
        for key, s in services.items()
    }  # fmt: skip


_VALUED = frozenset({"-s", "-p", "-M", "-b", "--pe", "-r", "-w", "-x", "-y", "--tun-type",
                     "--tun-port"})  # fmt: skip
_FLAGS = frozenset({"-m", "-g", "-i", "--masquerading", "--gatewaying", "--ipip",
                    "--tun-nocsum", "--tun-csum", "--tun-remcsum", "-o", "--ops"})  # fmt: skip
_FWMARK = frozenset({"-f", "--fwmark-service"})


def _options(tokens: list[str], line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-p" and (i + 1 >= len(tokens) or tokens[i + 1].startswith("-")):
            out["-p"] = "300"  # ipvsadm's default persistence timeout
            i += 1
        elif tok in _VALUED:
            if i + 1 >= len(tokens):
                raise ExplainError(f"{tok} needs a value in ipvsadm line {line!r}")
            out[tok] = tokens[i + 1]
            i += 2
        elif tok in _FLAGS:
            out[{"--masquerading": "-m", "--gatewaying": "-g", "--ipip": "-i"}.get(tok, tok)] = ""
            i += 1
        else:
            raise ExplainError(f"unknown option {tok} in ipvsadm line {line!r}")
    return out


def parse_addresses(text: str) -> frozenset[str]:
    """The addresses of ``render``'s ``# addresses`` lines (``IP/32 dev kube-ipvs0``) or of
    ``ip -o addr show dev kube-ipvs0``."""
    out: set[str] = set()
    for line in text.splitlines():
        m = re.search(r"(?:^|\binet6? )([0-9a-fA-F:.]+)/\d+", line.strip())
        if m:
            out.add(_canonical(m.group(1)))
    return frozenset(out)


# --- the evaluator -----------------------------------------------------------------------


class IpvsRules:
    """IPVS mode's state of one family, evaluated on flows (see the module docstring)."""

    mode = "ipvs"

    def __init__(
        self,
        iptables_text: str,
        ipsets: IpsetTable,
        services: Callable[[tuple[str, str, int]], Service | None],
        bound: Iterable[str],
    ) -> None:
        self.ipsets = ipsets
        self.iptables = IptablesRules.from_text(iptables_text, ipsets)
        self._services = services
        self.bound = frozenset(bound)

    @classmethod
    def from_plan(cls, plan: IpvsPlan) -> IpvsRules:
        """The state of a compiled plan: what ``render`` prints."""
        vss = plan.virtual_servers
        cache: dict[tuple[str, str, int], Service] = {}

        def lookup(key: tuple[str, str, int]) -> Service | None:
            found = cache.get(key)
            if found is None:
                vs = vss.get(key)
                if vs is None:
                    return None
                found = cache[key] = Service.of(vs)
            return found

        return cls(plan.render_iptables(), IpsetTable.from_plan(plan), lookup, plan.bind_addresses)

    @classmethod
    def from_text(cls, ipset: str, ipvs: str, addresses: str, iptables: str) -> IpvsRules:
        """The state as text: ``ipset save``, ``ipvsadm -S -n``, the ``kube-ipvs0``
        addresses (render's lines or ``ip -o addr show``) and ``iptables-save``."""
        services = parse_ipvsadm(ipvs)
        return cls(iptables, IpsetTable.from_save(ipset), services.get, parse_addresses(addresses))

    @classmethod
    def from_render(cls, text: str) -> IpvsRules:
        """The four sections one family's ``render --proxy-mode ipvs`` prints."""
        from minikproxy.testing.ipvsload import split_sections

        s = split_sections(text)
        return cls.from_text(s["ipset"], s["ipvs"], s["addresses"], s["iptables"])

    def service(self, proto: str, address: str, port: int) -> Service | None:
        """The virtual server of ``proto`` (``tcp``), ``address`` and ``port``, if any."""
        return self._services((proto.upper(), address, port))

    # --- the engine's interface --------------------------------------------------------

    def base_chains(self, hook: str) -> tuple[tuple[int, str, str], ...]:
        """The iptables built-in chains of ``hook``."""
        return tuple(self.iptables.base_chains(hook))

    def run_base(self, hook: str, table: str, chain: str, flow: Flow) -> list[tuple[Outcome, Flow]]:
        """Run an iptables built-in chain."""
        return self.iptables.run_base(hook, table, chain, flow)

    def walk_packet(
        self,
        packet: Packet,
        local_addresses: Collection[str],
        pod_interface: str,
        *,
        trace: bool = True,
    ) -> Walk:
        """Follow ``packet`` through netfilter and IPVS (see the module docstring)."""
        local = set(local_addresses) | self.bound
        start = start_flow(packet, local, pod_interface, trace=trace)
        done: list[tuple[Verdict | None, Flow]] = []

        def is_local(ip: str) -> bool:
            return ip in local or _loop(ip)

        def forwarded(hook: str, flows: list[tuple[Verdict | None, Flow]]) -> None:
            """IPVS sent these on: the LOCAL_OUT path (filter OUTPUT), then POSTROUTING."""
            out = run_chains(self, "output", _FILTER_OUTPUT, [f for v, f in flows if v is None])
            done.extend((v, f) for v, f in flows if v is not None)
            done.extend((v, f) for v, f in out if v is not None)
            done.extend(run_chains(self, "postrouting", _NAT_POSTROUTING,
                                   [f for v, f in out if v is None]))  # fmt: skip

        if packet.locally_generated:
            first = run_chains(self, "output", _NAT_OUTPUT, [start])
            done.extend((v, f) for v, f in first if v is not None)
            plain: list[Flow] = []
            for v, f in first:
                if v is not None:
                    continue
                scheduled = self._schedule("output", f)
                if scheduled is None:
                    plain.append(f)
                else:
                    forwarded("output", scheduled)
            out = run_chains(self, "output", _FILTER_OUTPUT, plain)
            done.extend((v, f) for v, f in out if v is not None)
            post = run_chains(self, "postrouting", _NAT_POSTROUTING,
                              [f for v, f in out if v is None])  # fmt: skip
            done.extend((v, f) for v, f in post if v is not None or not is_local(f.dst))
            to_input = [f for v, f in post if v is None and is_local(f.dst)]
            done.extend(run_chains(self, "input", _FILTER_INPUT, to_input))
        else:
            first = run_chains(self, "prerouting", _NAT_PREROUTING, [start])
            done.extend((v, f) for v, f in first if v is not None)
            pending = [f for v, f in first if v is None]
            to_input = [f for f in pending if is_local(f.dst)]
            routed = [f for f in pending if not is_local(f.dst)]
            for v, f in run_chains(self, "input", _FILTER_INPUT, to_input):
                scheduled = None if v is not None else self._schedule("input", f)
                if scheduled is None:
                    done.append((v, f))
                else:
                    forwarded("input", scheduled)
            fwd = run_chains(self, "forward", _FILTER_FORWARD, routed)
            done.extend((v, f) for v, f in fwd if v is not None)
            done.extend(run_chains(self, "postrouting", _NAT_POSTROUTING,
                                   [f for v, f in fwd if v is None]))  # fmt: skip
        return Walk(tuple((final_verdict(v, f), f) for v, f in done))

    def _schedule(self, hook: str, flow: Flow) -> list[tuple[Verdict | None, Flow]] | None:
        """IPVS on ``flow``: None without a virtual server; else one flow per real server it
        may choose (each with its share), or a reject when none can be chosen."""
        vs = self.service(flow.proto, flow.dst, flow.dport)
        if vs is None:
            return None
        chain = f"{vs.protocol} {join_host_port(vs.address, vs.port)}"
        active = [d for d in vs.destinations if d.weight > 0]
        bad = [d for d in active if d.method != "m"]
        if bad:
            raise ExplainError(f"real server {bad[0].hostport} of {chain} is not masquerading")
        if vs.persistence is not None:
            flow.affinity = (
                f"ClientIP (IPVS persistence, {vs.persistence} s): a client seen before sticks "
                "to the real server it got first"
            )
        if not active:
            if flow.trace:
                draining = len(vs.destinations)
                why = f"{draining} draining (weight 0)" if draining else "no real servers"
                lookup = f"{why}: ICMP port unreachable"
                flow.path.append(Step(hook, "ipvs", chain, vs.text, flow.prob, lookup))
            return [("reject", flow)]
        total = sum(d.weight for d in active)
        out: list[tuple[Verdict | None, Flow]] = []
        for dest in active:
            branch = flow.fork(dest.weight / total)
            if branch.trace:
                lookup = f"real server {dest.hostport} weight {dest.weight} of {total}"
                branch.path.append(Step(hook, "ipvs", chain, vs.text, branch.prob, lookup))
            branch.dnat_to = dest.hostport
            branch.dst = dest.address
            branch.dport = dest.port
            out.append((None, branch))
        return out

    def notes_for(self, packet: Packet) -> list[str]:
        """What the scheduler and the real servers' weights mean for ``packet``'s virtual
        server (none when the packet meets none)."""
        vs = self.service(packet.proto, packet.dst, packet.dport)
        if vs is None:
            return []
        notes: list[str] = []
        sched = vs.scheduler
        weights = ", ".join(f"{d.hostport} weight {d.weight}" for d in vs.destinations)
        if sched in _BY_LOAD:
            notes.append(
                f"scheduler {sched}: the real server depends on the connections each one "
                f"holds; the shares are the weights' ({weights})"
            )
        elif sched in _BY_HASH:
            notes.append(
                f"scheduler {sched}: a hash of the {_BY_HASH[sched]} picks the real server, so "
                f"one client always gets the same one; the shares are over many clients "
                f"({weights})"
            )
        elif sched not in ("rr", "wrr"):
            notes.append(f"scheduler {sched}: shares are the weights' ({weights})")
        for d in vs.destinations:
            if d.weight == 0:
                notes.append(
                    f"{d.hostport} has weight 0 (graceful termination): it keeps its "
                    "connections but gets no new ones"
                )
        return notes


def _loop(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


# --- the driver's IPVS parts -------------------------------------------------------------


def build_ipvs(
    state: ProxyState,
    config: ProxyConfig,
    node: NodeInfo,
    family: IPFamily,
    node_addresses: Sequence[str],
    changed: Collection[NamespacedName] | None,
    previous: Any,
) -> tuple[IpvsPlan, IpvsRules, tuple[str, ...]]:
    """Compile ``state`` in IPVS mode as ``render`` does (only the ``changed`` Services when
    ``previous``, a view of the same mode, has a plan with the same options): the plan, its
    evaluator, and the addresses NodePorts answer on."""
    from minikproxy.compile.ipvs import compile_ipvs
    from minikproxy.nodeopts import ipvs_options

    options = ipvs_options(config, node, family, node_addresses=node_addresses)
    old = previous.ruleset if previous is not None else None
    if changed is not None and isinstance(old, IpvsPlan) and old.options == options:
        plan = compile_ipvs(state, options, previous=old, changed_services=changed)
    else:
        plan = compile_ipvs(state, options)
    return plan, IpvsRules.from_plan(plan), options.nodeport_ips


def ipvs_reasons(
    view: Any, packet: Packet, targets: Sequence[Target], reasons: list[str]
) -> list[str]:
    """``reasons`` (the modes' common ones) corrected for what IPVS does differently: a
    Local policy applies to every client of the frontend (no short-circuit for pods and the
    node) and, with no local endpoint, falls back to the cluster's (kube-proxy #97081); a
    Service IP is bound to ``kube-ipvs0``."""
    out = list(reasons)
    if not targets:
        if packet.dst in view.rules.bound:
            out.append(
                f"IPVS binds {packet.dst} to {DUMMY_DEVICE}: the node owns the address, and "
                "KUBE-IPVS-FILTER rejects new connections to ports no Service defines on it"
            )
        return out
    target = targets[0]
    port = target.port
    external = target.frontend != "ClusterIP"
    local_policy = port.external_policy_local if external else port.internal_policy_local
    cat = view.state.categorize(port)
    if not local_policy or not cat.has_any:
        return out
    which = "externalTrafficPolicy" if external else "internalTrafficPolicy"
    out = [r for r in out if not r.startswith(f"{which}: Local")]
    if not cat.local and not cat.cluster:
        line = (
            f"{which}: Local and this node has no ready endpoint: the virtual server has no "
            "real server"
        )
    elif cat.local:
        line = (
            f"{which}: Local: only this node's {len(cat.local)} endpoint(s) are used, for "
            "every client (IPVS has one virtual server per frontend: pods and the node are "
            "not short-circuited to the cluster's endpoints)"
        )
    else:
        line = (
            f"{which}: Local and this node has no ready endpoint: IPVS mode then uses the "
            f"cluster's {len(cat.cluster)} endpoint(s) (kube-proxy's IPVS fallback, #97081)"
        )
    out.insert(min(1, len(out)), line)
    return out
