"""One small adapter per proxy mode: how to compile a cluster, measure the ruleset, load it
into an empty network namespace, and start the real controller in that mode.

A new mode (IPVS, when it lands) is one more :class:`ModeAdapter` in :data:`ADAPTERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from minikproxy.benchmark.cluster import CLUSTER_CIDR, SERVICE_CIDR
from minikproxy.changes import Snapshot
from minikproxy.compile.iptables import IptablesOptions, IptablesRuleset, compile_iptables
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.compile.nftables import compile_nftables
from minikproxy.compile.nftables_kubeproxy import compile_nftables_kubeproxy
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import IptablesBackend, RealIptables
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.model.state import ProxyState

NODE_IP = "192.168.0.10"  # the synthetic Node's InternalIP


def iptables_options() -> IptablesOptions:
    """iptables options like a real node's (and like ``run`` derives from the bench flags):
    ClusterCIDR local detection, the node IP."""
    detector = make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=[CLUSTER_CIDR])
    return IptablesOptions(local_detector=detector, node_ip=NODE_IP)


def nftables_options() -> NftablesOptions:
    """nftables options like a real node's: ClusterCIDR detection, node IP, service CIDR."""
    return NftablesOptions(
        local=LocalMatch("saddr", CLUSTER_CIDR),
        node_ip=NODE_IP,
        nodeport_addresses=(NODE_IP,),
        service_cidrs=(SERVICE_CIDR,),
    )


@dataclass(frozen=True)
class RulesetSize:
    """How big a compiled ruleset is, counted in its rendered text."""

    rules: int
    chains: int
    sets: int  # sets and maps
    elements: int
    bytes: int


def count_elements(line: str) -> int:
    """Elements in one ``add element ... { a, b, c }`` line (commas at brace depth 1)."""
    depth, count, seen = 0, 0, False
    for char in line:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif depth == 1 and char == ",":
            count += 1
        elif depth == 1 and not char.isspace():
            seen = True
    return count + 1 if seen else 0


def iptables_size(text: str) -> RulesetSize:
    """Size of ``iptables-restore`` input: ``-A`` lines and chain declarations."""
    rules = chains = 0
    for line in text.splitlines():
        if line.startswith("-A "):
            rules += 1
        elif line.startswith(":"):
            chains += 1
    return RulesetSize(rules, chains, 0, 0, len(text.encode()))


def nft_size(text: str) -> RulesetSize:
    """Size of an ``nft -f`` script: rules, chains, sets and maps, elements."""
    rules = chains = sets = elements = 0
    for line in text.splitlines():
        words = line.split(maxsplit=2)
        if len(words) < 2 or words[0] not in ("add", "insert"):
            continue
        if words[1] == "rule":
            rules += 1
        elif words[1] == "chain":
            chains += 1
        elif words[1] in ("set", "map"):
            sets += 1
        elif words[1] == "element":
            elements += count_elements(line)
    return RulesetSize(rules, chains, sets, elements, len(text.encode()))


class ModeAdapter(ABC):
    """A proxy mode (and layout or backend) as the benchmark sees it."""

    name: ClassVar[str]
    #: ``run`` flags selecting this mode (the bench adds the rest).
    run_flags: ClassVar[tuple[str, ...]]

    def unavailable(self) -> str | None:
        """Why this mode cannot be measured on this machine (None: it can)."""
        return None

    @abstractmethod
    def compile(self, state: ProxyState) -> Any:
        """A full compile (the mode's ruleset object)."""

    @abstractmethod
    def render(self, compiled: Any) -> str:
        """The complete text a first sync loads."""

    @abstractmethod
    def increment(self, previous: Any, snapshot: Snapshot) -> str:
        """What a sync after ``snapshot``'s one change compiles and renders (``previous`` is the
        ruleset before it); returns the text sent to the kernel."""

    @abstractmethod
    def size(self, compiled: Any, text: str) -> RulesetSize:
        """How big ``compiled`` (rendered as ``text``) is."""

    @abstractmethod
    def load(self, compiled: Any, text: str, netns: str) -> None:
        """Load ``compiled`` into the empty namespace ``netns`` as a first full sync does."""


class IptablesAdapter(ModeAdapter):
    """iptables mode on one backend: ``iptables-<backend>-restore`` of the rendered text."""

    backend: ClassVar[IptablesBackend]

    def compile(self, state: ProxyState) -> IptablesRuleset:
        return compile_iptables(state, iptables_options())

    def render(self, compiled: Any) -> str:
        text: str = compiled.render()
        return text

    def increment(self, previous: Any, snapshot: Snapshot) -> str:
        ruleset = compile_iptables(
            snapshot.state, iptables_options(), previous=previous, changed_services=snapshot.changed
        )
        return ruleset.render_partial()

    def size(self, compiled: Any, text: str) -> RulesetSize:
        return iptables_size(text)

    def load(self, compiled: Any, text: str, netns: str) -> None:
        RealIptables(RealExecer(netns), IPV4, self.backend).restore(text.encode(), noflush=False)


class IptablesNft(IptablesAdapter):
    name = "iptables"
    backend = "nft"
    run_flags = ("--proxy-mode", "iptables", "--iptables-backend", "nft")


class IptablesLegacy(IptablesAdapter):
    name = "iptables-legacy"
    backend = "legacy"
    run_flags = ("--proxy-mode", "iptables", "--iptables-backend", "legacy")


class NftablesAdapter(ModeAdapter):
    """nftables mode in one layout: one libnftables transaction of the rendered script."""

    def render(self, compiled: Any) -> str:
        text: str = compiled.render()
        return text

    def increment(self, previous: Any, snapshot: Snapshot) -> str:
        ruleset = self.compile(snapshot.state)
        changed: list[ServicePortName] = [
            name
            for name in {*ruleset.services, *previous.services}
            if snapshot.changed is None or name.service in snapshot.changed
        ]
        script = ruleset.incremental_script(previous, changed)
        text: str = ruleset.render() if script is None else script
        return text

    def size(self, compiled: Any, text: str) -> RulesetSize:
        return nft_size(text)

    def load(self, compiled: Any, text: str, netns: str) -> None:
        with NftablesApplier(netns) as applier:
            applier.context.run(text)  # the script rendered by our process (timed apart)


class NftablesFlat(NftablesAdapter):
    name = "nftables"
    run_flags = ("--proxy-mode", "nftables", "--nftables-layout", "flat")

    def compile(self, state: ProxyState) -> Any:
        return compile_nftables(state, nftables_options())


class NftablesKubeProxy(NftablesAdapter):
    name = "nftables-kube-proxy"
    run_flags = ("--proxy-mode", "nftables", "--nftables-layout", "kube-proxy")

    def compile(self, state: ProxyState) -> Any:
        return compile_nftables_kubeproxy(state, nftables_options())


ADAPTERS: dict[str, type[ModeAdapter]] = {
    a.name: a for a in (IptablesNft, IptablesLegacy, NftablesFlat, NftablesKubeProxy)
}
#: Modes named in the issue that have no adapter yet, and why.
MISSING: dict[str, str] = {
    "ipvs": "IPVS mode has not landed on main (being built on its own branch), and this "
    "machine's kernel has no IPVS (it would run in the IPVS VM)",
}
