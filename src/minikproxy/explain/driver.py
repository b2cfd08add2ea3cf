"""Build the compiled rules of one mode for a node, and explain packets with them."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.cidr import cidr_contains
from minikproxy.compile.iptables import compile_iptables
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.config import ConfigError, ProxyConfig
from minikproxy.explain.engine import RuleEvaluator, endpoint_shares, merged_path, walk
from minikproxy.explain.iptables import IptablesRules
from minikproxy.explain.nft import NftRules
from minikproxy.explain.packet import Packet
from minikproxy.explain.prefilter import select
from minikproxy.explain.reasons import (
    FrontendIndex,
    Target,
    find_targets,
    no_target_reasons,
    service_reasons,
)
from minikproxy.explain.result import Explanation
from minikproxy.model.names import IPV6, IPFamily
from minikproxy.model.parse import NodeInfo, canonical_ip
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.state import ProxyState
from minikproxy.nodeopts import iptables_options, nftables_options, primary_node_ips, split_list
from minikproxy.render import choose_node_name
from minikproxy.sources.manifests import SourcedObject

MODES = ("iptables", "nftables", "nftables/kube-proxy")
"""The rule-based modes explain and diff evaluate: a proxy mode (and nftables layout)."""
ALL_MODES = (*MODES, "ipvs")
"""Every mode explain and diff evaluate (IPVS: its iptables rules, ipsets and IPVS)."""


@dataclass(frozen=True)
class ModeView:
    """One family's state compiled in one mode, with what explaining a packet needs."""

    mode: str
    family: IPFamily
    state: ProxyState
    rules: RuleEvaluator
    ruleset: Any
    local: frozenset[str]
    pod_interface: str
    pod_interfaces: str
    nodeport_addresses: tuple[str, ...] | None
    local_cidr: str
    local_detection: str
    masquerade_all: bool
    notes: tuple[str, ...] = ()

    @cached_property
    def frontends(self) -> FrontendIndex:
        """The service ports by frontend (built on first use)."""
        return FrontendIndex.build(self.state)


def mode_name(config: ProxyConfig) -> str:
    """``iptables``, ``nftables`` or ``nftables/kube-proxy`` (the layout)."""
    if config.mode == "nftables" and config.nftables_layout == "kube-proxy":
        return "nftables/kube-proxy"
    if config.mode in ("iptables", "nftables", "ipvs"):
        return config.mode
    raise ConfigError(f"--proxy-mode: explain does not support mode {config.mode!r} yet")


def with_mode(config: ProxyConfig, mode: str) -> ProxyConfig:
    """``config`` switched to ``mode`` (one of :data:`MODES`)."""
    if mode == "nftables/kube-proxy":
        return dataclasses.replace(config, mode="nftables", nftables_layout="kube-proxy")
    if mode == "nftables":
        return dataclasses.replace(config, mode="nftables", nftables_layout="flat")
    if mode in ("iptables", "ipvs"):
        return dataclasses.replace(config, mode=mode)
    raise ConfigError(f"unknown mode {mode!r} (one of {', '.join(ALL_MODES)})")


class Feed:
    """A tracker for this node (chosen as ``render`` chooses it) fed with sourced objects,
    collecting the problems found, each naming its file."""

    def __init__(self, objects: Sequence[SourcedObject], config: ProxyConfig) -> None:
        self.problems: list[ObjectProblem] = []
        self._source = ""
        self.tracker = ClusterTracker(
            choose_node_name(objects, config.hostname_override), report=self._report
        )
        self.feed(objects)

    def _report(self, problem: ObjectProblem) -> None:
        self.problems.append(dataclasses.replace(problem, source=self._source))

    def _stream(self, objects: Iterable[SourcedObject]) -> Iterator[Mapping[str, Any]]:
        for item in objects:
            self._source = item.source
            yield item.obj

    def feed(self, objects: Iterable[SourcedObject]) -> None:
        """Add or update ``objects``."""
        self.tracker.add_objects(self._stream(objects))

    def replace(self, old: Sequence[SourcedObject], new: Sequence[SourcedObject]) -> None:
        """Go from the objects ``old`` to ``new``: only the objects that differ are parsed
        again, and those gone are deleted (so the next snapshots name what changed)."""
        before = {_object_key(o.obj): o.obj for o in old}
        after = {_object_key(o.obj): o for o in new}
        self.feed(o for key, o in after.items() if before.get(key) != o.obj)
        deleters = {
            "Service": self.tracker.delete_service,
            "EndpointSlice": self.tracker.delete_endpoint_slice,
            "Endpoints": self.tracker.delete_endpoints,
        }
        for key, obj in before.items():
            if key not in after and key[0] in deleters:
                self.tracker.guarded(deleters[key[0]], obj)


