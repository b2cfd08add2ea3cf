"""nftables mode: one table per family through a long-lived libnftables context.

Two layouts share this mode: ``flat`` (our ``minikproxy`` table, where an endpoint change is an
element update: :mod:`minikproxy.compile.nftables`) and ``kube-proxy`` (kube-proxy's exact
``kube-proxy`` table: :mod:`minikproxy.compile.nftables_kubeproxy`). A full sync replaces the
whole table in one transaction; a partial sync sends only the difference (elements, for the
flat layout). The canary is the table's ``nat-prerouting`` chain: gone or flushed means
someone removed our state, and the next sync is full.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from minikproxy.compile.nftables import (
    SERVICE_DISPATCH,
    NftablesRuleset,
    compile_nftables,
)
from minikproxy.compile.nftables_kubeproxy import (
    SERVICE_IPS_MAP,
    SERVICE_NODEPORTS_MAP,
    KubeProxyNftRuleset,
    compile_nftables_kubeproxy,
)
from minikproxy.compile.nftables_options import NftablesOptions
from minikproxy.ctreconcile import frontend
from minikproxy.dataplane.nftables import NftablesApplier, NftablesError
from minikproxy.dataplane.nftnetlink import SetElement
from minikproxy.model.names import IPV4, IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints
from minikproxy.modes.base import CategorizedView, FrontendOptions, ProxyMode
from minikproxy.nodeopts import nftables_options

if TYPE_CHECKING:
    from minikproxy.config import ProxyConfig
    from minikproxy.metrics import ProxyMetrics

log = logging.getLogger(__name__)

NftPlan = NftablesRuleset | KubeProxyNftRuleset

IPPROTO_UDP = 17


class NftablesMode(ProxyMode[Any]):
    """nftables mode with ``layout`` ``flat`` or ``kube-proxy`` over one applier (None:
    dry-run)."""

    name = "nftables"

    def __init__(self, applier: NftablesApplier | None = None, layout: str = "flat") -> None:
        if layout not in ("flat", "kube-proxy"):
            raise ValueError(f"unknown nftables layout {layout!r}")
        self.applier = applier
        self.layout = layout

    @property
    def dry_run(self) -> bool:
        """True without an applier."""
        return self.applier is None

    def options(
        self,
        config: ProxyConfig,
        node: NodeInfo,
        family: IPFamily,
        node_addresses: Sequence[str],
        service_cidrs: Sequence[str],
    ) -> NftablesOptions:
        """:func:`~minikproxy.nodeopts.nftables_options`."""
        return nftables_options(
            config, node, family, node_addresses=node_addresses, service_cidrs=service_cidrs
        )

    def compile(
        self,
        state: ProxyState,
        options: FrontendOptions,
        previous: NftPlan | None,
        changed: frozenset[NamespacedName] | None,
    ) -> NftPlan:
        """The layout's compiler; the flat one recompiles only the changed Services."""
        assert isinstance(options, NftablesOptions)
        if self.layout == "kube-proxy":
            return compile_nftables_kubeproxy(state, options)
        flat_previous = previous if isinstance(previous, NftablesRuleset) else None
        return compile_nftables(state, options, flat_previous, changed)

    def changed_ports(self, plan: NftPlan) -> frozenset[ServicePortName] | None:
        """The flat layout's recompiled ports (the kube-proxy layout compiles in full)."""
        return plan.changed if isinstance(plan, NftablesRuleset) else None

    def categorized(self, plan: NftPlan) -> Mapping[ServicePortName, CategorizedEndpoints]:
        """Each port's categorisation, as compiled."""
        return CategorizedView(plan.services)

    def describe(self, old: NftPlan | None, new: NftPlan) -> Iterator[str]:
        """Per service port: the elements (flat) or chains, rules and elements (kube-proxy)
        added and removed; the table's own objects when they change."""
        family = new.options.family
        family_name, table = new.nft_table
        if old is None:
            yield (
                f"# {family}: initial sync: {len(new.services)} service ports, table "
                f"{family_name} {table}: {len(_base_lines(new))} base objects and rules, "
                f"{sum(len(_port_lines(new, n)) for n in new.services)} service lines"
            )
            for name in sorted(new.services):
                lines, endpoints = _port_lines(new, name), new.services[name].categorized.reachable
                yield f"+ {_label(name)}: {len(lines)} lines, {len(endpoints)} endpoints"
            return
        yield from _diff(
            f"# {family}: table {family_name} {table}", _base_lines(old), _base_lines(new)
        )
        changed = self.changed_ports(new)
        names = sorted(changed if changed is not None else set(old.services) | set(new.services))
        for name in names:
            before, after = _port_lines(old, name), _port_lines(new, name)
            verb = "added" if not before else "removed" if not after else "changed"
            yield from _diff(f"# {family}: {_label(name)} {verb}", before, after)

    def apply(self, new: NftPlan, applied: NftPlan | None, full: bool) -> None:
        """Replace the table (full), or send the difference from ``applied``. The first
        time, first tell the conntrack reconciler which UDP frontends the table a previous
        run left routes (see :meth:`_remember_udp_frontends`)."""
        assert self.applier is not None, "apply() in dry-run"
        if applied is None and self.conntrack is not None:
            self._remember_udp_frontends(new)
        if full or applied is None or type(applied) is not type(new):
            self.applier.apply_full(new)
            return
        changed = self.changed_ports(new)
        if changed is None:
            changed = frozenset(applied.services) | frozenset(new.services)
        self.applier.apply_changes(applied, new, changed)

    def _remember_udp_frontends(self, plan: NftPlan) -> None:
        """Read the UDP Service frontends of the table a previous run left (as iptables mode
        reads its old rules), so that the flows of Services deleted while we were down go
        at the first reconcile: the keys of its dispatch maps, in one kernel-filtered netlink
        dump each (flat: ``service-dispatch``, whose keys include the NodePorts' node
        addresses; kube-proxy layout: ``service-ips`` and ``service-nodeports``). A table
        that cannot be read only leaves those flows to expire."""
        assert self.applier is not None and self.conntrack is not None
        family_name, table = plan.nft_table
        size = 4 if plan.options.family == IPV4 else 16
        try:
            vips = SERVICE_DISPATCH if isinstance(plan, NftablesRuleset) else SERVICE_IPS_MAP
            frontends = [
                frontend(str(ipaddress.ip_address(key[:size])), _port(key[size + 4 :]))
                for key in _keys(self.applier.set_elements(family_name, table, vips))
                if len(key) == size + 8 and key[size] == IPPROTO_UDP
            ]
            ports: list[int] = []
            if isinstance(plan, KubeProxyNftRuleset):
                elements = self.applier.set_elements(family_name, table, SERVICE_NODEPORTS_MAP)
                ports = [
                    _port(key[4:])
                    for key in _keys(elements)
                    if len(key) == 8 and key[0] == IPPROTO_UDP
                ]
        except (OSError, ValueError) as err:
            log.warning(
                "cannot read the UDP Services of the %s %s table found at start-up (flows "
                "to those deleted meanwhile are left to expire): %s",
                family_name,
                table,
                err,
            )
            return
        self.conntrack.remember_frontends(plan.options.family, frontends, ports)

    def intact(self, applied: Mapping[IPFamily, NftPlan]) -> str | None:
        """Whether each family's table is still there with its rules (one small read)."""
        if self.applier is None:
            return None
        for family, plan in applied.items():
            try:
                if not self.applier.table_intact(plan):
                    family_name, table = plan.nft_table
                    return f"{family} nftables table {family_name} {table} gone or flushed"
            except OSError:
                return None  # cannot tell now; the next check tries again
        return None

    def record_failure(self, metrics: ProxyMetrics, full: bool) -> None:
        """``sync_proxy_rules_nftables_sync_failures_total``."""
        metrics.nftables_sync_failures_total.inc()

    def expected_error(self, err: Exception) -> str | None:
        """A transaction nft rejected (with the offending script line)."""
        if isinstance(err, NftablesError):
            return str(err)
        return super().expected_error(err)

    def cleanup(self) -> list[str]:
        """Delete our and kube-proxy's nftables tables."""
        return [] if self.applier is None else self.applier.cleanup()

    def close(self) -> None:
        """Free the libnftables context."""
        if self.applier is not None:
            self.applier.close()


