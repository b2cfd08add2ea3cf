"""Applying compiled nftables rulesets to the kernel through one long-lived libnftables context.

:class:`NftablesApplier` works for both nftables layouts, anything that satisfies
:class:`NftRuleset` (``minikproxy.compile.nftables.NftablesRuleset``, the flat ``minikproxy``
table, and ``minikproxy.compile.nftables_kubeproxy.KubeProxyNftRuleset``, kube-proxy's
``kube-proxy`` table):

* :meth:`~NftablesApplier.apply_full` replaces the whole table in one transaction (the
  ruleset's ``render()`` starts with ``add table`` + ``delete table``);
* :meth:`~NftablesApplier.apply_changes` sends only the difference from the previous ruleset
  (element additions and deletions for the flat layout) as one transaction, or falls back to a
  full replace when the ruleset says the skeleton changed; it returns whether it did. For the
  flat layout it then deletes, in a second transaction, the ClientIP affinity entries the
  kernel learned that point to endpoints the change removed (the affinity maps are read over
  netlink, and only when such endpoints exist): until then, for the few milliseconds between
  the two, those clients still reach the endpoint that left;
* :meth:`~NftablesApplier.table_intact` is the canary: it counts the rules of one small base
  chain (``nat-prerouting``, which always jumps to ``services``) with one kernel-filtered
  netlink dump (:mod:`minikproxy.dataplane.nftnetlink`), not through libnftables, whose
  ``list chain`` first caches every set element (1.7 s at 10k Services); so its cost does not
  grow with the number of Services. A deleted table, or a flushed one (no rules left), reads as
  not intact: repair it with a full apply;
* :meth:`~NftablesApplier.cleanup` deletes the ``minikproxy`` and ``kube-proxy`` tables of both
  families (what this proxy and kube-proxy's nftables mode leave), nothing else.

A script nft rejects raises :class:`~minikproxy.dataplane.libnftables.NftablesError` naming the
offending line; the transaction is atomic, so the kernel keeps the previous rules. The applier
logs the line and counts it in :attr:`NftablesApplier.rejected`; the caller's next sync should
be full.

How to use::

    applier = NftablesApplier()                   # or NftablesApplier(netns="test-ns")
    applier.apply_full(ruleset)
    ...
    full = applier.apply_changes(ruleset, new_ruleset, changed_ports)
    if not applier.table_intact(new_ruleset):
        applier.apply_full(new_ruleset)
    applier.close()
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, Self, TypeVar

from minikproxy.dataplane.closing import Closing
from minikproxy.dataplane.libnftables import NftablesError, NftContext
from minikproxy.dataplane.nftnetlink import RuleCounter, SetElement
from minikproxy.model.names import ServicePortName

log = logging.getLogger(__name__)

#: A base chain every layout fills with one rule (``jump services``): the canary.
CANARY_CHAIN = "nat-prerouting"

#: The tables :meth:`NftablesApplier.cleanup` removes: ours and kube-proxy's nftables mode's.
OWNED_TABLES: tuple[tuple[str, str], ...] = (
    ("ip", "minikproxy"),
    ("ip6", "minikproxy"),
    ("ip", "kube-proxy"),
    ("ip6", "kube-proxy"),
)


class NftRuleset(Protocol):
    """A compiled nftables ruleset the applier can install."""

    @property
    def nft_table(self) -> tuple[str, str]:
        """``(family, table)`` of the one table the ruleset owns."""
        ...

    def render(self) -> str:
        """The complete script: creates or atomically replaces the whole table."""
        ...

    def incremental_script(self, previous: Self, changed: Iterable[ServicePortName]) -> str | None:
        """The transaction from ``previous`` to this ruleset, given the ports that may have
        changed; None when only a full :meth:`render` will do."""
        ...


class AffinityCleanupPlan(Protocol):
    """Stale affinity entries a ruleset wants deleted with an incremental apply (the flat
    layout's ``affinity_cleanup``; kube-proxy's layout deletes whole affinity sets itself)."""

    @property
    def family_prefix(self) -> str:
        """``ip minikproxy`` or ``ip6 minikproxy``."""
        ...

    @property
    def maps(self) -> tuple[str, ...]:
        """The maps to read."""
        ...

    def commands(self, elements: Mapping[str, Sequence[SetElement]]) -> str:
        """The transaction deleting the stale entries among the maps' elements."""
        ...


R = TypeVar("R", bound=NftRuleset)


