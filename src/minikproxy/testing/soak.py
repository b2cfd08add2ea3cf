"""The churn soak: random API changes against a running controller, measured end to end.

A :class:`~minikproxy.testing.churn.ChurnCluster` lives in a fake API server in its own
process (as a real API server would: in this process its HTTP work would compete with the
controller for the GIL). The real :class:`~minikproxy.controller.Controller` runs here with
``--min-sync-period 0``, watching it through the ``kubernetes`` client and programming the
node namespace of a netns :class:`~minikproxy.testing.netns.Topology` (nf_tables backend).
Changes come in bursts; every ``checkpoint_every`` changes the churn pauses until the kernel
has caught up, and the node's ``iptables-save`` must equal, rule for rule, a fresh ``render``
of the objects the API server holds, loaded into an empty namespace.

What is measured (all on ``time.monotonic``, which is system-wide, so both processes share it):

* **lag** of a change: from just before the API server is asked to make it to the end of
  the first successful sync whose snapshot includes it (that sync's ``iptables-restore``
  calls have returned, so the kernel holds it). A sync includes a change of a kind when the
  resourceVersion of the last object of that kind it applied is at least the change's
  (:attr:`~minikproxy.proxier.SyncResult.resource_versions`). EndpointSlices of headless
  Services, which the proxy's watch filters out, have no lag. The largest lag is the most the
  kernel was ever behind the API.
* **sync times**: the proxier's own duration of every sync after the initial one, with the
  UDP conntrack reconcile that follows it (:attr:`~minikproxy.proxier.SyncResult.total`, the
  figure behind ``kubeproxy_sync_proxy_rules_duration_seconds``, as kube-proxy's includes its
  conntrack cleanup) and without it (the rules alone); and the reconcile's own time.
* **conntrack**: the node's table holds a population of UDP flows
  (:mod:`minikproxy.testing.ctflows`): flows to the UDP Services' cluster IPs and NodePorts
  answered by their serving endpoints, topped up after the initial sync and at every
  checkpoint, which go stale as the churn changes them; flows that are no Service's; and
  optionally a large TCP population. At every checkpoint (after the sync and reconcile that
  followed the last change) no Service flow may be left whose reply source is not a serving
  endpoint of its frontend, as computed from the API server's objects (a frontend that went
  away loses its flows), and every other flow must be there. The flows the reconciler deleted
  are counted.
* **RSS** of this process (controller plus harness) after warm-up (the first checkpoint) and
  at every later checkpoint.
"""

from __future__ import annotations

import difflib
import multiprocessing
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.dataplane.execer import RealExecer
from minikproxy.model.names import IPV4
from minikproxy.proxier import SyncResult
from minikproxy.render import render_objects
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.churn import CLUSTER_CIDR, NODE, NODE_IP, ChurnCluster
from minikproxy.testing.ctflows import FlowCheck, FlowPopulation, udp_service_frontends
from minikproxy.testing.netns import Topology

#: (kind plural, resourceVersion, monotonic time just before the write) of one change.
ChangeRecord = tuple[str, int, float]


@dataclass(frozen=True)
class SoakSettings:
    """The shape of a soak run (the defaults are issue 7's: 300 Services, 3000 changes)."""

    services: int = 300
    changes: int = 3000
    checkpoint_every: int = 500
    udp_share: float = 0.2
    conntrack: bool = True  # False: the proxier skips UDP conntrack cleanup (a control run)
    service_flows: int = 2500  # UDP flows to Services kept in the node's table
    other_flows: int = 1000  # UDP flows that are no Service's (never to be deleted)
    tcp_flows: int = 0  # TCP flows (the reconciler's kernel filter keeps them in the kernel)
    seed: int = 9
    burst_weights: tuple[tuple[tuple[int, int], int], ...] = (
        ((1, 10), 60),
        ((10, 60), 30),
        ((100, 300), 10),
    )
    gap: tuple[float, float] = (0.05, 0.5)  # seconds between bursts
    catch_up_timeout: float = 120.0


