"""Walk a packet through the netfilter hooks with one rule evaluator.

Mode-independent: an evaluator (iptables restore text, an nftables script) says which base
chains sit on each hook and runs a chain on a :class:`Flow`; the engine applies hook order,
the routing decision after DNAT and the verdict. A random choice between endpoints splits a
flow into several, each with its share of new connections.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Literal, Protocol, runtime_checkable

from minikproxy.explain.packet import Packet
from minikproxy.explain.result import EndpointShare, Step, Verdict

Outcome = Literal["continue", "accept", "drop", "reject", "dnat", "masquerade"]
EXTERNAL_INTERFACE = "(external)"
"""The input interface of outside traffic: no interface match names it."""


class ExplainError(Exception):
    """The rules could not be evaluated (an unknown rule shape), naming the rule."""


@dataclass(slots=True)
class Flow:
    """One branch of the packet's fate (a share ``prob`` of new connections)."""

    prob: float
    src: str
    dst: str
    dport: int
    proto: str
    iif: str | None
    src_local: bool
    local: frozenset[str] = frozenset()
    orig_dst: str = ""
    orig_dport: int = 0
    mark: int = 0
    dnat_to: str = ""
    masquerade: bool = False
    masq_rules: list[str] = field(default_factory=list)
    accepted: bool = False
    affinity: str = ""
    path: list[Step] = field(default_factory=list)
    trace: bool = True

    @property
    def dst_local(self) -> bool:
        """True when the (current) destination is one of the node's own addresses."""
        return _is_local(self.dst, self.local)

    def fork(self, share: float) -> Flow:
        """A copy carrying ``share`` of this flow's connections."""
        return Flow(
            self.prob * share,
            self.src,
            self.dst,
            self.dport,
            self.proto,
            self.iif,
            self.src_local,
            self.local,
            self.orig_dst,
            self.orig_dport,
            self.mark,
            self.dnat_to,
            self.masquerade,
            list(self.masq_rules),
            self.accepted,
            self.affinity,
            list(self.path),
            self.trace,
        )


class RuleEvaluator(Protocol):
    """What the engine needs of a rule format."""

    mode: str

    def base_chains(self, hook: str) -> Sequence[tuple[int, str, str]]:
        """``(priority, table, chain)`` of the base chains on ``hook``, in priority order."""

    def run_base(self, hook: str, table: str, chain: str, flow: Flow) -> list[tuple[Outcome, Flow]]:
        """Run ``flow`` through base chain ``table/chain``; one result per branch."""


@dataclass(frozen=True)
class Walk:
    """The flows at the end of the walk, with the verdict each met."""

    flows: tuple[tuple[Verdict, Flow], ...]


@runtime_checkable
class PacketWalker(Protocol):
    """An evaluator whose mode does not fit the netfilter walk alone (IPVS schedules at
    LOCAL_IN/LOCAL_OUT): it walks the packet itself."""

    def walk_packet(
        self,
        packet: Packet,
        local_addresses: Collection[str],
        pod_interface: str,
        *,
        trace: bool = True,
    ) -> Walk:
        """Follow ``packet`` through the hooks and the mode's own stages."""


def walk(
    evaluator: RuleEvaluator,
    packet: Packet,
    local_addresses: Collection[str],
    pod_interface: str,
    *,
    trace: bool = True,
) -> Walk:
    """Follow ``packet`` through PREROUTING (or OUTPUT), routing, FORWARD/INPUT, POSTROUTING."""
    if isinstance(evaluator, PacketWalker):
        return evaluator.walk_packet(packet, local_addresses, pod_interface, trace=trace)
    local = set(local_addresses)
    start = start_flow(packet, local, pod_interface, trace=trace)
    first = "output" if packet.locally_generated else "prerouting"
    alive = _run_hook(evaluator, first, [start])
    done: list[tuple[Verdict | None, Flow]] = [(v, f) for v, f in alive if v is not None]
    pending = [f for v, f in alive if v is None]
    to_input = [f for f in pending if _is_local(f.dst, local)]
    forwarded = [f for f in pending if not _is_local(f.dst, local)]
    if packet.locally_generated:
        # Sent by the node: POSTROUTING, then (to a local address) INPUT over loopback.
        after = _run_hook(evaluator, "postrouting", to_input + forwarded)
        local_after = [(v, f) for v, f in after if v is None and _is_local(f.dst, local)]
        done += [(v, f) for v, f in after if v is not None or not _is_local(f.dst, local)]
        done += _run_hook(evaluator, "input", [f for _, f in local_after])
    else:
        done += _run_hook(evaluator, "input", to_input)
        forwarded_out = _run_hook(evaluator, "forward", forwarded)
        done += [(v, f) for v, f in forwarded_out if v is not None]
        done += _run_hook(evaluator, "postrouting", [f for v, f in forwarded_out if v is None])
    return Walk(tuple((_final(v, f), f) for v, f in done))


