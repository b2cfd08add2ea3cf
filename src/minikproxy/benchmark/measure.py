"""Compile, first load and data path of one mode at one size (no controller).

* compile: a full compile and render (chain-name hashes already cached, as in every sync
  after the first); one EndpointSlice change: the model's snapshot plus the mode's
  incremental compile and render of what it sends to the kernel; the ruleset's size.
* load: a first sync into a new, empty namespace (a full compile, then the mode's full apply,
  exactly as the controller's first sync runs them): the tools' and kernel's share (the wall
  time of the ``iptables-restore``/``iptables-save`` processes; of the libnftables
  transaction for nftables) and our process's (the rest: compile, render, bookkeeping).
* baseline (IPVS): the same rendered state loaded by the stock tools alone (``ipset restore``,
  ``ipvsadm -R``, ``ip -batch``, ``iptables-restore``) into a new, empty namespace: what our
  first load is compared with.
* data path: with the ruleset loaded in a topology's node, new TCP connections from the
  client namespace to a ClusterIP whose endpoints answer in the backend namespace.
"""

from __future__ import annotations

import copy
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from minikproxy.benchmark.adapters import ModeAdapter, RulesetSize, ToolTimer
from minikproxy.benchmark.cluster import (
    DATAPATH_VIP,
    NODE,
    PORT,
    SERVICE_CIDR,
    TARGET_PORT,
    cluster_objects,
)
from minikproxy.benchmark.probing import Prober
from minikproxy.benchmark.shield import cleanup_shield, closing
from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.ipvs import DUMMY_DEVICE
from minikproxy.dataplane.execer import RealExecer
from minikproxy.model.names import IPV4
from minikproxy.testing.ipvsload import split_sections
from minikproxy.testing.netns import DEFAULT_CLIENTS, Topology
from minikproxy.testing.synthetic import synthetic_slice


@dataclass
class Cluster:
    """One synthetic cluster in a tracker, and its first IPv4 snapshot."""

    size: int
    endpoints: int
    objects: list[dict[str, Any]]
    tracker: ClusterTracker
    snapshot: Snapshot


def build_cluster(size: int, endpoints: int) -> Cluster:
    """The cluster of ``size`` synthetic Services (plus the benchmark's own)."""
    objects = cluster_objects(size, endpoints)
    tracker = ClusterTracker(NODE)
    tracker.add_objects(objects)
    return Cluster(size, endpoints, objects, tracker, tracker.snapshot(IPV4))


@dataclass
class CompileResults:
    """Seconds per round, and the ruleset's size."""

    full: list[float] = field(default_factory=list)
    incremental: list[float] = field(default_factory=list)
    size: RulesetSize | None = None
    compiled: Any = None
    text: str = ""