@dataclass
class Checkpoint:
    """The kernel compared with a fresh render after ``changes`` changes."""

    changes: int
    identical: bool
    diff: str
    rss_kb: int
    flows: FlowCheck | None = None


@dataclass
class SoakReport:
    """Everything a soak run measured."""

    settings: SoakSettings
    initial_sync: float
    syncs: list[SyncResult]
    lags: list[float]
    checkpoints: list[Checkpoint]
    restore_failures: int
    rss_after_warmup_kb: int
    rss_max_kb: int
    churn_seconds: float
    bursts: list[tuple[int, int]] = field(default_factory=list)  # (changes, syncs that wrote it)
    conntrack_deleted: int = 0  # UDP flows the reconciler deleted (its metric)
    service_flows_inserted: int = 0

    @property
    def sync_times(self) -> list[float]:
        """Durations of the syncs after the initial one, conntrack reconcile included (what
        ``sync_proxy_rules_duration_seconds`` observes, and what the targets are about)."""
        return [s.total for s in self.syncs]

    @property
    def rules_times(self) -> list[float]:
        """The same syncs without the conntrack reconcile (the rules alone)."""
        return [s.duration for s in self.syncs]

    @property
    def conntrack_times(self) -> list[float]:
        """The conntrack reconcile's part of each sync."""
        return [s.conntrack_seconds for s in self.syncs]

    @property
    def conntrack_ok(self) -> bool:
        """Every checkpoint's conntrack check passed."""
        return all(c.flows is not None and c.flows.ok for c in self.checkpoints)

    @property
    def rss_growth(self) -> float:
        """RSS growth after warm-up, as a fraction of the warm-up RSS."""
        if not self.rss_after_warmup_kb:
            return 0.0
        return self.rss_max_kb / self.rss_after_warmup_kb - 1.0

    def summary(self) -> str:
        """The figures, one per line."""
        times, lags = sorted(self.sync_times), sorted(self.lags)
        rules, ct = sorted(self.rules_times), sorted(self.conntrack_times)
        checks = [c.flows for c in self.checkpoints if c.flows is not None]
        s = self.settings
        full = sum(1 for x in self.syncs if x.full)
        identical = sum(1 for c in self.checkpoints if c.identical)
        big = [syncs for size, syncs in self.bursts if size >= 100]
        return "\n".join(
            [
                f"churn soak: {s.services} Services, {len(self.lags)} changes seen by the proxy "
                f"({s.changes} made) in {self.churn_seconds:.1f} s, UDP share {s.udp_share:.0%}, "
                f"conntrack cleanup {'on' if s.conntrack else 'off'}, seed {s.seed}",
                f"conntrack table: {s.service_flows} UDP flows to UDP Services (topped up at "
                f"every checkpoint), {s.other_flows} other UDP, {s.tcp_flows} TCP",
                f"initial full sync: {self.initial_sync * 1000:.0f} ms",
                f"syncs: {len(times)} ({full} full); with the conntrack reconcile p50 "
                f"{_ms(_pct(times, 50))}, p95 {_ms(_pct(times, 95))}, "
                f"max {_ms(times[-1] if times else 0)}; rules only p50 {_ms(_pct(rules, 50))}, "
                f"p95 {_ms(_pct(rules, 95))}, max {_ms(rules[-1] if rules else 0)}",
                f"conntrack reconcile: p50 {_ms(_pct(ct, 50))}, p95 {_ms(_pct(ct, 95))}, "
                f"max {_ms(ct[-1] if ct else 0)}; UDP flows deleted {self.conntrack_deleted} "
                f"(of {self.service_flows_inserted} Service flows inserted)",
                f"conntrack checks passed: {sum(c.ok for c in checks)}/{len(checks)}; stale "
                f"Service flows left {sum(len(c.violations) for c in checks)}, other flows "
                f"lost {sum(c.others_inserted - c.other_flows for c in checks)}",
                f"lag API -> kernel: p50 {_ms(_pct(lags, 50))}, p99 {_ms(_pct(lags, 99))}, "
                f"max {_ms(lags[-1] if lags else 0)}",
                f"bursts: {len(self.bursts)}; syncs writing a burst: median "
                f"{statistics.median(b[1] for b in self.bursts) if self.bursts else 0:.0f}, "
                f"max {max((b[1] for b in self.bursts), default=0)}; for the "
                f"{len(big)} bursts of 100 or more changes median "
                f"{statistics.median(big) if big else 0:.0f}, max {max(big, default=0)}",
                f"checkpoints identical: {identical}/{len(self.checkpoints)}; "
                f"restore failures: {self.restore_failures}",
                f"RSS after warm-up {self.rss_after_warmup_kb / 1024:.0f} MB, max after "
                f"{self.rss_max_kb / 1024:.0f} MB (growth {self.rss_growth:+.0%})",
            ]
        )


