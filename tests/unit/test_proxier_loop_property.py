"""Property: the sync loop over random cluster histories, with applies failing at random in
either family, keeps every incremental structure right. After every successful sync the
kernel (a model of it, replaying the element scripts) equals a full compile of the state, the
no-local-endpoints counter equals a full recount, and the conntrack reconciler's UDP-port
index equals a fresh one."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minikproxy.compile.nftables import NftablesRuleset, compile_nftables
from minikproxy.config import ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler, _FamilyMemory
from minikproxy.healthz import ProxierHealth
from minikproxy.metrics import ProxyMetrics
from minikproxy.model.names import IPV4, IPV6
from minikproxy.modes.base import NoLocalCounter
from minikproxy.modes.nftables import NftablesMode
from minikproxy.proxier import Proxier
from minikproxy.testing.fake_conntrack import FakeFlowTable
from minikproxy.testing.strategies import NODE, cluster_histories, feed_change

from .test_nftables_incremental import apply_update, element_table


class ModelApplier:
    """An applier over a model kernel per family: element set, skeleton, installed ruleset.
    Applies to a family in ``fail`` raise before anything is installed, as a rejected
    transaction does."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[set[tuple[str, str]], set[str], NftablesRuleset]] = {}
        self.fail: set[str] = set()

    def set_elements(self, *_args: Any) -> list[Any]:
        return []

    def apply_full(self, new: NftablesRuleset) -> None:
        if new.options.family in self.fail:
            raise OSError(1, "injected")
        self.tables[new.options.family] = (element_table(new), set(new.skeleton), new)

    def apply_changes(self, prev: NftablesRuleset, new: NftablesRuleset, changed: Any) -> bool:
        family = new.options.family
        if family in self.fail:
            raise OSError(1, "injected")
        table, skeleton, installed = self.tables[family]
        assert installed is prev, "the loop's idea of the kernel is not the kernel"
        script = new.update_script(prev, list(changed))
        if script is None:
            self.apply_full(new)
            return True
        apply_update(table, skeleton, script)
        self.tables[family] = (table, skeleton, new)
        return False

    def close(self) -> None:
        pass


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(history=cluster_histories(max_services=6, max_changes=5), data=st.data())
def test_the_loop_stays_right_through_failures(
    history: list[list[dict[str, Any]]], data: st.DataObject
) -> None:
    applier = ModelApplier()
    mode = NftablesMode(applier, "flat")  # type: ignore[arg-type]
    conntrack = ConntrackReconciler(FakeFlowTable())
    proxier = Proxier(
        config=ProxyConfig(mode="nftables", detect_local_mode="NodeCIDR"),
        node_name=NODE, families=[IPV4, IPV6], metrics=ProxyMetrics(proxy_mode="nftables"),
        health=ProxierHealth(health_timeout=60), mode=mode, conntrack=conntrack,
    )  # fmt: skip
    proxier.handler("nodes").on_add(next(o for o in history[0] if o["kind"] == "Node"))
    for kind in ("nodes", "services", "endpointslices"):
        proxier.handler(kind).on_synced()
    proxier.tracker.add_objects(o for o in history[0] if o["kind"] != "Node")
    previous = history[0]
    for step, objects in enumerate(history):
        if step:
            feed_change(proxier.tracker, previous, objects)
            previous = objects
        for _ in range(3):  # fail families at random until a sync succeeds
            applier.fail = data.draw(st.sets(st.sampled_from([IPV4, IPV6])))
            if proxier.sync_proxy_rules():
                break
        else:
            applier.fail = set()
            assert proxier.sync_proxy_rules()
        for family in (IPV4, IPV6):
            state = proxier._families[family]
            full = compile_nftables(state.applied_state, state.applied.options)
            table, skeleton, installed = applier.tables[family]
            assert installed is state.applied
            assert table == element_table(full)
            assert skeleton == set(full.skeleton)
            fresh = NoLocalCounter()
            fresh.recount(state.applied_state, mode.categorized(state.applied))
            assert proxier._no_local[family].counts == fresh.counts
            reference = _FamilyMemory()
            reference.update_udp_ports(state.applied_state, None)
            assert conntrack._memory[family].udp_ports == reference.udp_ports
