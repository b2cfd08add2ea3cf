"""One small adapter per proxy mode: the controller's own mode object (compile, apply) with
the benchmark's node options, how to measure its ruleset, what a partial sync sends, and the
``run`` flags that start the real controller in that mode.

A new mode is one more :class:`ModeAdapter` in :data:`ADAPTERS`. IPVS needs a kernel with IPVS:
where this one has none, :mod:`.ipvsvm` runs its kernel parts inside the IPVS VM.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from minikproxy.benchmark.cluster import CLUSTER_CIDR, SERVICE_CIDR
from minikproxy.benchmark.kmem import legacy_table_bytes
from minikproxy.changes import Snapshot
from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.ipvs import IpvsOptions
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.config import ProxyConfig
from minikproxy.dataplane.execer import ExecResult, RealExecer
from minikproxy.dataplane.iptables import IptablesBackend
from minikproxy.dataplane.ipvs import NetlinkIpvsKernel
from minikproxy.dataplane.libnftables import NftContext
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4
from minikproxy.model.state import ProxyState
from minikproxy.modes.base import ProxyMode
from minikproxy.modes.factory import build_mode
from minikproxy.modes.ipvs import IpvsMode
from minikproxy.testing.ipvsload import kernel_has_ipvs, split_sections

_T = TypeVar("_T")

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


def ipvs_options() -> IpvsOptions:
    """IPVS options like a real node's: ClusterCIDR detection, the node IP (and NodePort
    virtual servers on it)."""
    detector = make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=[CLUSTER_CIDR])
    return IpvsOptions(local_detector=detector, node_ip=NODE_IP, node_addresses=(NODE_IP,))


@dataclass(frozen=True)
class RulesetSize:
    """How big a compiled ruleset is, counted in its rendered text."""

    rules: int
    chains: int
    sets: int  # sets and maps
    elements: int
    bytes: int


@dataclass(frozen=True)
class IpvsRulesetSize(RulesetSize):
    """An IPVS plan's size: its iptables rules and chains, ipsets and their entries
    (``elements``), and the IPVS objects."""

    virtual_servers: int
    real_servers: int
    addresses: int  # on kube-ipvs0


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


def ipvs_size(text: str) -> IpvsRulesetSize:
    """Size of ``render --proxy-mode ipvs`` output (its four sections)."""
    sections = split_sections(text)
    rules = iptables_size(sections["iptables"])
    ipset = sections["ipset"].splitlines()
    ipvs = sections["ipvs"].splitlines()
    return IpvsRulesetSize(
        rules=rules.rules,
        chains=rules.chains,
        sets=sum(line.startswith("create ") for line in ipset),
        elements=sum(line.startswith("add ") for line in ipset),
        bytes=len(text.encode()),
        virtual_servers=sum(line.startswith("-A ") for line in ipvs),
        real_servers=sum(line.startswith("-a ") for line in ipvs),
        addresses=len(sections["addresses"].splitlines()),
    )


class ToolTimer:
    """Adds up the wall time spent in kernel tools and transactions (the rest is ours)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn: Callable[[], _T]) -> _T:
        """Call ``fn``, counting its duration."""
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds += time.perf_counter() - start


class TimingExecer(RealExecer):
    """A :class:`RealExecer` whose commands' wall time goes to a :class:`ToolTimer`."""

    def __init__(self, netns: str, timer: ToolTimer) -> None:
        super().__init__(netns)
        self.timer = timer

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        return self.timer.timed(
            lambda: super(TimingExecer, self).run(argv, stdin=stdin, timeout=timeout)
        )


class TimedContext:
    """A libnftables context whose transactions' wall time goes to a :class:`ToolTimer`."""

    def __init__(self, context: NftContext, timer: ToolTimer) -> None:
        self.context = context
        self.timer = timer

    def run(self, script: str, *, json: bool = False) -> str:
        """Run ``script`` through the wrapped context, timed."""
        return self.timer.timed(lambda: self.context.run(script, json=json))

    def close(self) -> None:
        """Close the wrapped context."""
        self.context.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (cache control and the like) goes to the wrapped context, untimed.
        return getattr(self.context, name)


class TimedKernel:
    """An IPVS kernel handle whose netlink calls' wall time goes to a :class:`ToolTimer`."""

    def __init__(self, kernel: NetlinkIpvsKernel, timer: ToolTimer) -> None:
        self.kernel = kernel
        self.timer = timer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.kernel, name)
        if not callable(attr) or name == "close":
            return attr
        return lambda *args, **kwargs: self.timer.timed(lambda: attr(*args, **kwargs))