def _pct(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def rss_kb() -> int:
    """This process's resident set size (VmRSS), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def normalized_rules(saved: str) -> list[str]:
    """``iptables-save`` output in a canonical order that keeps what matters: per table, the
    chain declarations (counters zeroed) sorted, then each chain's rules in their order, the
    chains sorted by name. Two rulesets that behave the same give the same list."""
    tables: dict[str, tuple[set[str], dict[str, list[str]]]] = {}
    decls: set[str] = set()
    rules: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            decls, rules = tables.setdefault(line[1:], (set(), {}))
        elif line.startswith(":"):
            decls.add(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
        else:
            rules.setdefault(line.split(" ", 2)[1], []).append(line)
    out: list[str] = []
    for table in sorted(tables):
        decls, rules = tables[table]
        out.append(f"*{table}")
        out.extend(sorted(decls))
        for chain in sorted(rules):
            out.extend(rules[chain])
    return out


# --- the API server's process ---------------------------------------------------------------


def _serve_churn(conn: Connection, kubeconfig: str, settings: SoakSettings) -> None:
    """The child process: a fake API server holding the churn cluster, making changes on
    request. Messages: ``("burst", n)`` -> the n changes' records; ``("objects",)`` -> every
    Service, EndpointSlice and Node; ``("stop",)``."""
    cluster = ChurnCluster(settings.services, udp_share=settings.udp_share, seed=settings.seed)
    with FakeApiServer() as api:
        for obj in cluster.initial_objects():
            api.create(obj)
        api.write_kubeconfig(kubeconfig)
        conn.send(("ready",))
        while True:
            message = conn.recv()
            if message[0] == "burst":
                records: list[ChangeRecord | None] = []
                for _ in range(message[1]):
                    change = cluster.next_change()
                    start = time.monotonic()
                    if change.op == "create":
                        stored = api.create(change.obj or {})
                    elif change.op == "update":
                        stored = api.update(change.obj or {})
                    else:
                        stored = api.delete(change.plural, change.namespace, change.name)
                    rv = int(stored["metadata"]["resourceVersion"])
                    records.append(None if change.hidden else (change.plural, rv, start))
                conn.send(records)
            elif message[0] == "objects":
                conn.send([o for k in ("nodes", "services", "endpointslices")
                           for o in api.objects(k)])  # fmt: skip
            else:
                return


@contextmanager
def churn_api_server(settings: SoakSettings, workdir: Path) -> Iterator[Connection]:
    """Start the API server process; yield the connection that drives it."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    kubeconfig = str(workdir / "kubeconfig")
    process = ctx.Process(
        target=_serve_churn, args=(child, kubeconfig, settings), name="churn-apiserver"
    )
    process.start()
    try:
        if not parent.poll(60) or parent.recv() != ("ready",):
            raise RuntimeError("the churn API server did not start")
        yield parent
    finally:
        with suppress(OSError):
            parent.send(("stop",))
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join(5)


# --- the proxy's side -----------------------------------------------------------------------


class SyncRecorder:
    """Collects every :class:`SyncResult` (the proxier's ``on_sync`` hook, called after the
    sync's conntrack reconcile) and answers "has the kernel caught up with these
    resourceVersions?" (rules and conntrack both)."""

    def __init__(self) -> None:
        self.results: list[SyncResult] = []
        self._cond = threading.Condition()

    def __call__(self, result: SyncResult) -> None:
        with self._cond:
            self.results.append(result)
            self._cond.notify_all()

    def covers(self, result: SyncResult, wanted: dict[str, int]) -> bool:
        """Whether ``result`` includes every change up to ``wanted`` (kind -> version)."""
        return result.ok and all(
            int(result.resource_versions.get(kind, "0")) >= rv for kind, rv in wanted.items()
        )

    def wait_covered(self, wanted: dict[str, int], timeout: float) -> bool:
        """Wait until a successful sync includes ``wanted``."""
        with self._cond:
            return self._cond.wait_for(
                lambda: any(self.covers(r, wanted) for r in reversed(self.results[-50:])),
                timeout,
            )


def compute_lags(records: list[ChangeRecord], syncs: list[SyncResult]) -> list[float]:
    """Each change's lag: from the change to the end of the first successful sync that
    includes it (changes never included are left out: the caller checks coverage)."""
    lags: list[float] = []
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for kind, rv, when in records:
        by_kind.setdefault(kind, []).append((rv, when))
    for kind, changes in by_kind.items():
        changes.sort()
        i = 0
        for sync in syncs:
            if not sync.ok:
                continue
            seen = int(sync.resource_versions.get(kind, "0"))
            while i < len(changes) and changes[i][0] <= seen:
                lags.append(max(0.0, sync.ended - changes[i][1]))
                i += 1
    return lags


def syncs_per_burst(burst: list[ChangeRecord], syncs: list[SyncResult]) -> int:
    """How many syncs wrote the changes of ``burst``: from the first that includes any of
    them to the first successful one that includes them all."""
    if not burst:
        return 0

    def includes(sync: SyncResult, change: ChangeRecord) -> bool:
        return int(sync.resource_versions.get(change[0], "0")) >= change[1]

    first = next((i for i, s in enumerate(syncs) if any(includes(s, c) for c in burst)), None)
    last = next(
        (i for i, s in enumerate(syncs) if s.ok and all(includes(s, c) for c in burst)), None
    )
    if first is None or last is None:
        return 0
    return last - first + 1


def soak_config() -> ProxyConfig:
    """The proxy's configuration in the soak (and the render it is compared with)."""
    return ProxyConfig().with_overrides(
        hostname_override=NODE,
        cluster_cidr=CLUSTER_CIDR,
        min_sync_period=0.0,
        sync_period=30.0,
    )


def compare_with_render(topo: Topology, reference: Topology, objects: list[Any]) -> str:
    """The difference between the node's rules and a fresh render of ``objects`` loaded into
    ``reference``'s empty node namespace ("" when identical)."""
    result = render_objects(
        [SourcedObject(o, "api") for o in objects], soak_config(), families=[IPV4]
    )
    reference.reset_rules()
    reference.load_iptables(result.payloads[IPV4], backend="nft")
    want = normalized_rules(reference.iptables_save(IPV4, "nft"))
    got = normalized_rules(topo.iptables_save(IPV4, "nft"))
    if got == want:
        return ""
    diff = difflib.unified_diff(want, got, "fresh render", "kernel", lineterm="", n=1)
    return "\n".join(list(diff)[:80])


def run_soak(
    settings: SoakSettings,
    workdir: Path,
    *,
    prepare: Callable[[Controller], None] | None = None,
) -> SoakReport:
    """Run one churn soak (needs root) and return what it measured. ``prepare`` is called
    with the controller before it starts (to profile or instrument it)."""
    import random

    rng = random.Random(settings.seed + 1)
    recorder = SyncRecorder()
    records: list[ChangeRecord] = []
    checkpoints: list[Checkpoint] = []
    bursts: list[list[ChangeRecord]] = []
    with Topology() as topo, Topology() as reference, churn_api_server(settings, workdir) as api:
        execer = RealExecer(topo.namespaces["node"])
        controller = Controller(
            soak_config(),
            NODE,
            load_api_client(str(workdir / "kubeconfig")),
            execer=execer,
            backend="nft",
            families=[IPV4],
            service_health_addresses=("127.0.0.1",),
        )
        if not settings.conntrack:
            controller.proxier.conntrack = None
        population = FlowPopulation(
            topo.namespaces["node"],
            NODE_IP,
            service_flows=settings.service_flows,
            other_flows=settings.other_flows,
            tcp_flows=settings.tcp_flows,
            seed=settings.seed + 2,
        )
        controller.proxier.on_sync = recorder
        if prepare is not None:
            prepare(controller)
        start = time.monotonic()
        controller.start()
        try:
            if not recorder.wait_covered({}, settings.catch_up_timeout):
                raise RuntimeError("the initial sync did not finish")
            initial = recorder.results[-1].duration
            population.insert_others()
            api.send(("objects",))
            population.top_up(udp_service_frontends(api.recv(), NODE_IP), 0)
            first = len(recorder.results)
            churn_start = time.monotonic()
            done = 0
            rss_warm = rss_max = 0
            while done < settings.changes:
                next_checkpoint = min(
                    settings.changes,
                    (done // settings.checkpoint_every + 1) * settings.checkpoint_every,
                )
                ((low, high),) = rng.choices(
                    [r for r, _ in settings.burst_weights], [w for _, w in settings.burst_weights]
                )
                burst = min(rng.randint(low, high), next_checkpoint - done)
                api.send(("burst", burst))
                seen = [r for r in api.recv() if r is not None]
                records.extend(seen)
                bursts.append(seen)
                done += burst
                if done == next_checkpoint:
                    wanted: dict[str, int] = {}
                    for kind, rv, _ in records:
                        wanted[kind] = max(wanted.get(kind, 0), rv)
                    if not recorder.wait_covered(wanted, settings.catch_up_timeout):
                        raise RuntimeError(f"the kernel did not catch up after {done} changes")
                    api.send(("objects",))
                    objects = api.recv()
                    diff = compare_with_render(topo, reference, objects)
                    frontends = udp_service_frontends(objects, NODE_IP)
                    flows = population.check(frontends)
                    flows.added = population.top_up(frontends, flows.service_flows)
                    rss = rss_kb()
                    if not checkpoints:
                        rss_warm = rss
                    else:
                        rss_max = max(rss_max, rss)
                    checkpoints.append(Checkpoint(done, not diff, diff, rss, flows))
                else:
                    time.sleep(rng.uniform(*settings.gap))
            churn_seconds = time.monotonic() - churn_start
        finally:
            controller.stop()
            population.close()
        del start
        registry = controller.metrics.registry
        failures = registry.get_sample_value(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
        )
        deleted = registry.get_sample_value(
            "kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": IPV4}
        )
    syncs = recorder.results[first:]
    return SoakReport(
        settings=settings,
        initial_sync=initial,
        syncs=syncs,
        lags=compute_lags(records, recorder.results),
        checkpoints=checkpoints,
        restore_failures=int(failures or 0),
        rss_after_warmup_kb=rss_warm,
        rss_max_kb=rss_max or rss_warm,
        churn_seconds=churn_seconds,
        bursts=[(len(b), syncs_per_burst(b, syncs)) for b in bursts],
        conntrack_deleted=int(deleted or 0),
        service_flows_inserted=population.service_inserted,
    )
