"""The proxier: API events in, kernel rules out, through a bounded-frequency sync loop that
every proxy mode shares.

Handlers only record changes in the :class:`~minikproxy.changes.ClusterTracker` and poke the
runner; nothing is written before both Services and EndpointSlices have been listed once.
:meth:`Proxier.sync_proxy_rules` has kube-proxy's skeleton: decide full or partial, snapshot,
have the mode (:class:`~minikproxy.modes.base.ProxyMode`) compile incrementally and apply
atomically, and on failure keep the old rules, count, back off and make the next sync full.
Each IP family does so on its own, as kube-proxy's proxier per family does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TextIO

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.config import ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler, ReconcileError
from minikproxy.dataplane.execer import ExecCancelledError
from minikproxy.dataplane.iptables import IptablesRunner
from minikproxy.gcutil import InitialLoadGC
from minikproxy.healthz import ProxierHealth, ServiceHealthServer
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV6, IPFamily, NamespacedName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.problems import ObjectProblem
from minikproxy.model.state import ProxyState
from minikproxy.modes.base import NoLocalCounter, Plan, ProxyMode
from minikproxy.modes.iptables import NFT_FULL_SYNC_BATCH, IptablesMode
from minikproxy.nodeopts import PRIMARY, nodeport_address_setting, primary_family

logger = logging.getLogger(__name__)

FULL_SYNC_PERIOD = 3600.0
"""A full sync runs at least this often (kube-proxy's ``FullSyncPeriod``)."""


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

    The families are independent, as kube-proxy's one proxier per family: ``ok`` is True when
    every family's rules went in; ``failed`` names the families whose apply failed (they kept
    their previous rules), ``full_families`` those whose sync was full (``full``: any was).
    The rules of the families not in ``failed`` include the changes up to
    ``resource_versions``.
    """

    full: bool
    ok: bool
    duration: float = 0.0
    error: str = ""
    resource_versions: Mapping[str, str] = field(default_factory=dict)
    ended: float = 0.0
    conntrack_seconds: float = 0.0
    elapsed: float = 0.0
    failed: tuple[IPFamily, ...] = ()
    full_families: frozenset[IPFamily] = frozenset()

    @property
    def total(self) -> float:
        """The whole sync, the rules, the bookkeeping after them and the conntrack reconcile
        (``elapsed``; for a result that does not set it, ``duration`` plus the reconcile)."""
        return self.elapsed or self.duration + self.conntrack_seconds


@dataclass
class _FamilyState:
    """One family's bookkeeping: each family syncs, fails and backs off on its own."""

    applied: Any = None  # the mode's Plan the kernel holds
    applied_state: ProxyState | None = None
    compiled: Any = None  # the last Plan compiled (dry-run: the one printed)
    changed: frozenset[NamespacedName] | None = None  # Services the last sync changed
    needs_full: bool = True  # the next sync of this family is full
    last_full: float = -float("inf")  # the proxier's clock at its last successful full sync
    failures: int = 0  # consecutive failed syncs