class NftablesApplier(Closing):
    """Installs :class:`NftRuleset` s into one network namespace's kernel.

    Owns one :class:`~minikproxy.dataplane.libnftables.NftContext` (bound to ``netns`` if
    given, else to the caller's namespace) and serializes every call through it.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.context = NftContext(netns)
        try:
            self._counter = RuleCounter(netns)
        except BaseException:
            self.context.close()
            raise
        self._counter_lock = threading.Lock()
        #: Scripts nft rejected (each left the previous rules in place).
        self.rejected = 0
        self.full_applies = 0
        self.incremental_applies = 0

    def _run(self, script: str, what: str) -> None:
        try:
            self.context.run(script)
        except NftablesError as exc:
            self.rejected += 1
            log.error(
                "nftables %s rejected, previous rules kept: %s (line %s: %s)",
                what,
                exc.message.splitlines()[0] if exc.message else exc,
                exc.line,
                exc.line_text,
            )
            raise

    def apply_full(self, ruleset: NftRuleset) -> None:
        """Replace (or create) the ruleset's whole table in one transaction (then drop
        libnftables' cache of it: hundreds of MB at 10k Services that no later update needs).
        The ClientIP affinity entries of the table replaced that still point to a live endpoint
        are carried over in the same transaction, with the time they have left; if that
        transaction is rejected, the table alone is tried again (what is carried over must
        never keep the rules from being installed)."""
        script = ruleset.render()
        try:
            extra = ""
            restore = getattr(ruleset, "affinity_restore", None)
            if restore is not None:
                family, table = ruleset.nft_table
                maps: tuple[str, ...] = getattr(ruleset, "affinity_maps", ())
                try:
                    extra = restore(self._affinity_elements(f"{family} {table}", maps))
                except (OSError, ValueError) as err:
                    log.warning(
                        "cannot carry ClientIP affinity over the full sync of %s %s (clients "
                        "may switch endpoints once): %s",
                        family,
                        table,
                        err,
                    )
            try:
                self._run(script + extra, "full sync")
            except NftablesError:
                if not extra:
                    raise
                log.warning("retrying the full sync without the affinity entries carried over")
                self._run(script, "full sync")
        finally:
            self.context.drop_cache()
        self.full_applies += 1

    def apply_changes(
        self, previous: R, ruleset: R, changed_ports: Iterable[ServicePortName]
    ) -> bool:
        """Take the kernel from ``previous`` (installed) to ``ruleset`` in one transaction,
        sending only what ``changed_ports`` changed; return True if that needed a full replace
        (the skeleton changed). An empty difference sends nothing."""
        changed = list(changed_ports)
        script = ruleset.incremental_script(previous, changed)
        if script is None:
            self.apply_full(ruleset)
            return True
        if script:
            self._run(script, "incremental sync")
            self.incremental_applies += 1
        cleanup_of = getattr(ruleset, "affinity_cleanup", None)
        cleanup: AffinityCleanupPlan | None = cleanup_of(previous, changed) if cleanup_of else None
        if cleanup is not None:
            # After the commit no new connection can pick the endpoints that left, so one
            # read finds every entry pointing to them.
            stale = cleanup.commands(self._affinity_elements(cleanup.family_prefix, cleanup.maps))
            if stale:
                self._run(stale, "affinity cleanup")
        return False

    def _affinity_elements(self, prefix: str, maps: Iterable[str]) -> dict[str, list[SetElement]]:
        """The elements of the affinity maps (or sets) ``maps`` of table ``prefix`` (``ip
        minikproxy``), read over netlink (libnftables' listing costs ~30 us per element); none
        for one (or a table) that is not there."""
        family, table = prefix.split()
        with self._counter_lock:
            return {name: self._counter.elements(family, table, name) for name in maps}

    def set_elements(self, family: str, table: str, name: str) -> list[SetElement]:
        """The elements of set or map ``name`` as the kernel holds them (empty if it is
        missing): one kernel-filtered netlink dump of that set, whose cost is its size (not
        libnftables' ``list``, which first caches every set of the table)."""
        with self._counter_lock:
            return self._counter.elements(family, table, name)

    def table_intact(self, ruleset: NftRuleset) -> bool:
        """Whether the ruleset's table is present and not flushed (its canary chain still has
        its rule). Reads one small chain only: constant cost whatever the table's size."""
        family, table = ruleset.nft_table
        with self._counter_lock:
            return self._counter.count(family, table, CANARY_CHAIN) > 0

    def tables(self) -> list[tuple[str, str]]:
        """Every ``(family, name)`` table in the namespace."""
        items: list[dict[str, Any]] = json.loads(self.context.run("list tables", json=True)).get(
            "nftables", []
        )
        return [(i["table"]["family"], i["table"]["name"]) for i in items if "table" in i]

    def cleanup(self, tables: Iterable[tuple[str, str]] = OWNED_TABLES) -> list[str]:
        """Delete the ``tables`` present (default :data:`OWNED_TABLES`; one transaction);
        return them as ``"family name"`` strings (empty when there was nothing to do). Other
        tables stay."""
        present = set(self.tables())
        doomed = [f"{family} {name}" for family, name in tables if (family, name) in present]
        if doomed:
            self._run("".join(f"delete table {t}\n" for t in doomed), "cleanup")
        return doomed

    def close(self) -> None:
        """Free the libnftables context and the netlink socket; idempotent."""
        self.context.close()
        self._counter.close()


__all__ = ["CANARY_CHAIN", "OWNED_TABLES", "NftRuleset", "NftablesApplier", "NftablesError"]
