"""iptables mode: kube-proxy's iptables rules, applied with ``iptables-restore --noflush``.

Partial syncs write only the chains whose rules changed (and edit the top-level chains in
place when few of their rules changed); full syncs rewrite every chain we own, in batches of
Services on the nf_tables backend (see :data:`NFT_FULL_SYNC_BATCH`). The canary chains
``KUBE-PROXY-CANARY`` in mangle, nat and filter tell when someone flushed our tables.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from minikproxy.compile.iptables import (
    IptablesOptions,
    IptablesRuleset,
    compile_iptables,
    jump_rules,
)
from minikproxy.compile.names import KUBE_MARK_MASQ, KUBE_PROXY_CANARY, is_service_chain
from minikproxy.dataplane.iptables import IptablesError, IptablesRunner, parse_chains
from minikproxy.model.names import IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints
from minikproxy.modes.base import CategorizedView, FrontendOptions, ProxyMode
from minikproxy.nodeopts import iptables_options
from minikproxy.plan import describe_changes

if TYPE_CHECKING:
    from minikproxy.config import ProxyConfig
    from minikproxy.metrics import ProxyMetrics

logger = logging.getLogger(__name__)

NFT_FULL_SYNC_BATCH = 50
"""Services per ``iptables-restore --noflush`` in a full sync on the nf_tables backend.