def _keys(elements: Sequence[SetElement]) -> Iterator[bytes]:
    return (element.key for element in elements)


def _port(padded: bytes) -> int:
    """A port from a concatenation part (2 bytes, network order, padded to 4)."""
    return int.from_bytes(padded[:2], "big")


def _label(name: ServicePortName) -> str:
    return f"{name} ({name.protocol.lower()})"


def _diff(header: str, before: Sequence[str], after: Sequence[str]) -> Iterator[str]:
    before_set, after_set = set(before), set(after)
    removed = [line for line in before if line not in after_set]
    added = [line for line in after if line not in before_set]
    if removed or added:
        yield f"{header}: +{len(added)} -{len(removed)}"
        yield from (f"- {line}" for line in removed)
        yield from (f"+ {line}" for line in added)


def _base_lines(plan: NftPlan) -> list[str]:
    """The table's own objects and rules (everything but the service ports' parts)."""
    if isinstance(plan, NftablesRuleset):
        return [line.rstrip("\n") for line in plan.skeleton]
    return plan.base_lines()


def _port_lines(plan: NftPlan, name: ServicePortName) -> list[str]:
    """What one service port contributes, one readable line per element, chain and rule."""
    lines: list[str] = []
    if isinstance(plan, KubeProxyNftRuleset):
        frag = plan.services.get(name)
        if frag is None:
            return []
        lines += list(frag.sets)
        for chain, rules in frag.chains:
            lines.append(f"chain {chain}")
            lines += [f"rule {chain} {rule}" for rule in rules]
        elements = frag.elements
    else:
        flat = plan.services.get(name)
        if flat is None:
            return []
        elements = flat.elements
    lines += [f"element {container} {{ {text} }}" for container, text in elements]
    return lines