def start_flow(
    packet: Packet, local: Collection[str], pod_interface: str, *, trace: bool = True
) -> Flow:
    """The flow of ``packet`` as it enters the first hook (its input interface chosen by
    origin: the pod interface for a pod, none for the node itself)."""
    iif = None
    if packet.in_interface:
        iif = packet.in_interface
    elif not packet.locally_generated:
        iif = pod_interface if packet.origin == "pod" else EXTERNAL_INTERFACE
    return Flow(
        prob=1.0,
        src=packet.src,
        dst=packet.dst,
        dport=packet.dport,
        proto=packet.proto,
        iif=iif,
        src_local=packet.locally_generated or _is_local(packet.src, local),
        local=frozenset(local),
        orig_dst=packet.dst,
        orig_dport=packet.dport,
        trace=trace,
    )


def final_verdict(verdict: Verdict | None, flow: Flow) -> Verdict:
    """The verdict of a flow at the end of the walk (None: it went through)."""
    return _final(verdict, flow)


def _final(verdict: Verdict | None, flow: Flow) -> Verdict:
    if verdict is not None:
        return verdict
    if flow.dnat_to:
        return "dnat"
    return "accept" if flow.accepted else "none"


def _run_hook(
    evaluator: RuleEvaluator, hook: str, flows: list[Flow]
) -> list[tuple[Verdict | None, Flow]]:
    """Each flow through every base chain of ``hook``; None = still travelling."""
    return run_chains(evaluator, hook, evaluator.base_chains(hook), flows)


def run_chains(
    evaluator: RuleEvaluator,
    hook: str,
    chains: Sequence[tuple[int, str, str]],
    flows: list[Flow],
) -> list[tuple[Verdict | None, Flow]]:
    """Each flow through the base chains ``chains`` (in order) on ``hook``; None = still
    travelling."""
    current: list[tuple[Verdict | None, Flow]] = [(None, f) for f in flows]
    for _, table, chain in chains:
        nxt: list[tuple[Verdict | None, Flow]] = []
        for verdict, flow in current:
            if verdict is not None:
                nxt.append((verdict, flow))
                continue
            for outcome, out in evaluator.run_base(hook, table, chain, flow):
                if outcome in ("drop", "reject"):
                    nxt.append((outcome, out))
                else:
                    if outcome == "accept":
                        out.accepted = True
                    nxt.append((None, out))
        current = nxt
    return current


def _is_local(ip: str, local: Collection[str]) -> bool:
    return ip in local or _loopback(ip)


@lru_cache(maxsize=65536)
def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def endpoint_shares(walked: Walk) -> tuple[Verdict, tuple[EndpointShare, ...], bool, list[str]]:
    """The overall verdict (that of most connections), the DNAT endpoints with their shares,
    whether the source is masqueraded, and the rules that masquerade it."""
    mass: dict[Verdict, float] = {}
    for verdict, flow in walked.flows:
        mass[verdict] = mass.get(verdict, 0.0) + flow.prob
    verdict = max(mass, key=lambda v: mass[v]) if mass else "none"
    if verdict != "dnat":
        return verdict, (), False, []
    share: dict[str, float] = {}
    masqueraded: dict[str, bool] = {}
    rules: dict[str, None] = {}
    for v, flow in walked.flows:
        if v != "dnat":
            continue
        share[flow.dnat_to] = share.get(flow.dnat_to, 0.0) + flow.prob
        masqueraded[flow.dnat_to] = masqueraded.get(flow.dnat_to, False) or flow.masquerade
        if flow.masquerade:
            rules.update(dict.fromkeys(flow.masq_rules))
    endpoints = tuple(
        EndpointShare(address, share[address], masqueraded[address])
        for address in sorted(share, key=_address_key)
    )
    return verdict, endpoints, any(masqueraded.values()), list(rules)


def _address_key(address: str) -> tuple[int, int, int]:
    host, _, port = address.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    return ip.version, int(ip), int(port)


_HOOK_RANK = {"prerouting": 0, "output": 0, "forward": 1, "input": 2, "postrouting": 3}


def merged_path(walked: Walk) -> tuple[Step, ...]:
    """Every step of every flow once, hook by hook, in the order first crossed.

    Flows forked from one another share their earlier steps (the same objects); equal steps
    taken by different forks are one step whose probability is their sum.
    """
    seen_ids: set[int] = set()
    by_key: dict[tuple[str, str, str, str, str], int] = {}
    out: list[Step] = []
    for _, flow in walked.flows:
        for step in flow.path:
            if id(step) in seen_ids:
                continue
            seen_ids.add(id(step))
            key = (step.hook, step.table, step.chain, step.rule, step.lookup)
            at = by_key.get(key)
            if at is None:
                by_key[key] = len(out)
                out.append(step)
            else:
                out[at] = replace(out[at], probability=out[at].probability + step.probability)
    rank: dict[str, float] = dict(_HOOK_RANK)
    if any(s.hook == "prerouting" for s in out):
        rank["output"] = 2.5  # an arriving packet IPVS sent on through LOCAL_OUT
    return tuple(sorted(out, key=lambda s: rank.get(s.hook, 9)))
