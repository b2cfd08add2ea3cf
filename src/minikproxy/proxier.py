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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesRuleset, compile_iptables, jump_rules
from minikproxy.compile.names import KUBE_MARK_MASQ, KUBE_PROXY_CANARY, is_service_chain
from minikproxy.config import ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler, ReconcileError
from minikproxy.dataplane.execer import ExecCancelledError
from minikproxy.dataplane.iptables import IptablesError, IptablesRunner, parse_chains
from minikproxy.gcutil import InitialLoadGC
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV6, IPFamily, NamespacedName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.state import ProxyState
from minikproxy.nodeopts import PRIMARY, iptables_options, primary_family
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
    once the sync has ended. ``ended`` is the proxier's clock when it ended (the rules are in
    the kernel). ``duration`` is the sync up to then; ``conntrack_seconds`` the UDP conntrack
    reconcile that follows a successful one (kube-proxy's cleanup at the end of
    ``syncProxyRules``); ``elapsed`` the whole sync, from its start to the end of the
    reconcile: what ``sync_proxy_rules_duration_seconds`` observes (see :attr:`total`).
    """

    full: bool
    ok: bool
    restored_bytes: int = 0
    duration: float = 0.0
    error: str = ""
    resource_versions: Mapping[str, str] = field(default_factory=dict)
    ended: float = 0.0
    conntrack_seconds: float = 0.0
    elapsed: float = 0.0

    @property
    def total(self) -> float:
        """The whole sync, the rules, the bookkeeping after them and the conntrack reconcile
        (``elapsed``; for a result that does not set it, ``duration`` plus the reconcile)."""
        return self.elapsed or self.duration + self.conntrack_seconds


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
    conntrack: ConntrackReconciler | None = None
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
        self._node_exists = False
        self._started = False  # the first sync was queued
        self._start_lock = threading.Lock()
        # Held by the controller while the initial lists arrive; released after the first sync.
        self.initial_load_gc = InitialLoadGC()
        self._random_fully = {
            f: ipt.has_random_fully() for f, ipt in (self.dataplanes or {}).items()
        }
        # --service-cidr, else the API's ServiceCIDR objects (set_service_cidrs).
        self._service_cidrs: tuple[str, ...] = tuple(self.config.service_cidrs)

    # --- handlers --------------------------------------------------------------------------

    @staticmethod
    def _log_problem(problem: ObjectProblem) -> None:
        logger.warning("skipping invalid object: %s", problem)

    @property
    def initialized(self) -> bool:
        """True once Services and EndpointSlices have both been listed and, when the
        configuration depends on the Node, the Node has what it needs (kube-proxy's gates)."""
        lists = {"services", "endpointslices"} <= self._synced
        return lists and self.waiting_for_node() is None

    def node_dependency(self) -> str:
        """What in the configuration needs this node's Node object ("" if nothing does)."""
        if self.config.detect_local_mode == "NodeCIDR":
            return "detectLocalMode NodeCIDR (the Node's spec.podCIDRs)"
        if PRIMARY in self.config.nodeport_addresses and not self.config.node_ips:
            return "nodePortAddresses: [primary] (the Node's addresses)"
        return ""

    def waiting_for_node(self) -> str | None:
        """Why the first sync waits for the Node, or None if it does not (any more)."""
        needs = self.node_dependency()
        if not needs or self._started:
            return None
        if "nodes" not in self._synced:
            return f"Node {self.node_name!r} not listed yet and {needs} depends on it"
        if not self._node_exists:
            return (
                f"Node {self.node_name!r} does not exist (is --hostname-override or "
                f"$NODE_NAME right?) and {needs} depends on it"
            )
        if self.config.detect_local_mode == "NodeCIDR" and not self.tracker.node.pod_cidrs:
            return f"Node {self.node_name!r} has no spec.podCIDRs yet and {needs} depends on it"
        return None

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
                self._node_exists = False
                logger.warning(
                    "this node's Node %r was deleted: keeping its last known addresses, zone "
                    "and pod CIDRs",
                    self.node_name,
                )
                return
            if not self._node_exists and "nodes" in self._synced:
                logger.info("Node %r now exists", self.node_name)
            self._node_exists = True
            fn = tracker.set_node
            self.health.sync_node(dict(obj))
            self._log_node_addresses(obj)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        with self._lock:  # the gauges too: a sync taking the changes resets them under it
            tracker.guarded(fn, obj)
            if isinstance(rv, str):
                self._resource_versions[kind] = rv
            self.metrics.service_changes_pending.set(tracker.pending_service_changes)
            self.metrics.endpoint_changes_pending.set(tracker.pending_endpoint_changes)
        if self._started:
            self.sync()
        else:
            self._maybe_start()

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
        self._synced.add(kind)
        if kind == "nodes":
            reason = self.waiting_for_node()
            if reason is not None:
                logger.warning("waiting for the Node before the first sync: %s", reason)
            elif not self._node_exists:
                logger.warning(
                    "Node %r not found: its addresses, zone and pod CIDRs are unknown (is "
                    "--hostname-override or $NODE_NAME right?)",
                    self.node_name,
                )
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Queue the first sync once every gate is open (once)."""
        with self._start_lock:
            if self._started or not self.initialized:
                return
            self._started = True
        if self.node_dependency():
            logger.info(
                "initial lists of Services and EndpointSlices and the Node received; syncing"
            )
        else:
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
        """Make the next sync full and queue it (also when a sync is in flight: that one
        took its decision already, the flag is for the one after it)."""
        logger.info("forcing a full sync: %s", reason)
        with self._lock:
            self._needs_full = True
        self.sync()

    @property
    def service_cidrs(self) -> tuple[str, ...]:
        """The cluster's service CIDRs, both families (nftables mode's service-CIDR checks)."""
        return self._service_cidrs

    def set_service_cidrs(self, cidrs: Sequence[str]) -> None:
        """Replace the service CIDRs; a change forces a full sync (they are in the ruleset's
        skeleton), once the first sync has been queued (that one is full anyway). Modes that
        do not use them (iptables, as kube-proxy's) are not resynced."""
        new = tuple(cidrs)
        with self._lock:
            changed, self._service_cidrs = new != self._service_cidrs, new
        if changed and self._started and self.config.mode == "nftables":
            self.force_full_sync(f"service CIDRs changed to {', '.join(new) or 'none'}")

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
        with self._lock:
            full = self._needs_full or start - self._last_full >= self.full_sync_period
            # Cleared when the decision is taken, under the lock: a force_full_sync() that
            # comes while this sync runs (the canary monitor) is kept for the next one.
            self._needs_full = False
        versions: dict[str, str] = {}
        try:
            with self._lock:
                # Under the snapshot's own lock: an event between the two would be in the
                # rules but not in the versions this sync reports.
                versions = dict(self._resource_versions)
                snapshots = {f: self.tracker.snapshot(f) for f in self.families}
                node = self.tracker.node
                self.tracker.checkout_pending()
                self.metrics.service_changes_pending.set(0)
                self.metrics.endpoint_changes_pending.set(0)
            restored = 0
            self._written_rules = {"filter": 0, "nat": 0}
            for family in self.families:
                restored += self._sync_family(family, snapshots[family], node, full)
            end = self.clock()
            duration = end - start
            self.initial_load_gc.release()
            self._failures = 0
            if full:
                self._last_full = start
            result = SyncResult(full, True, restored, duration, "", versions, end)
            self.last_sync = result
            self._after_success(snapshots, full)
        except Exception as err:
            # Whatever went wrong, the changes taken from the tracker must not be lost: the
            # next sync is full. (A snapshot that fails half-way keeps its dirty set.)
            return self._failed(err, full, start, versions)
        # kube-proxy cleans conntrack at the end of syncProxyRules, inside the time its
        # sync_proxy_rules_duration_seconds observes (a deferred call from the start): so do we.
        reconcile_start = self.clock()
        self._reconcile_conntrack()
        finished = self.clock()
        result.conntrack_seconds = finished - reconcile_start
        result.elapsed = finished - start
        self._observe_latency(full, result.elapsed)
        if self.on_sync is not None:
            self.on_sync(result)
        return True

    def _failed(
        self, err: Exception, full: bool, start: float, versions: Mapping[str, str]
    ) -> bool:
        if isinstance(err.__cause__, ExecCancelledError):  # stopping: not a failure
            logger.info("%s sync interrupted: %s", _kind(full), err)
            with self._lock:
                self._needs_full = True
            return False
        detail = str(err)
        if isinstance(err, IptablesError) and err.line is not None:
            detail += f" (input line {err.line}: {err.line_text!r})"
        if isinstance(err, IptablesError | OSError | ValueError):
            logger.error("%s sync failed, keeping the previous rules: %s", _kind(full), detail)
        else:
            detail = f"{type(err).__name__}: {detail}"
            logger.exception("%s sync failed unexpectedly, keeping the previous rules", _kind(full))
        self.metrics.iptables_restore_failures_total.inc()
        if not full:
            self.metrics.iptables_partial_restore_failures_total.inc()
        with self._lock:
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
            written = self._apply_full(ipt, ruleset, first=state.applied is None)
        else:
            data = ruleset.render_partial(rewrite_top_level=self.rewrite_top_level).encode()
            written = self._restore(ipt, data) if data else 0
        state.applied, state.applied_state, state.compiled = ruleset, snapshot.state, ruleset
        return written

    def _apply_full(self, ipt: IptablesRunner, ruleset: IptablesRuleset, first: bool) -> int:
        for jump in jump_rules(ruleset.options):
            ipt.ensure_chain(jump.table, jump.target)
            ipt.ensure_rule_prepended(jump.table, jump.source, shlex.split(jump.args()))
        ours = ruleset.all_chains()["nat"]
        saved = ipt.save("nat")
        if first and self.conntrack is not None:
            # The rules a previous run left: Services deleted meanwhile lose their UDP flows.
            self.conntrack.remember_rules(ruleset.options.family, saved.decode(errors="replace"))
        stale = [c for c in parse_chains(saved) if is_service_chain(c) and c not in ours]
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

    def _observe_latency(self, full: bool, seconds: float) -> None:
        """A successful sync's duration, conntrack reconcile included, as kube-proxy's."""
        metrics = self.metrics
        metrics.sync_proxy_rules_latency.observe(seconds)
        (
            metrics.sync_full_proxy_rules_latency
            if full
            else metrics.sync_partial_proxy_rules_latency
        ).observe(seconds)

    def _after_success(self, snapshots: Mapping[IPFamily, Snapshot], full: bool) -> None:
        metrics = self.metrics
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

    def primary_family(self) -> IPFamily:
        """The node's primary IP family (kube-proxy's, from the node IP) among ours."""
        family = primary_family(self.config, self.tracker.node)
        return family if family in self._families else self.families[0]

    def _sync_service_health(self) -> None:
        """Health-check node ports and local endpoint counts from every family: a Service of
        one family only gets its server; for a dual-stack one the primary family answers."""
        if self.service_health is None:
            return
        primary = self.primary_family()
        ports: dict[NamespacedName | str, int] = {}
        local: dict[NamespacedName | str, int] = {}
        synced: dict[IPFamily, tuple[str, ...] | None] = {}
        for family in (primary, *(f for f in self.families if f != primary)):
            state = self._families[family]
            if state.applied is None or state.applied_state is None:
                continue
            synced[family] = state.applied.options.nodeport_addresses
            family_ports, family_local = _service_health_checks(state.applied_state)
            for svc, port in family_ports.items():
                if svc not in ports:
                    ports[svc] = port
                    local[svc] = family_local.get(svc, 0)
        if not synced:
            return
        if self.config.nodeport_addresses:  # else the server's own (every address)
            self.service_health.set_bind_addresses(_health_check_addresses(synced))
        self.service_health.sync_services(ports)
        self.service_health.sync_endpoints(local)

    def _reconcile_conntrack(self) -> None:
        """Delete stale UDP flows of every family (see :mod:`minikproxy.ctreconcile`).
        A failure is logged and counted, never fails the sync: the next sync retries."""
        if self.conntrack is None or self.dataplanes is None:
            return
        for family, fam in self._families.items():
            if fam.applied is None or fam.applied_state is None:
                continue
            try:
                result = self.conntrack.reconcile(fam.applied_state, fam.applied.options)
            except Exception as err:
                if isinstance(err, ReconcileError):
                    logger.warning("%s", err)
                else:
                    logger.exception("%s conntrack reconcile failed unexpectedly", family)
                self.metrics.conntrack_reconciler_failures_total.labels(ip_family=family).inc()
                continue
            self.metrics.conntrack_reconciler_latency.labels(ip_family=family).observe(
                result.seconds
            )
            if result.deleted:
                self.metrics.conntrack_reconciler_deleted_total.labels(ip_family=family).inc(
                    result.deleted
                )
            if result.stale:
                logger.info(
                    "%s conntrack: %d stale UDP flows of %d deleted (%d already gone) in %.1f ms",
                    family,
                    result.deleted,
                    result.listed,
                    result.missing,
                    result.seconds * 1e3,
                )


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


def _service_health_checks(
    state: ProxyState,
) -> tuple[dict[NamespacedName, int], dict[NamespacedName, int]]:
    """The health-check node port of each Service of ``state`` that has one, and its number
    of local ready endpoints (distinct IPs over all its ports, as kube-proxy counts them:
    terminating endpoints do not make a node healthy)."""
    ports: dict[NamespacedName, int] = {}
    ips: dict[NamespacedName, set[str]] = {}
    for name, port in state.services.items():
        if port.health_check_node_port:
            svc = name.service
            ports[svc] = port.health_check_node_port
            ips.setdefault(svc, set()).update(
                ep.ip for ep in state.endpoints_of(name) if ep.ready and ep.is_local
            )
    return ports, {svc: len(found) for svc, found in ips.items()}


def _health_check_addresses(nodeport: Mapping[IPFamily, tuple[str, ...] | None]) -> list[str]:
    """Where health-check node ports listen, following ``--nodeport-addresses`` per family
    (None: every address of that family): "" is every address, "0.0.0.0" and "::" every
    address of one family."""
    if all(addresses is None for addresses in nodeport.values()):
        return [""]
    out: list[str] = []
    for family, addresses in nodeport.items():
        if addresses is None:
            out.append("::" if family == IPV6 else "0.0.0.0")
        else:
            out.extend(a for a in addresses if a not in out)
    return out


def _kind(full: bool) -> str:
    return "full" if full else "partial"


def _timestamp(rfc3339: str) -> float | None:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