class ModeAdapter(ABC):
    """A proxy mode (and layout or backend) as the benchmark sees it: the controller's own
    :class:`~minikproxy.modes.base.ProxyMode` (built by the controller's factory), with
    node options like the ones ``run`` derives from the benchmark's flags."""

    name: ClassVar[str]
    #: ``run`` flags selecting this mode (the bench adds the rest).
    run_flags: ClassVar[tuple[str, ...]]
    #: ``ProxyConfig`` overrides selecting this mode.
    config: ClassVar[dict[str, str]]
    backend: ClassVar[IptablesBackend] = "nft"

    def unavailable(self) -> str | None:
        """Why this mode cannot be measured on this machine (None: it can)."""
        return None

    def kernel_bytes(self, netns: str) -> int | None:
        """Kernel memory the loaded ruleset takes in ``netns``, where the kernel reports it
        (None elsewhere)."""
        return None

    @abstractmethod
    def options(self) -> Any:
        """The node options plans are compiled with."""

    def build(self, netns: str | None = None, timer: ToolTimer | None = None) -> ProxyMode[Any]:
        """The mode with kernel handles in ``netns`` (their tool time going to ``timer``), or
        in dry-run without ``netns``."""
        config = ProxyConfig().with_overrides(**self.config)
        execer = None if netns is None else TimingExecer(netns, timer or ToolTimer())
        mode = build_mode(config, [IPV4], execer, self.backend)
        applier = getattr(mode, "applier", None)
        if isinstance(applier, NftablesApplier) and execer is not None:
            applier.context = TimedContext(applier.context, execer.timer)  # type: ignore[assignment]
        if isinstance(mode, IpvsMode) and execer is not None and mode.appliers is not None:
            # Netlink operations are the kernel's share too (the tools' processes already are).
            assert isinstance(mode.kernel, NetlinkIpvsKernel)
            timed = TimedKernel(mode.kernel, execer.timer)
            for ipvs_applier in mode.appliers.values():
                ipvs_applier.kernel = timed
        return mode

    def compile(self, mode: ProxyMode[Any], state: ProxyState) -> Any:
        """A full compile."""
        return mode.compile(state, self.options(), None, None)

    def increment(self, mode: ProxyMode[Any], previous: Any, snapshot: Snapshot) -> str:
        """What a sync after ``snapshot``'s change compiles, and the text it sends."""
        plan = mode.compile(snapshot.state, self.options(), previous, snapshot.changed)
        return self.increment_text(mode, previous, plan)

    @abstractmethod
    def increment_text(self, mode: ProxyMode[Any], previous: Any, plan: Any) -> str:
        """The text a partial sync from ``previous`` to ``plan`` sends to the kernel."""

    @abstractmethod
    def size(self, text: str) -> RulesetSize:
        """How big a plan rendered as ``text`` is."""


class IptablesAdapter(ModeAdapter):
    """iptables mode on one backend (``iptables-<backend>-restore``)."""

    def options(self) -> IptablesOptions:
        return iptables_options()

    def increment_text(self, mode: ProxyMode[Any], previous: Any, plan: Any) -> str:
        text: str = plan.render_partial()
        return text

    def size(self, text: str) -> RulesetSize:
        return iptables_size(text)


class IptablesNft(IptablesAdapter):
    name = "iptables"
    backend = "nft"
    config = {"mode": "iptables"}
    run_flags = ("--proxy-mode", "iptables", "--iptables-backend", "nft")


class IptablesLegacy(IptablesAdapter):
    name = "iptables-legacy"
    backend = "legacy"
    config = {"mode": "iptables"}
    run_flags = ("--proxy-mode", "iptables", "--iptables-backend", "legacy")

    def kernel_bytes(self, netns: str) -> int | None:
        return legacy_table_bytes(netns)


class NftablesAdapter(ModeAdapter):
    """nftables mode in one layout (one libnftables transaction per sync)."""

    def options(self) -> NftablesOptions:
        return nftables_options()

    def increment_text(self, mode: ProxyMode[Any], previous: Any, plan: Any) -> str:
        changed = mode.changed_ports(plan)
        if changed is None:
            changed = frozenset(previous.services) | frozenset(plan.services)
        script = plan.incremental_script(previous, changed)
        text: str = plan.render() if script is None else script
        return text

    def size(self, text: str) -> RulesetSize:
        return nft_size(text)


class NftablesFlat(NftablesAdapter):
    name = "nftables"
    config = {"mode": "nftables", "nftables_layout": "flat"}
    run_flags = ("--proxy-mode", "nftables")  # the flat layout is run's default


class NftablesKubeProxy(NftablesAdapter):
    name = "nftables-kube-proxy"
    config = {"mode": "nftables", "nftables_layout": "kube-proxy"}
    run_flags = ("--proxy-mode", "nftables", "--nftables-layout", "kube-proxy")


class Ipvs(ModeAdapter):
    """ipvs mode (netlink, large first loads by ``ipvsadm -R``/``ipset restore``/``ip
    -batch``, the iptables rules by ``iptables-restore`` on the nf_tables backend)."""

    name = "ipvs"
    config = {"mode": "ipvs"}
    run_flags = ("--proxy-mode", "ipvs")

    def unavailable(self) -> str | None:
        if kernel_has_ipvs():
            return None
        return "this kernel has no IPVS"

    def options(self) -> IpvsOptions:
        return ipvs_options()

    def increment_text(self, mode: ProxyMode[Any], previous: Any, plan: Any) -> str:
        # A partial sync is netlink operations, not text: what it changes, as ipset, ipvsadm
        # and address lines (the dry-run diff), stands for it.
        return "\n".join(mode.describe(previous, plan))

    def size(self, text: str) -> RulesetSize:
        return ipvs_size(text)


ADAPTERS: dict[str, type[ModeAdapter]] = {
    a.name: a for a in (IptablesNft, IptablesLegacy, NftablesFlat, NftablesKubeProxy, Ipvs)
}
#: Modes named in the issue that have no adapter, and why.
MISSING: dict[str, str] = {}
