"""The proxier: API events in, kernel rules out, through a bounded-frequency sync loop.

Handlers only record changes in the :class:`~minikproxy.changes.ClusterTracker` and poke the
runner; nothing is written before both Services and EndpointSlices have been listed once.
:meth:`Proxier.sync_proxy_rules` has kube-proxy's skeleton: decide full or partial, snapshot,
compile (incrementally), apply atomically, and on failure keep the old rules, count, back
off and make the next sync full.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesRuleset, compile_iptables, jump_rules
from minikproxy.compile.names import KUBE_MARK_MASQ, KUBE_PROXY_CANARY, is_service_chain
from minikproxy.config import ProxyConfig
from minikproxy.dataplane.conntrack import Conntrack, ConntrackError
from minikproxy.dataplane.iptables import IptablesError, IptablesRunner
from minikproxy.gcutil import InitialLoadGC
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPFamily, NamespacedName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.state import ProxyState
from minikproxy.nodeopts import iptables_options
from minikproxy.plan import describe_changes

logger = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0
"""A full sync runs at least this often (kube-proxy's ``FullSyncPeriod``)."""

NFT_FULL_SYNC_BATCH = 50
"""Services per ``iptables-restore --noflush`` in a full sync on the nf_tables backend.

Measured here at 10k Services x 10 endpoints: one --noflush restore of the whole ruleset did
not finish in 300 s on nf_tables (its cost grows faster than linearly with the size of one
transaction), batches of 50 take ~13 s in all, batches of 1000 ~70 s. Legacy iptables loads
the same ruleset in one restore in ~12 s, so it is not batched.
"""


class Runner(Protocol):
    """The part of the bounded-frequency runner the proxier uses."""

    def run(self) -> None: ...

    def retry_after(self, interval: float) -> None: ...


@dataclass
class SyncResult:
    """What a sync did (for logs, tests, the dry-run printer and lag measurements).

    ``resource_versions`` maps each kind (``services``, ``endpointslices``, ``nodes``) to the
    resourceVersion of the last object of that kind the sync's snapshot includes: watch events
    arrive in resourceVersion order, so every change of that kind up to it is in the rules
    once the sync has ended. ``ended`` is the proxier's clock when it ended.
    """

    full: bool
    ok: bool
    restored_bytes: int = 0
    duration: float = 0.0
    error: str = ""
    resource_versions: Mapping[str, str] = field(default_factory=dict)
    ended: float = 0.0


@dataclass
class _FamilyState:
    applied: IptablesRuleset | None = None
    applied_state: ProxyState | None = None
    compiled: IptablesRuleset | None = None


@dataclass
class Proxier:
    """Keeps one node's iptables rules in sync with the tracked cluster state.

    ``dataplanes`` maps each IP family to its iptables runner; None means dry-run: compile as
    in production and print the plan to ``out``, never touching the kernel. ``local_addresses``
    returns the node's interface addresses for ``--nodeport-addresses`` CIDR matching.
    """

    config: ProxyConfig
    node_name: str
    families: Sequence[IPFamily]
    metrics: ProxyMetrics
    health: ProxierHealth
    dataplanes: Mapping[IPFamily, IptablesRunner] | None = None
    conntrack: Conntrack | None = None
    service_health: ServiceHealthServer | None = None
    local_addresses: Callable[[IPFamily], Sequence[str]] | None = None
    out: TextIO | None = None
    clock: Callable[[], float] = time.monotonic
    wallclock: Callable[[], float] = time.time
    full_sync_period: float = FULL_SYNC_PERIOD
    nft_batch: int = NFT_FULL_SYNC_BATCH
    rewrite_top_level: bool = False  # True: kube-proxy's partial sync (always KUBE-SERVICES)
    runner: Runner | None = None
    last_sync: SyncResult | None = None
    on_sync: Callable[[SyncResult], None] | None = None  # called after every sync
    tracker: ClusterTracker = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = ClusterTracker(self.node_name, report=self._log_problem)
        # Trigger times not after this are ignored, like kube-proxy's trackerStartTime: a
        # restart must not report every EndpointSlice's age as programming latency.
        self._started_at = self.wallclock()
        self._lock = threading.Lock()
        self._synced: set[str] = set()
        self._resource_versions: dict[str, str] = {}
        self._needs_full = True
        self._last_full = -float("inf")
        self._failures = 0
        self._families: dict[IPFamily, _FamilyState] = {f: _FamilyState() for f in self.families}
        self._written_rules = {"filter": 0, "nat": 0}
        self._logged_node_addresses: list[Any] | None = None
        # Held by the controller while the initial lists arrive; released after the first sync.
        self.initial_load_gc = InitialLoadGC()
        self._random_fully = {
            f: ipt.has_random_fully() for f, ipt in (self.dataplanes or {}).items()
        }

    # --- handlers --------------------------------------------------------------------------

    @staticmethod
    def _log_problem(problem: ObjectProblem) -> None:
        logger.warning("skipping invalid object: %s", problem)

    @property
    def initialized(self) -> bool:
        """True once Services and EndpointSlices have both been listed (kube-proxy's gate)."""
        return {"services", "endpointslices"} <= self._synced

    def handler(self, kind: str) -> ObjectEvents:
        """The :class:`~minikproxy.sources.kubeapi.ObjectHandler` for ``services``,
        ``endpointslices`` or ``nodes``."""
        return ObjectEvents(self, kind)

    def _apply_event(self, kind: str, obj: Mapping[str, Any], deleted: bool) -> None:
        tracker = self.tracker
        if kind == "services":
            fn = tracker.delete_service if deleted else tracker.upsert_service
            self.metrics.service_changes_total.inc()
        elif kind == "endpointslices":
            fn = tracker.delete_endpoint_slice if deleted else tracker.upsert_endpoint_slice
            self.metrics.endpoint_changes_total.inc()
        elif kind == "nodes":
            if deleted:
                return
            fn = tracker.set_node
            self.health.sync_node(dict(obj))
            self._log_node_addresses(obj)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        with self._lock:
            tracker.guarded(fn, obj)
            if isinstance(rv, str):
                self._resource_versions[kind] = rv
            pending = tracker.pending_services(self.families[0])
        self.metrics.service_changes_pending.set(pending)
        self.metrics.endpoint_changes_pending.set(pending)
        if self.initialized:
            self.sync()

    def _log_node_addresses(self, obj: Mapping[str, Any]) -> None:
        """Log the node IPs learned from the Node object (when ``--node-ip`` is not given),
        as kube-proxy logs the IPs it detects."""
        if self.config.node_ips:
            return
        addresses = [
            a.get("address")
            for a in (obj.get("status") or {}).get("addresses") or []
            if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP")
        ]
        if addresses != self._logged_node_addresses:
            self._logged_node_addresses = addresses
            logger.info("Node IPs from the Node object: %s", ", ".join(map(str, addresses)))

    def _mark_synced(self, kind: str) -> None:
        was = self.initialized
        self._synced.add(kind)
        if self.initialized and not was:
            logger.info("initial lists of Services and EndpointSlices received; syncing")
            self.sync()

    def sync(self) -> None:
        """Queue a sync (coalesced by the runner); never blocks."""
        for family in self.families:
            self.health.queued_update(family)
        self.metrics.sync_proxy_rules_last_queued_timestamp.set(self.wallclock())
        if self.runner is not None:
            self.runner.run()

    def force_full_sync(self, reason: str) -> None:
        """Make the next sync full and queue it."""
        logger.info("forcing a full sync: %s", reason)
        self._needs_full = True
        self.sync()

    def check_canaries(self) -> bool:
        """Check the KUBE-PROXY-CANARY chains; if someone flushed them, force a full sync.

        Returns True when they are all there (or nothing has been written yet).
        """
        if not self.dataplanes or self._needs_full:
            return True
        for family, ipt in self.dataplanes.items():
            if self._families[family].applied is None:
                continue
            for table in ("mangle", "nat", "filter"):
                try:
                    present = ipt.chain_exists(table, KUBE_PROXY_CANARY)
                except IptablesError as err:
                    logger.warning("cannot check the %s canary in %s: %s", family, table, err)
                    return True
                if not present:
                    self.force_full_sync(f"{family} canary chain gone from table {table}")
                    return False
        return True

    # --- the sync --------------------------------------------------------------------------

    def sync_proxy_rules(self) -> bool:
        """One sync: returns False on failure (the runner then retries)."""
        if not self.initialized:
            return True
        start = self.clock()
        full = self._needs_full or start - self._last_full >= self.full_sync_period
        with self._lock:
            snapshots = {f: self.tracker.snapshot(f) for f in self.families}
            node = self.tracker.node
            versions = dict(self._resource_versions)
        self.metrics.service_changes_pending.set(0)
        self.metrics.endpoint_changes_pending.set(0)
        restored = 0
        self._written_rules = {"filter": 0, "nat": 0}
        try:
            for family in self.families:
                restored += self._sync_family(family, snapshots[family], node, full)
        except (IptablesError, OSError, ValueError) as err:
            return self._failed(err, full, start, versions)
        end = self.clock()
        duration = end - start
        self.initial_load_gc.release()
        self._needs_full = False
        self._failures = 0
        if full:
            self._last_full = start
        self.last_sync = SyncResult(full, True, restored, duration, "", versions, end)
        self._after_success(snapshots, full, duration)
        if self.on_sync is not None:
            self.on_sync(self.last_sync)
        return True

    def _failed(
        self, err: Exception, full: bool, start: float, versions: Mapping[str, str]
    ) -> bool:
        detail = str(err)
        if isinstance(err, IptablesError) and err.line is not None:
            detail += f" (input line {err.line}: {err.line_text!r})"
        logger.error("%s sync failed, keeping the previous rules: %s", _kind(full), detail)
        self.metrics.iptables_restore_failures_total.inc()
        if not full:
            self.metrics.iptables_partial_restore_failures_total.inc()
        self._needs_full = True
        self._failures += 1
        for state in self._families.values():
            state.compiled = None
        if self.runner is not None:
            backoff = min(self.config.sync_period, 0.5 * 2 ** min(self._failures, 10))
            self.runner.retry_after(backoff)
        end = self.clock()
        self.last_sync = SyncResult(full, False, 0, end - start, detail, versions, end)
        if self.on_sync is not None:
            self.on_sync(self.last_sync)
        return False

    def _options(self, family: IPFamily, node: NodeInfo) -> Any:
        addresses: Sequence[str] = ()
        if self.config.nodeport_addresses and self.local_addresses is not None:
            addresses = self.local_addresses(family)
        return iptables_options(
            self.config,
            node,
            family,
            node_addresses=addresses,
            random_fully=self._random_fully.get(family, True),
        )

    def _sync_family(self, family: IPFamily, snapshot: Snapshot, node: NodeInfo, full: bool) -> int:
        state = self._families[family]
        options = self._options(family, node)
        base = state.compiled if self.dataplanes is None else state.applied
        previous = None if full else base
        ruleset = compile_iptables(
            snapshot.state,
            options,
            previous=previous,
            changed_services=snapshot.changed if previous is not None else None,
        )
        if self.dataplanes is None:
            if self.out is not None:
                for line in describe_changes(state.compiled, ruleset, family):
                    self.out.write(line + "\n")
                self.out.flush()
            state.compiled = ruleset
            state.applied, state.applied_state = ruleset, snapshot.state
            return 0
        ipt = self.dataplanes[family]
        if full or ruleset.changed is None:
            written = self._apply_full(ipt, ruleset)
        else:
            data = ruleset.render_partial(rewrite_top_level=self.rewrite_top_level).encode()
            written = self._restore(ipt, data) if data else 0
        old_ruleset, old_state = state.applied, state.applied_state
        state.applied, state.applied_state, state.compiled = ruleset, snapshot.state, ruleset
        if old_ruleset is not None and old_state is not None and self.conntrack is not None:
            self._clear_stale_udp(old_ruleset, old_state, ruleset, snapshot.state)
        return written

    def _apply_full(self, ipt: IptablesRunner, ruleset: IptablesRuleset) -> int:
        for jump in jump_rules(ruleset.options):
            ipt.ensure_chain(jump.table, jump.target)
            ipt.ensure_rule_prepended(jump.table, jump.source, shlex.split(jump.args()))
        ours = ruleset.all_chains()["nat"]
        stale = [c for c in ipt.list_chains("nat") if is_service_chain(c) and c not in ours]
        backend = getattr(ipt, "backend", "nft")
        batch = self.nft_batch if backend == "nft" else 0
        if batch and len(ruleset.order) > batch:
            ipt.ensure_chain("nat", KUBE_MARK_MASQ)
            written = 0
            for i in range(0, len(ruleset.order), batch):
                data = ruleset.render_service_batch(ruleset.order[i : i + batch]).encode()
                written += self._restore(ipt, data)
            data = ruleset.render_top_level(delete_chains=stale).encode()
            return written + self._restore(ipt, data)
        data = ruleset.render(jumps=False, canary=True, delete_chains=stale).encode()
        return self._restore(ipt, data)

    def _restore(self, ipt: IptablesRunner, data: bytes) -> int:
        """``iptables-restore --noflush`` of ``data``, tallying the rules written per table
        (``sync_proxy_rules_iptables_last``); returns the bytes written."""
        ipt.restore(data, noflush=True, counters=True)
        for section in data.split(b"\n*"):  # one per table; bytes ops: this can be MBs
            table = section[:64].lstrip(b"*").split(b"\n", 1)[0].strip().decode(errors="replace")
            if table in self._written_rules:
                self._written_rules[table] += section.count(b"\n-A ")
        return len(data)

    # --- after a successful sync -----------------------------------------------------------

    def _after_success(
        self, snapshots: Mapping[IPFamily, Snapshot], full: bool, duration: float
    ) -> None:
        metrics = self.metrics
        metrics.sync_proxy_rules_latency.observe(duration)
        (
            metrics.sync_full_proxy_rules_latency
            if full
            else metrics.sync_partial_proxy_rules_latency
        ).observe(duration)
        metrics.sync_proxy_rules_last_timestamp.set(self.wallclock())
        now = self.wallclock()
        for snapshot in snapshots.values():
            for times in snapshot.trigger_times.values():
                for text in times:
                    stamp = _timestamp(text)
                    if stamp is not None and stamp > self._started_at:
                        metrics.network_programming_latency.observe(max(0.0, now - stamp))
        counts = {"filter": 0, "nat": 0}
        applied = [s.applied for s in self._families.values() if s.applied is not None]
        for ruleset in applied:
            for table, count in ruleset.rule_counts().items():
                counts[table] += count
        # Recounted over every family when any changed: a partial sync of one family must
        # not drop the other family's services from the sum.
        if full or any(ruleset.changed for ruleset in applied):
            no_local = {"internal": 0, "external": 0}
            for ruleset in applied:
                for rules in ruleset.services.values():
                    no_local["internal"] += rules.no_local_internal
                    no_local["external"] += rules.no_local_external
            for policy, total in no_local.items():
                metrics.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy=policy).set(
                    total
                )
        for table, count in counts.items():
            metrics.iptables_rules_total.labels(table=table).set(count)
        if self.dataplanes is not None:
            for table, count in self._written_rules.items():
                metrics.iptables_rules_last_sync.labels(table=table).set(count)
        for family in self.families:
            self.health.updated(family)
        self._sync_service_health()

    def _sync_service_health(self) -> None:
        if self.service_health is None:
            return
        primary = self._families[self.families[0]]
        if primary.applied is None or primary.applied_state is None:
            return
        ports: dict[NamespacedName | str, int] = {}
        local: dict[NamespacedName | str, int] = {}
        for name, port in primary.applied_state.services.items():
            if port.health_check_node_port:
                svc = name.service
                ports[svc] = port.health_check_node_port
                rules = primary.applied.services.get(name)
                count = len(rules.categorized.local) if rules is not None else 0
                local[svc] = max(local.get(svc, 0), count)
        self.service_health.sync_services(ports)
        self.service_health.sync_endpoints(local)

    def _clear_stale_udp(
        self,
        old: IptablesRuleset,
        old_state: ProxyState,
        new: IptablesRuleset,
        new_state: ProxyState,
    ) -> None:
        """Delete UDP conntrack flows that would blackhole traffic (kube-proxy's event-based
        cleanup): flows DNATed to endpoints that went away, and flows to services that had no
        endpoint (and were rejected) but now have some. Never a wholesale flush."""
        assert self.conntrack is not None
        names: Iterable[Any] = (
            new.changed if new.changed is not None else (set(old.services) | set(new.services))
        )
        for name in names:
            if name.protocol != "UDP":
                continue
            old_rules, new_rules = old.services.get(name), new.services.get(name)
            old_eps = {e.address: e for e in old_rules.categorized.reachable} if old_rules else {}
            new_eps = {e.address for e in new_rules.categorized.reachable} if new_rules else set()
            port = new_state.services.get(name) or old_state.services.get(name)
            if port is None:
                continue
            service_ips = [port.cluster_ip, *port.external_ips, *port.load_balancer_vips]
            try:
                for address, ep in old_eps.items():
                    if address in new_eps:
                        continue
                    for ip in service_ips:
                        self.conntrack.clear_entries_for_nat(ip, ep.ip, "udp")
                    if port.node_port:
                        self.conntrack.clear_entries_for_port_nat(port.node_port, ep.ip, "udp")
                if not old_eps and new_eps:
                    for ip in service_ips:
                        self.conntrack.clear_entries_for_ip(ip, "udp")
                    if port.node_port:
                        self.conntrack.clear_entries_for_port(port.node_port, "udp", port.family)
            except (ConntrackError, ValueError) as err:
                logger.warning("conntrack cleanup for %s failed: %s", name, err)


class ObjectEvents:
    """Adapts reflector callbacks for one resource kind to the proxier."""

    def __init__(self, proxier: Proxier, kind: str) -> None:
        self._proxier = proxier
        self._kind = kind

    def on_add(self, obj: dict[str, Any]) -> None:
        """An object appeared."""
        self._proxier._apply_event(self._kind, obj, deleted=False)

    def on_update(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """An object changed."""
        self._proxier._apply_event(self._kind, new, deleted=False)

    def on_delete(self, obj: dict[str, Any]) -> None:
        """An object went away."""
        self._proxier._apply_event(self._kind, obj, deleted=True)

    def on_synced(self) -> None:
        """The first complete list was delivered."""
        self._proxier._mark_synced(self._kind)


def _kind(full: bool) -> str:
    return "full" if full else "partial"


def _timestamp(rfc3339: str) -> float | None:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