def _object_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return str(obj.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name") or "")


def track(
    objects: Iterable[SourcedObject], config: ProxyConfig
) -> tuple[ClusterTracker, list[ObjectProblem]]:
    """Feed ``objects`` to a tracker for this node (chosen as ``render`` chooses it)."""
    fed = Feed(list(objects), config)
    return fed.tracker, fed.problems


def build_view(
    tracker: ClusterTracker,
    config: ProxyConfig,
    family: IPFamily,
    *,
    node_addresses: Sequence[str] = (),
    snapshot: Snapshot | None = None,
    previous: ModeView | None = None,
    endpoints_above: Callable[[int, int], bool] | None = None,
) -> ModeView:
    """Compile ``tracker``'s state of ``family`` in ``config``'s mode, as ``render`` does.

    ``snapshot`` is the state to compile (default: the tracker's next snapshot). With
    ``previous`` (the view of an earlier snapshot of the same tracker, same mode and options)
    only the Services ``snapshot`` names as changed are recompiled: the result is identical
    to a full compile. When the tracker holds part of the input (the prefilter),
    ``endpoints_above(tracked_total, threshold)`` says whether the whole input has more
    endpoints than ``threshold``: it decides iptables' large-cluster mode.
    """
    mode = mode_name(config)
    node = tracker.node
    snap = snapshot or tracker.snapshot(family)
    state = snap.state
    changed = snap.changed if previous is not None and previous.mode == mode else None
    local = _local_addresses(config, node, family, node_addresses)
    detection, local_cidr, pod_interface = _detection(config, family, node)
    notes: tuple[str, ...] = ()
    rules: RuleEvaluator
    if mode == "iptables":
        ipt = iptables_options(config, node, family, node_addresses=node_addresses)
        if endpoints_above is not None:
            large = endpoints_above(state.total_endpoints, ipt.large_cluster_threshold)
            ipt = dataclasses.replace(ipt, large_cluster_threshold=-1 if large else sys.maxsize)
        if changed is not None and previous is not None:
            ruleset: Any = compile_iptables(
                state, ipt, previous=previous.ruleset, changed_services=changed
            )
        else:
            ruleset = compile_iptables(state, ipt)
        rules = IptablesRules.from_ruleset(ruleset)
        nodeports = ipt.nodeport_addresses
    elif mode == "ipvs":
        from minikproxy.explain.ipvs import build_ipvs

        ruleset, rules, nodeports = build_ipvs(
            state, config, node, family, node_addresses, changed, previous
        )
    else:
        nft = nftables_options(
            config, node, family, node_addresses=node_addresses, service_cidrs=config.service_cidrs
        )
        if mode == "nftables":
            if changed is not None and previous is not None and previous.ruleset.options == nft:
                ruleset = compile_nftables(state, nft, previous.ruleset, changed)
            else:
                ruleset = compile_nftables(state, nft)
            notes = ruleset.notes
        else:
            ruleset = compile_nftables_kubeproxy(state, nft)
        rules = NftRules.from_ruleset(ruleset)
        nodeports = nft.nodeport_addresses
    return ModeView(
        mode=mode,
        family=family,
        state=state,
        rules=rules,
        ruleset=ruleset,
        local=local,
        pod_interface=pod_interface,
        pod_interfaces=_pod_interfaces(config),
        nodeport_addresses=nodeports,
        local_cidr=local_cidr,
        local_detection=detection,
        masquerade_all=config.masquerade_all,
        notes=notes,
    )


def _local_addresses(
    config: ProxyConfig, node: NodeInfo, family: IPFamily, node_addresses: Sequence[str]
) -> frozenset[str]:
    out = set(primary_node_ips(config, node, family)) | set(node.addresses_of(family))
    for text in node_addresses:
        parsed = canonical_ip(text)
        if parsed is not None and parsed[1] == family:
            out.add(parsed[0])
    return frozenset(out)


def _detection(config: ProxyConfig, family: IPFamily, node: NodeInfo) -> tuple[str, str, str]:
    """(description, pod CIDR or "", the interface pod traffic enters by)."""
    mode = config.detect_local_mode
    if mode in ("ClusterCIDR", "NodeCIDR"):
        cidrs = split_list(config.cluster_cidr) if mode == "ClusterCIDR" else node.pod_cidrs
        for cidr in cidrs:
            if (":" in cidr) == (family == IPV6):
                return f"--detect-local-mode {mode}: pods are {cidr}", cidr, "cni0"
        return f"--detect-local-mode {mode}: no pod CIDR of this family (no detection)", "", "cni0"
    if mode == "BridgeInterface":
        bridge = config.bridge_interface
        return f"--detect-local-mode BridgeInterface: pods come in via {bridge}", "", bridge
    prefix = config.interface_name_prefix
    return (
        f"--detect-local-mode InterfaceNamePrefix: pods come in via {prefix}*",
        "",
        f"{prefix}0",
    )


def _pod_interfaces(config: ProxyConfig) -> str:
    """The pod interface(s) of interface-based detection: a name, ``prefix*``, or ""."""
    if config.detect_local_mode == "BridgeInterface":
        return config.bridge_interface
    if config.detect_local_mode == "InterfaceNamePrefix":
        return f"{config.interface_name_prefix}*"
    return ""


def explain_objects(
    objects: Sequence[SourcedObject],
    config: ProxyConfig,
    packet: Packet,
    *,
    node_addresses: Sequence[str] = (),
    prefilter: bool = True,
) -> tuple[Explanation, list[ObjectProblem]]:
    """Explain ``packet`` with the rules ``objects`` compile to for this node, and the
    problems found in the objects read. With ``prefilter`` only the Services the packet can
    meet are tracked and compiled (:mod:`~minikproxy.explain.prefilter`; the answer is the
    same, and only those objects' problems are reported). Not in IPVS mode: its ipsets are
    shared by every Service, so another Service can change the answer (an endpoint local in
    another Service's EndpointSlice puts it in ``KUBE-LOOP-BACK``, and the hairpin
    masquerade follows; found by the prefilter's property test)."""
    if not prefilter or mode_name(config) == "ipvs":
        fed = Feed(objects, config)
        above = None
    else:
        (selection,) = select([objects], {packet.dst}, {packet.dport})
        fed = Feed(selection.kept, config)
        above = partial(selection.endpoints_above, fed.tracker.node_name, packet.family)
    view = build_view(
        fed.tracker, config, packet.family, node_addresses=node_addresses, endpoints_above=above
    )
    return explain_packet(view, packet), fed.problems


def _localhost_node_port(view: ModeView, packet: Packet, targets: Sequence[Target]) -> bool:
    return (
        packet.dst in ("127.0.0.1", "::1")
        and not any(t.frontend == "NodePort" for t in targets)
        and any(port == packet.dport for port, _ in view.frontends.by_node_port)
    )


def explain_packet(view: ModeView, packet: Packet, *, detail: bool = True) -> Explanation:
    """What ``view``'s rules do to ``packet``, with the Kubernetes reasons; without
    ``detail`` (diff), only the verdict, endpoints, masquerading and affinity."""
    if packet.family != view.family:
        raise ValueError(f"the packet is {packet.family}, the rules are {view.family}")
    walked = walk(view.rules, packet, view.local, view.pod_interface, trace=detail)
    verdict, endpoints, masquerade, masq_rules = endpoint_shares(walked)
    affinity = next((f.affinity for _, f in walked.flows if f.affinity), "")
    if not detail:
        return Explanation(packet, view.mode, verdict, endpoints, masquerade, affinity=affinity)
    targets = find_targets(view.frontends, packet, view.nodeport_addresses, view.local)
    reasons: list[str] = []
    if view.local_cidr:
        pod_source = cidr_contains(view.local_cidr, packet.src)
    else:
        pod_source = packet.origin == "pod" and bool(view.local_detection)
        if packet.in_interface and view.pod_interfaces:  # the named interface decides
            pattern = view.pod_interfaces
            name = packet.in_interface
            pod_source = name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern
    for target in targets[:1]:
        reasons.extend(
            service_reasons(
                view.state,
                target,
                packet,
                pod_source=pod_source,
                local_detection=view.local_detection,
                masquerade_all=view.masquerade_all,
                dnat=verdict == "dnat",
            )
        )
    if not targets:
        reasons.extend(no_target_reasons(view.frontends, packet))
    # The mode's notes about this port (IPv6 affinity in the flat nftables layout).
    notes = [n for n in view.notes if targets and n.startswith(f"{targets[0].port.name} (")]
    if (view.mode.startswith("nftables") or view.mode == "ipvs") and _localhost_node_port(
        view, packet, targets
    ):
        notes.append(f"localhost NodePorts are not supported in {view.mode.split('/')[0]} mode "
                     "(as in kube-proxy)")  # fmt: skip
    if view.mode == "ipvs":
        from minikproxy.explain.ipvs import ipvs_reasons

        reasons = ipvs_reasons(view, packet, targets, reasons)
        notes.extend(view.rules.notes_for(packet))  # type: ignore[attr-defined]
    return Explanation(
        packet=packet,
        mode=view.mode,
        verdict=verdict,
        endpoints=endpoints,
        masquerade=masquerade,
        masquerade_rules=tuple(masq_rules),
        affinity=affinity,
        service=f"{targets[0].port.name} ({targets[0].port.protocol})" if targets else "",
        reasons=tuple(reasons),
        path=merged_path(walked),
        notes=tuple(notes),
    )