Measured here at 10k Services x 10 endpoints: one --noflush restore of the whole ruleset did
not finish in 300 s on nf_tables (its cost grows faster than linearly with the size of one
transaction), batches of 50 take ~13 s in all, batches of 1000 ~70 s. Legacy iptables loads
the same ruleset in one restore in ~12 s, so it is not batched.
"""


class IptablesMode(ProxyMode[IptablesRuleset]):
    """iptables mode over one :class:`IptablesRunner` per family (None: dry-run).

    ``rewrite_top_level`` True makes partial syncs rewrite the whole ``KUBE-SERVICES`` family
    of chains, as kube-proxy does; ``nft_batch`` is :data:`NFT_FULL_SYNC_BATCH`.
    """

    name = "iptables"

    def __init__(
        self,
        dataplanes: Mapping[IPFamily, IptablesRunner] | None = None,
        *,
        nft_batch: int = NFT_FULL_SYNC_BATCH,
        rewrite_top_level: bool = False,
    ) -> None:
        self.dataplanes = dataplanes
        self.nft_batch = nft_batch
        self.rewrite_top_level = rewrite_top_level
        self._random_fully = {f: ipt.has_random_fully() for f, ipt in (dataplanes or {}).items()}
        # Rules written per table since the last record_metrics (sync_proxy_rules_iptables_last).
        self._written_rules = {"filter": 0, "nat": 0}

    @property
    def dry_run(self) -> bool:
        """True without runners."""
        return self.dataplanes is None

    def options(
        self,
        config: ProxyConfig,
        node: NodeInfo,
        family: IPFamily,
        node_addresses: Sequence[str],
        service_cidrs: Sequence[str],
    ) -> IptablesOptions:
        """:func:`~minikproxy.nodeopts.iptables_options` (service CIDRs play no part here)."""
        return iptables_options(
            config,
            node,
            family,
            node_addresses=node_addresses,
            random_fully=self._random_fully.get(family, True),
        )

    def compile(
        self,
        state: ProxyState,
        options: FrontendOptions,
        previous: IptablesRuleset | None,
        changed: frozenset[NamespacedName] | None,
    ) -> IptablesRuleset:
        """:func:`~minikproxy.compile.iptables.compile_iptables`, incremental when it can."""
        assert isinstance(options, IptablesOptions)
        return compile_iptables(
            state,
            options,
            previous=previous,
            changed_services=changed if previous is not None else None,
        )

    def changed_ports(self, plan: IptablesRuleset) -> frozenset[ServicePortName] | None:
        """The ruleset's ``changed`` ports."""
        return None if plan.changed is None else frozenset(plan.changed)

    def describe(self, old: IptablesRuleset | None, new: IptablesRuleset) -> Iterator[str]:
        """Added and removed rule lines per service port (:func:`describe_changes`)."""
        return describe_changes(old, new, new.family)

    def categorized(self, plan: IptablesRuleset) -> Mapping[ServicePortName, CategorizedEndpoints]:
        """Each port's categorisation, as its rules were compiled."""
        return CategorizedView(plan.services)

    def apply(self, new: IptablesRuleset, applied: IptablesRuleset | None, full: bool) -> None:
        """A full restore (batched on nf_tables), or only the chains that changed."""
        assert self.dataplanes is not None, "apply() in dry-run"
        ipt = self.dataplanes[new.family]
        if full or applied is None or new.changed is None:
            self._apply_full(ipt, new, first=applied is None)
            return
        data = new.render_partial(rewrite_top_level=self.rewrite_top_level).encode()
        if data:
            self._restore(ipt, data)

    def _apply_full(self, ipt: IptablesRunner, ruleset: IptablesRuleset, first: bool) -> None:
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
            for i in range(0, len(ruleset.order), batch):
                self._restore(ipt, ruleset.render_service_batch(ruleset.order[i : i + batch]))
            self._restore(ipt, ruleset.render_top_level(delete_chains=stale))
            return
        self._restore(ipt, ruleset.render(jumps=False, canary=True, delete_chains=stale))

    def _restore(self, ipt: IptablesRunner, text: str | bytes) -> None:
        """``iptables-restore --noflush`` of ``text``, tallying the rules written per table."""
        data = text.encode() if isinstance(text, str) else text
        ipt.restore(data, noflush=True, counters=True)
        for section in data.split(b"\n*"):  # one per table; bytes ops: this can be MBs
            table = section[:64].lstrip(b"*").split(b"\n", 1)[0].strip().decode(errors="replace")
            if table in self._written_rules:
                self._written_rules[table] += section.count(b"\n-A ")

    def intact(self, applied: Mapping[IPFamily, IptablesRuleset]) -> str | None:
        """Whether the ``KUBE-PROXY-CANARY`` chains are all still there (a failure to look is
        logged and taken as intact: the next check tries again)."""
        if self.dataplanes is None:
            return None
        for family in applied:
            ipt = self.dataplanes[family]
            for table in ("mangle", "nat", "filter"):
                try:
                    present = ipt.chain_exists(table, KUBE_PROXY_CANARY)
                except IptablesError as err:
                    logger.warning("cannot check the %s canary in %s: %s", family, table, err)
                    return None
                if not present:
                    return f"{family} canary chain gone from table {table}"
        return None

    def record_metrics(
        self, metrics: ProxyMetrics, applied: Mapping[IPFamily, IptablesRuleset]
    ) -> None:
        """``sync_proxy_rules_iptables_total`` and ``sync_proxy_rules_iptables_last``."""
        counts = {"filter": 0, "nat": 0}
        for ruleset in applied.values():
            for table, count in ruleset.rule_counts().items():
                counts[table] += count
        for table, count in counts.items():
            metrics.iptables_rules_total.labels(table=table).set(count)
        if self.dataplanes is not None:
            for table, count in self._written_rules.items():
                metrics.iptables_rules_last_sync.labels(table=table).set(count)
        self._written_rules = {"filter": 0, "nat": 0}

    def record_failure(self, metrics: ProxyMetrics, full: bool) -> None:
        """``sync_proxy_rules_iptables_restore_failures_total`` (and the partial one)."""
        metrics.iptables_restore_failures_total.inc()
        if not full:
            metrics.iptables_partial_restore_failures_total.inc()
        self._written_rules = {"filter": 0, "nat": 0}

    def expected_error(self, err: Exception) -> str | None:
        """An iptables-restore rejection, with the offending input line."""
        if isinstance(err, IptablesError):
            detail = str(err)
            if err.line is not None:
                detail += f" (input line {err.line}: {err.line_text!r})"
            return detail
        return super().expected_error(err)