def _changed_slice(cluster: Cluster, generation: int) -> dict[str, Any]:
    obj = copy.deepcopy(
        synthetic_slice(cluster.size // 2, cluster.endpoints, generation=generation)
    )
    obj["metadata"]["resourceVersion"] = str(generation + 2)
    return obj


def measure_compile(
    adapter: ModeAdapter, cluster: Cluster, rounds: int, tick: Callable[[], None] = lambda: None
) -> CompileResults:
    """Full and one-change compiles, ``rounds`` of each, by the mode in dry-run."""
    out = CompileResults()
    mode = adapter.build()
    state = cluster.snapshot.state
    plan = adapter.compile(mode, state)  # warms the chain-name caches
    text = ""
    for _ in range(rounds):
        start = time.perf_counter()
        plan = adapter.compile(mode, state)
        text = plan.render()
        out.full.append(time.perf_counter() - start)
    out.compiled, out.text = plan, text
    out.size = adapter.size(text)
    # Alternate between the original slice and a changed one: every round is one real change.
    tracker = cluster.tracker
    original = synthetic_slice(cluster.size // 2, cluster.endpoints)
    changed = _changed_slice(cluster, 1)
    previous = plan
    for i in range(rounds):
        start = time.perf_counter()
        tracker.upsert_endpoint_slice(changed if i % 2 == 0 else original)
        snap = tracker.snapshot(IPV4)
        new = mode.compile(snap.state, adapter.options(), previous, snap.changed)
        adapter.increment_text(mode, previous, new)
        out.incremental.append(time.perf_counter() - start)
        previous = new
        tick()
    if rounds % 2:
        tracker.upsert_endpoint_slice(original)
        tracker.snapshot(IPV4)
    mode.close()
    return out


class Scratch:
    """Empty network namespaces (loopback up) named ``<prefix>-ldN``, created one at a time and all
    deleted by :meth:`close` (also on an interrupt)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._live: list[str] = []
        self._n = 0

    def fresh(self) -> str:
        """A new empty namespace."""
        self._n += 1
        name = f"{self.prefix}-ld{self._n}"
        self._live.append(name)
        subprocess.run(["ip", "netns", "add", name], check=True)
        # IPVS refuses real servers (EINVAL) in a namespace whose loopback is down.
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    def drop(self, name: str) -> None:
        """Delete one namespace made by :meth:`fresh`."""
        subprocess.run(["ip", "netns", "del", name], check=False)
        self._live.remove(name)

    def close(self) -> None:
        """Delete every namespace still there (a second interrupt meanwhile waits)."""
        with cleanup_shield():
            while self._live:
                self.drop(self._live[-1])


@contextmanager
def scratch_namespaces(prefix: str | None = None) -> Iterator[Scratch]:
    """A :class:`Scratch` that is emptied on leaving."""
    scratch = Scratch(prefix or f"mkpb{secrets.token_hex(3)}")
    try:
        yield scratch
    finally:
        scratch.close()


@dataclass
class LoadResults:
    """Seconds per round: our process, the tools and kernel, both."""

    ours: list[float] = field(default_factory=list)
    kernel: list[float] = field(default_factory=list)
    kernel_bytes: list[float] = field(default_factory=list)  # where the kernel reports it

    @property
    def total(self) -> list[float]:
        """Per round, the sum of both shares."""
        return [a + b for a, b in zip(self.ours, self.kernel, strict=True)]


def measure_load(
    adapter: ModeAdapter,
    cluster: Cluster,
    scratch: Scratch,
    rounds: int,
    tick: Callable[[], None] = lambda: None,
) -> LoadResults:
    """``rounds`` first syncs (a full compile and the mode's full apply, as the controller's
    first sync does them), each into a new empty namespace made outside the timing."""
    out = LoadResults()
    for _ in range(rounds):
        netns = scratch.fresh()
        timer = ToolTimer()
        mode = adapter.build(netns, timer)
        try:
            timer.seconds = 0.0  # building the mode may probe the tool: not part of the load
            start = time.perf_counter()
            plan = adapter.compile(mode, cluster.snapshot.state)
            mode.apply(plan, None, True)
            total = time.perf_counter() - start
            kernel_bytes = adapter.kernel_bytes(netns)
            if kernel_bytes is not None:
                out.kernel_bytes.append(float(kernel_bytes))
        finally:
            mode.close()
            scratch.drop(netns)
        out.ours.append(total - timer.seconds)
        out.kernel.append(timer.seconds)
        tick()
    return out


def ipvs_tool_load(netns: str, text: str) -> float:
    """Load ``render --proxy-mode ipvs`` output (one family) into the empty namespace
    ``netns`` with the stock tools, as a person would by hand: ``kube-ipvs0``, ``ipset
    restore``, ``ipvsadm -R``, ``ip -batch`` of the addresses, ``iptables-restore --noflush``
    (nf_tables backend, as ipvs mode's). Returns the seconds it took (the text's split into
    sections not included)."""
    sections = split_sections(text)
    batch = "".join(f"address add {line}\n" for line in sections["addresses"].splitlines())
    steps: list[tuple[list[str], str]] = [
        (["ip", "link", "add", DUMMY_DEVICE, "type", "dummy"], ""),
        (["ipset", "restore"], sections["ipset"]),
        (["ipvsadm", "-R"], sections["ipvs"]),
        (["ip", "-batch", "-"], batch),
        (["iptables-nft-restore", "-w", "60", "--noflush"], sections["iptables"]),
    ]
    execer = RealExecer(netns, timeout=900.0)
    start = time.perf_counter()
    for argv, stdin in steps:
        result = execer.run(argv, stdin=stdin.encode())
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {stderr[:300]}")
    return time.perf_counter() - start


def measure_tool_baseline(
    text: str, scratch: Scratch, rounds: int, tick: Callable[[], None] = lambda: None
) -> list[float]:
    """``rounds`` loads of ``text`` by :func:`ipvs_tool_load`, each into a new empty
    namespace made outside the timing; seconds per round."""
    out = []
    for _ in range(rounds):
        netns = scratch.fresh()
        try:
            out.append(ipvs_tool_load(netns, text))
        finally:
            scratch.drop(netns)
        tick()
    return out


def load_direct(adapter: ModeAdapter, netns: str, cluster: Cluster) -> None:
    """The mode's full apply of ``cluster`` into ``netns`` (no controller)."""
    mode = adapter.build(netns)
    try:
        mode.apply(adapter.compile(mode, cluster.snapshot.state), None, True)
    finally:
        mode.close()


@contextmanager
def datapath_topology(
    backends: tuple[str, ...], prefix: str | None = None, refusing: tuple[str, ...] = ()
) -> Iterator[tuple[Topology, Prober]]:
    """A :class:`~minikproxy.testing.netns.Topology` whose backend namespace answers TCP on
    the Services' target port at ``backends`` and holds ``refusing`` too (nothing listening
    there), and a :class:`Prober` in its client namespace; all deleted on leaving."""
    # Closed under cleanup_shield: a second interrupt must not leave namespaces behind.
    with closing(Topology(
        clients=DEFAULT_CLIENTS,
        # An IPv6 address too: the harness routes both families.
        backends=(*backends, *refusing, "fd00:10:2::2"),
        prefix=prefix,
    )) as topo:  # fmt: skip
        topo.setup()
        # Connections no rule rewrote are refused by the upstream (TCP RST) rather than
        # answered with ICMP net unreachable, which the kernel rate-limits per source
        # (routing errors: 5, then one a second): probes must all get an answer quickly.
        topo.exec_in("upstream", ["ip", "route", "add", "local", SERVICE_CIDR, "dev", "lo"])
        topo.serve_many([(ip, TARGET_PORT, "tcp") for ip in backends])
        with closing(Prober(topo.namespaces["client"])) as prober:
            yield topo, prober


@dataclass
class DatapathResults:
    """Seconds per connection; connections per second per round."""

    latencies: list[float]
    rates: list[float]
    unanswered: list[float]  # per rate round


def measure_datapath(
    prober: Prober, connections: int, rate_rounds: int, rate_seconds: float
) -> DatapathResults:
    """Connect latency of ``connections`` new connections to the answering ClusterIP, then
    ``rate_rounds`` rounds of connections per second for ``rate_seconds`` each. The rules
    must be loaded in the topology's node and its backends serving."""
    prober.connect_latencies(DATAPATH_VIP, PORT, 20)  # warm-up: neighbour entries, caches
    latencies = prober.connect_latencies(DATAPATH_VIP, PORT, connections)
    rounds = [prober.connection_rate(DATAPATH_VIP, PORT, rate_seconds) for _ in range(rate_rounds)]
    return DatapathResults(latencies, [r for r, _ in rounds], [float(f) for _, f in rounds])
