"""``minikproxy render``: the rules the controller would install, from manifest files."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import compile_iptables
from minikproxy.compile.ipvs import compile_ipvs
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.compile.nftables_options import NftablesOptions
from minikproxy.config import ConfigError, ProxyConfig
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.state import ProxyState
from minikproxy.nodeopts import iptables_options, ipvs_options, nftables_options
from minikproxy.sources.manifests import SourcedObject


@dataclass
class RenderResult:
    """The payloads per family, with what was skipped along the way.

    Each payload is kept as the fragments that make it up (``parts``): at 10k Services one
    joined copy is ~30 MB, so the CLI writes the fragments out instead.
    """

    parts: dict[IPFamily, list[str]]
    rulesets: dict[IPFamily, Any]
    node: NodeInfo
    problems: list[ObjectProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @cached_property
    def payloads(self) -> dict[IPFamily, str]:
        """Each family's payload as one string (joined on first use)."""
        return {family: "".join(parts) for family, parts in self.parts.items()}


def choose_node_name(objects: Sequence[SourcedObject], override: str) -> str:
    """``--hostname-override``, else the only Node in the input, else this machine's name."""
    if override:
        return override.strip().lower()
    nodes = [o.obj for o in objects if o.obj.get("kind") == "Node"]
    if len(nodes) == 1:
        return str((nodes[0].get("metadata") or {}).get("name") or "")
    return socket.gethostname().lower()


def render_objects(
    objects: Sequence[SourcedObject],
    config: ProxyConfig,
    *,
    families: Sequence[IPFamily] = (IPV4, IPV6),
    node_addresses: Sequence[str] = (),
    services: Sequence[NamespacedName] = (),
) -> RenderResult:
    """Compile ``objects`` for this node; ``services`` restricts the output for reading."""
    node_name = choose_node_name(objects, config.hostname_override)
    problems: list[ObjectProblem] = []
    current_source = ""

    def report(problem: ObjectProblem) -> None:
        problems.append(dataclasses.replace(problem, source=current_source))

    def stream() -> Iterator[Mapping[str, Any]]:
        nonlocal current_source
        for item in objects:
            current_source = item.source
            yield item.obj

    tracker = ClusterTracker(node_name, report=report)
    tracker.add_objects(stream())
    node = tracker.node
    parts: dict[IPFamily, list[str]] = {}
    rulesets: dict[IPFamily, Any] = {}
    notes: list[str] = []
    if config.mode == "nftables":
        compile_nft = _nftables_compiler(config.nftables_layout)
    elif config.mode not in ("iptables", "ipvs"):
        raise ConfigError(f"--proxy-mode: unsupported mode {config.mode!r}")
    for family in families:
        state = tracker.snapshot(family).state
        if config.mode == "nftables":
            nft_options = nftables_options(
                config,
                node,
                family,
                node_addresses=node_addresses,
                service_cidrs=config.service_cidrs,
            )
            nft_ruleset = compile_nft(state, nft_options)
            rulesets[family] = nft_ruleset
            notes.extend(getattr(nft_ruleset, "notes", ()))
            if services:
                parts[family] = [nft_ruleset.render_services(set(services))]
            else:
                parts[family] = [nft_ruleset.render()]
            continue
        if config.mode == "ipvs":
            plan = compile_ipvs(
                state, ipvs_options(config, node, family, node_addresses=node_addresses)
            )
            rulesets[family] = plan
            parts[family] = [plan.render_services(set(services)) if services else plan.render()]
            continue
        options = iptables_options(config, node, family, node_addresses=node_addresses)
        ruleset = compile_iptables(state, options)
        rulesets[family] = ruleset
        parts[family] = (
            [ruleset.render_services(set(services))] if services else ruleset.render_parts()
        )
    return RenderResult(parts, rulesets, node, problems, notes)


def _nftables_compiler(layout: str) -> Callable[[ProxyState, NftablesOptions], Any]:
    """The compiler of ``--nftables-layout``: ours (``flat``) or kube-proxy's own table."""
    if layout == "flat":
        return compile_nftables
    if layout == "kube-proxy":
        return compile_nftables_kubeproxy
    raise ConfigError(f"--nftables-layout: unknown layout {layout!r}")