@dataclass
class Proxier:
    """Keeps one node's proxy rules in sync with the tracked cluster state, in any mode.

    ``mode`` is the :class:`~minikproxy.modes.base.ProxyMode` that compiles and installs the
    rules; a mode without kernel handles is a dry-run: compile as in production and print the
    plan to ``out``, never touching the kernel. Without ``mode``, iptables mode is built from
    ``dataplanes`` (each IP family's iptables runner; None: dry-run), ``nft_batch`` and
    ``rewrite_top_level``. ``local_addresses`` returns the node's interface addresses for
    ``--nodeport-addresses`` CIDR matching.
    """

    config: ProxyConfig
    node_name: str
    families: Sequence[IPFamily]
    metrics: ProxyMetrics
    health: ProxierHealth
    mode: ProxyMode[Any] | None = None
    dataplanes: Mapping[IPFamily, IptablesRunner] | None = None
    conntrack: ConntrackReconciler | None = None
    service_health: ServiceHealthServer | None = None
    local_addresses: Callable[[IPFamily], Sequence[str]] | None = None
    out: TextIO | None = None
    clock: Callable[[], float] = time.monotonic
    wallclock: Callable[[], float] = time.time
    full_sync_period: float = FULL_SYNC_PERIOD
    nft_batch: int = NFT_FULL_SYNC_BATCH
    # True: kube-proxy's partial sync (always KUBE-SERVICES). Read once, to build the default
    # iptables mode: later, set the mode's own attribute.
    rewrite_top_level: bool = False
    runner: Runner | None = None
    last_sync: SyncResult | None = None
    on_sync: Callable[[SyncResult], None] | None = None  # called after every sync
    # Called once, on the sync thread, after the sync that completed the first successful
    # apply of every family, or one full-sync period after the first family's when another
    # keeps failing (the controller removes the other modes' leftovers there: the old
    # rules serve a failing family meanwhile, but not for ever).
    on_first_sync: Callable[[], None] | None = None
    service_cidrs: tuple[str, ...] = ()  # --service-cidr or the API's ServiceCIDRs
    tracker: ClusterTracker = field(init=False)

    def __post_init__(self) -> None:
        self.tracker = ClusterTracker(self.node_name, report=self._log_problem)
        # Trigger times not after this are ignored, like kube-proxy's trackerStartTime: a
        # restart must not report every EndpointSlice's age as programming latency.
        self._started_at = self.wallclock()
        self._lock = threading.Lock()
        self._synced: set[str] = set()
        self._resource_versions: dict[str, str] = {}
        self._families: dict[IPFamily, _FamilyState] = {f: _FamilyState() for f in self.families}
        self._no_local = {f: NoLocalCounter() for f in self.families}
        self._logged_node_addresses: list[Any] | None = None
        self._node_exists = False
        self._started = False  # the first sync was queued
        self._all_synced_once = False  # on_first_sync was called
        self._first_applied_at: float | None = None  # when the first family's rules went in
        self._start_lock = threading.Lock()
        # Held by the controller while the initial lists arrive; released after the first sync.
        self.initial_load_gc = InitialLoadGC()
        if self.mode is None:
            self.mode = IptablesMode(
                self.dataplanes, nft_batch=self.nft_batch, rewrite_top_level=self.rewrite_top_level
            )
        self._mode: ProxyMode[Any] = self.mode
        self._mode.conntrack = self.conntrack

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
        if PRIMARY in nodeport_address_setting(self.config) and not self.config.node_ips:
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
            for state in self._families.values():
                state.needs_full = True
        self.sync()

    def set_service_cidrs(self, cidrs: Sequence[str]) -> None:
        """Take the cluster's service CIDRs (``--service-cidr`` or the ServiceCIDR objects);
        a change makes the next sync full in nftables mode (its service-CIDR checks are in the
        table's skeleton) once the first sync has been queued (that one is full anyway). The
        other modes do not use them (as kube-proxy's): no resync there."""
        new = tuple(cidrs)
        with self._lock:
            if new == self.service_cidrs:
                return
            self.service_cidrs = new
        if self._started and self._mode.name == "nftables":
            self.force_full_sync(f"service CIDRs now {', '.join(new) or 'none'}")

    def check_canaries(self) -> bool:
        """Ask the mode whether our state is still in the kernel (iptables: the
        KUBE-PROXY-CANARY chains; nftables: the table and its rules); if someone removed it,
        force a full sync. Returns True when it is there (or nothing has been written yet)."""
        if self._mode.dry_run:
            return True
        # A family whose next sync is full anyway (failed, or forced) is not looked at.
        applied = {
            f: s.applied
            for f, s in self._families.items()
            if s.applied is not None and not s.needs_full
        }
        if not applied:
            return True
        reason = self._mode.intact(applied)
        if reason is None:
            return True
        self.force_full_sync(reason)
        return False

    # --- the sync --------------------------------------------------------------------------

    def sync_proxy_rules(self) -> bool:
        """One sync of every family: returns False when some family failed (the runner then
        retries). The families are independent, as kube-proxy's proxier per family: one that
        fails keeps its previous rules, is counted, backs off and syncs in full next time,
        while the others get their rules and everything that follows a successful sync
        (health, health-check node ports, metrics, conntrack cleanup) and stay partial."""
        if not self.initialized:
            return True
        start = self.clock()
        with self._lock:
            full = {
                family: state.needs_full or start - state.last_full >= self.full_sync_period
                for family, state in self._families.items()
            }
            # Cleared when the decision is taken, under the lock: a force_full_sync() that
            # comes while this sync runs (the canary monitor) is kept for the next one.
            for state in self._families.values():
                state.needs_full = False
        versions: dict[str, str] = {}
        try:
            with self._lock:
                # Under the snapshot's own lock: an event between the two would be in the
                # rules but not in the versions this sync reports.
                versions = dict(self._resource_versions)
                snapshots = {f: self.tracker.snapshot(f) for f in self.families}
                node = self.tracker.node
                service_cidrs = self.service_cidrs  # one value for every family of the sync
                self.tracker.checkout_pending()
                self.metrics.service_changes_pending.set(0)
                self.metrics.endpoint_changes_pending.set(0)
        except Exception as err:
            # Whatever went wrong, the changes taken from the tracker must not be lost: the
            # next sync is full. (A snapshot that fails half-way keeps its dirty set.)
            return self._finish(start, full, versions, {}, dict.fromkeys(self.families, err))
        synced: dict[IPFamily, Snapshot] = {}
        errors: dict[IPFamily, Exception] = {}
        for family in self.families:
            try:
                self._sync_family(family, snapshots[family], node, service_cidrs, full[family])
            except Exception as err:
                errors[family] = err
                if _cancelled(err):  # stopping: the families not tried yet are not synced
                    for other in self.families:
                        if other not in synced:
                            errors.setdefault(other, err)  # keep an earlier family's own error
                    break
                continue
            synced[family] = snapshots[family]
        return self._finish(start, full, versions, synced, errors)

    def _finish(
        self,
        start: float,
        full: Mapping[IPFamily, bool],
        versions: Mapping[str, str],
        synced: Mapping[IPFamily, Snapshot],
        errors: Mapping[IPFamily, Exception],
    ) -> bool:
        """The bookkeeping after the families were tried: ``synced`` got their rules (with
        their snapshots), ``errors`` did not (with why)."""
        for family in synced:
            state = self._families[family]
            state.failures = 0
            if full[family]:
                state.last_full = start
        detail = self._failed(errors, full) if errors else ""
        end = self.clock()
        result = SyncResult(
            full=any(full[f] for f in (*synced, *errors)),
            ok=not errors,
            duration=end - start,
            error=detail,
            resource_versions=versions,
            ended=end,
            failed=tuple(errors),
            full_families=frozenset(f for f in (*synced, *errors) if full[f]),
        )
        self.last_sync = result
        if synced:
            self.initial_load_gc.release()
            if self._first_applied_at is None:
                self._first_applied_at = start
            try:
                self._after_success(synced, full)
            except Exception:  # the rules are in: not a failed sync; the next sync redoes it
                logger.exception("work after a successful sync failed")
            # kube-proxy cleans conntrack at the end of syncProxyRules, inside the time its
            # sync_proxy_rules_duration_seconds observes (a deferred call from the start):
            # so do we.
            reconcile_start = self.clock()
            self._reconcile_conntrack(synced)
            finished = self.clock()
            result.conntrack_seconds = finished - reconcile_start
            result.elapsed = finished - start
            self._observe_latency(any(full[f] for f in synced), result.elapsed)
        if self.on_sync is not None:
            self.on_sync(result)
        if (
            not self._all_synced_once
            and self._first_applied_at is not None
            and (
                all(state.applied is not None for state in self._families.values())
                or self.clock() - self._first_applied_at >= self.full_sync_period
            )
        ):
            self._all_synced_once = True
            if self.on_first_sync is not None:
                self.on_first_sync()
        return not errors

    def _failed(self, errors: Mapping[IPFamily, Exception], full: Mapping[IPFamily, bool]) -> str:
        """Log and count each failed family, make its next sync full and back off; returns
        the detail for :attr:`SyncResult.error`."""
        with self._lock:
            for family in errors:
                self._families[family].needs_full = True
        details: list[str] = []
        counted: set[int] = set()  # one error (a snapshot's) fails every family, counted once
        failed = False
        for family, err in errors.items():
            what = self._what(family, full)
            if _cancelled(err):  # stopping: not a failure
                logger.info("%s sync interrupted: %s", what, err)
                details.append(f"interrupted: {err}")
                continue
            failed = True
            state = self._families[family]
            state.failures += 1
            state.compiled = None
            expected = self._mode.expected_error(err)
            if expected is not None:
                detail = expected
                logger.error("%s sync failed, keeping the previous rules: %s", what, detail)
            else:
                detail = f"{type(err).__name__}: {err}"
                logger.error(
                    "%s sync failed unexpectedly, keeping the previous rules",
                    what,
                    exc_info=err,
                )
            if id(err) not in counted:
                counted.add(id(err))
                self._mode.record_failure(self.metrics, full[family], err)
            details.append(detail if len(self.families) == 1 else f"{family}: {detail}")
        if failed and self.runner is not None:
            failures = max(self._families[f].failures for f in errors)
            backoff = min(self.config.sync_period, 0.5 * 2 ** min(failures, 10))
            self.runner.retry_after(backoff)
        return "; ".join(dict.fromkeys(details))

    def _what(self, family: IPFamily, full: Mapping[IPFamily, bool]) -> str:
        kind = _kind(full[family])
        return kind if len(self.families) == 1 else f"{family} {kind}"

    def _sync_family(
        self,
        family: IPFamily,
        snapshot: Snapshot,
        node: NodeInfo,
        service_cidrs: Sequence[str],
        full: bool,
    ) -> None:
        state = self._families[family]
        mode = self._mode
        addresses: Sequence[str] = ()
        if self.config.nodeport_addresses and self.local_addresses is not None:
            addresses = self.local_addresses(family)
        options = mode.options(self.config, node, family, addresses, service_cidrs)
        base = state.compiled if mode.dry_run else state.applied
        previous = None if full else base
        plan = mode.compile(
            snapshot.state, options, previous, snapshot.changed if previous is not None else None
        )
        if mode.dry_run:
            if self.out is not None:
                for line in mode.describe(state.compiled, plan):
                    self.out.write(line + "\n")
                self.out.flush()
        else:
            mode.apply(plan, state.applied, full)
        state.applied, state.applied_state, state.compiled = plan, snapshot.state, plan
        state.changed = None if full else snapshot.changed

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

    def _after_success(
        self, synced: Mapping[IPFamily, Snapshot], full: Mapping[IPFamily, bool]
    ) -> None:
        """What follows a successful sync of the ``synced`` families (the others keep what
        their last success set: their rules in the kernel did not change)."""
        metrics = self.metrics
        metrics.sync_proxy_rules_last_timestamp.set(self.wallclock())
        now = self.wallclock()
        for snapshot in synced.values():
            for times in snapshot.trigger_times.values():
                for text in times:
                    stamp = _timestamp(text)
                    if stamp is not None and stamp > self._started_at:
                        metrics.network_programming_latency.observe(max(0.0, now - stamp))
        mode = self._mode
        applied: dict[IPFamily, Plan] = {
            f: s.applied for f, s in self._families.items() if s.applied is not None
        }
        no_local = {"internal": 0, "external": 0}
        for family, plan in applied.items():
            counter = self._no_local[family]
            if family in synced:
                state = self._families[family].applied_state
                assert state is not None
                counter.recount(
                    state,
                    mode.categorized(plan),
                    None if full[family] else mode.changed_ports(plan),
                )
            for policy, count in counter.counts.items():
                no_local[policy] += count
        for policy, total in no_local.items():
            metrics.sync_proxy_rules_no_local_endpoints_total.labels(traffic_policy=policy).set(
                total
            )
        mode.record_metrics(metrics, applied)
        for family in synced:
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
        # As the mode applies the setting (nftables mode: ``primary`` when unset); if none,
        # the server's own addresses (every address).
        if nodeport_address_setting(self.config):
            self.service_health.set_bind_addresses(_health_check_addresses(synced))
        self.service_health.sync_services(ports)
        self.service_health.sync_endpoints(local)

    def _reconcile_conntrack(self, families: Iterable[IPFamily]) -> None:
        """Delete stale UDP flows of the ``families`` just synced (see
        :mod:`minikproxy.ctreconcile`). A failure is logged and counted, never fails the
        sync: the next sync retries."""
        if self.conntrack is None or self._mode.dry_run:
            return
        for family in families:
            fam = self._families[family]
            if fam.applied is None or fam.applied_state is None:
                continue
            try:
                result = self.conntrack.reconcile(
                    fam.applied_state, fam.applied.options, fam.changed
                )
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


def _cancelled(err: Exception) -> bool:
    """Whether ``err`` is a command killed because the proxy is stopping (not a failure)."""
    return isinstance(err.__cause__, ExecCancelledError)


def _timestamp(rfc3339: str) -> float | None:
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
