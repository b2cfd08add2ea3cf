"""The nftables applier against the real kernel, in throw-away network namespaces.

Every test creates its own namespaces (random names, deleted after) and binds the applier's
libnftables context to them; the root namespace is never written.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables import NftablesRuleset, compile_nftables
from minikproxy.compile.nftables_kubeproxy import KubeProxyNftRuleset, compile_nftables_kubeproxy
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.dataplane.libnftables import NftablesError, NftContext
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, NamespacedName, ServicePortName
from minikproxy.model.state import ProxyState
from minikproxy.testing.synthetic import synthetic_cluster, synthetic_slice

pytestmark = pytest.mark.kernel

SERVICES = 30
ENDPOINTS = 4
OPTIONS = NftablesOptions(
    local=LocalMatch("saddr", "10.128.0.0/9"),
    node_ip="192.168.0.10",
    nodeport_addresses=("192.168.0.10",),
    service_cidrs=("10.96.0.0/12",),
)


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty network namespaces, all deleted after the test."""
    names: list[str] = []

    def fresh() -> str:
        name = f"mkpnft{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        names.append(name)
        return name

    yield fresh
    for name in names:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(ns: str | None, *args: str, stdin: str | None = None) -> str:
    """The ``nft`` CLI, in ``ns`` (None: the root namespace)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run(
        [*prefix, "nft", *args], input=stdin, text=True, capture_output=True, check=True
    ).stdout


def normalized(ns: str, family: str = "ip", table: str = "minikproxy") -> Any:
    """``nft -j list table`` without handles, with set elements sorted (hash order varies)."""

    def norm(obj: Any) -> Any:
        if isinstance(obj, dict):
            out = {k: norm(v) for k, v in obj.items() if k != "handle"}
            if "elem" in out:
                out["elem"] = sorted(out["elem"], key=lambda e: json.dumps(e, sort_keys=True))
            return out
        if isinstance(obj, list):
            return [norm(v) for v in obj]
        return obj

    items = json.loads(nft(ns, "-j", "list", "table", family, table))["nftables"]
    return [norm(i) for i in items if "metainfo" not in i]


def chains(ns: str) -> list[str]:
    """The chain names of ``ip minikproxy`` (or kube-proxy's) tables in ``ns``."""
    items = json.loads(nft(ns, "-j", "list", "chains"))["nftables"]
    return sorted(
        f"{i['chain']['family']} {i['chain']['table']} {i['chain']['name']}"
        for i in items
        if "chain" in i
    )


def one_endpoint_moved(tracker: ClusterTracker, i: int, address: str) -> None:
    """Service ``i``'s first endpoint gets ``address`` (the endpoint count stays the same)."""
    obj = copy.deepcopy(synthetic_slice(i, ENDPOINTS))
    obj["endpoints"][0]["addresses"] = [address]
    obj["metadata"]["resourceVersion"] = "2"
    tracker.upsert_endpoint_slice(obj)


def ports_of(state: ProxyState, services: Iterable[NamespacedName]) -> list[ServicePortName]:
    wanted = set(services)
    return [name for name in state.services if name.service in wanted]


@pytest.fixture
def tracker() -> ClusterTracker:
    tracked = ClusterTracker("node-0")
    tracked.add_objects(synthetic_cluster(SERVICES, ENDPOINTS))
    return tracked


def test_full_apply_equals_nft_f_and_stays_in_its_namespace(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    ruleset = compile_nftables(tracker.snapshot(IPV4).state, OPTIONS)
    ours, reference = netns(), netns()
    with NftablesApplier(netns=ours) as applier:
        applier.apply_full(ruleset)
        assert applier.tables() == [("ip", "minikproxy")]
        assert applier.table_intact(ruleset)
    nft(reference, "-f", "-", stdin=ruleset.render())
    assert normalized(ours) == normalized(reference)
    assert nft(ours, "list", "table", "ip", "minikproxy") == nft(
        reference, "list", "table", "ip", "minikproxy"
    )


def test_context_binds_to_its_namespace_only(netns: Callable[[], str]) -> None:
    ns = netns()
    marker = f"mkpmarker{secrets.token_hex(4)}"
    with NftContext(ns) as ctx:
        ctx.run(f"add table ip {marker}\n")
        assert marker in ctx.run("list tables")
    assert marker in nft(ns, "list", "tables")
    assert marker not in nft(None, "list", "tables")


def test_dropping_the_cache_keeps_the_context_working(netns: Callable[[], str]) -> None:
    ns = netns()
    with NftContext(ns) as ctx:
        ctx.run("add table ip t\nadd set ip t s { type ipv4_addr; }\n")
        ctx.drop_cache()
        ctx.run("add element ip t s { 10.0.0.1 }\n")  # the new context reads back the set
        assert "10.0.0.1" in nft(ns, "list", "set", "ip", "t", "s")
    with pytest.raises(RuntimeError, match="closed"):
        ctx.drop_cache()


def test_context_for_a_missing_namespace_fails_clearly() -> None:
    with pytest.raises(OSError, match=r"setns|No such file"):
        NftContext(f"mkpmissing{secrets.token_hex(4)}")


def test_endpoint_change_is_elements_only_and_equals_a_fresh_load(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    first = tracker.snapshot(IPV4)
    before = compile_nftables(first.state, OPTIONS)
    ns, reference = netns(), netns()
    with NftablesApplier(netns=ns) as applier:
        applier.apply_full(before)
        chains_before = chains(ns)
        one_endpoint_moved(tracker, 7, "10.200.0.1")
        snap = tracker.snapshot(IPV4)
        assert snap.changed is not None
        after = compile_nftables(snap.state, OPTIONS)
        changed = ports_of(snap.state, snap.changed)
        script = after.incremental_script(before, changed)
        assert script, "the change must produce a transaction"
        assert all(" element " in line for line in script.splitlines())
        assert applier.apply_changes(before, after, changed) is False
        assert applier.incremental_applies == 1
        assert chains(ns) == chains_before
        # Nothing changed: nothing sent.
        assert applier.apply_changes(after, after, changed) is False
        assert applier.incremental_applies == 1
    nft(reference, "-f", "-", stdin=after.render())
    assert normalized(ns) == normalized(reference)
    assert "10.200.0.1" in nft(ns, "list", "table", "ip", "minikproxy")


def test_new_endpoint_count_adds_its_chain_incrementally_and_options_replace_the_table(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    before = compile_nftables(tracker.snapshot(IPV4).state, OPTIONS)
    ns, reference = netns(), netns()
    # A new endpoint count (5) needs a new pick chain, added in the same transaction.
    obj = synthetic_slice(3, ENDPOINTS + 1)
    obj["metadata"]["resourceVersion"] = "2"
    tracker.upsert_endpoint_slice(obj)
    snap = tracker.snapshot(IPV4)
    assert snap.changed is not None
    after = compile_nftables(snap.state, OPTIONS)
    changed = ports_of(snap.state, snap.changed)
    with NftablesApplier(netns=ns) as applier:
        applier.apply_full(before)
        assert applier.apply_changes(before, after, changed) is False
        assert (applier.full_applies, applier.incremental_applies) == (1, 1)
        assert "ip minikproxy pick-5" in chains(ns)
        nft(reference, "-f", "-", stdin=after.render())
        assert normalized(ns) == normalized(reference)
        # Other options: the fixed skeleton differs, the table is replaced whole.
        other = compile_nftables(snap.state, replace(OPTIONS, masquerade_all=True))
        assert applier.apply_changes(after, other, changed) is True
        assert applier.full_applies == 2


@dataclass(frozen=True)
class Injected:
    """A ruleset whose incremental script has ``bad`` appended (the rest is valid)."""

    base: NftablesRuleset
    bad: str

    @property
    def nft_table(self) -> tuple[str, str]:
        return self.base.nft_table

    def render(self) -> str:
        return self.base.render()

    def incremental_script(
        self, previous: Injected, changed: Iterable[ServicePortName]
    ) -> str | None:
        script = self.base.incremental_script(previous.base, changed)
        assert script
        return script + self.bad + "\n"


def test_rejected_transaction_names_the_line_and_keeps_the_previous_table(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    before = compile_nftables(tracker.snapshot(IPV4).state, OPTIONS)
    one_endpoint_moved(tracker, 2, "10.200.0.2")
    snap = tracker.snapshot(IPV4)
    assert snap.changed is not None
    after = compile_nftables(snap.state, OPTIONS)
    changed = ports_of(snap.state, snap.changed)
    bad = "add element ip minikproxy no-such-map { 10.96.0.1 . tcp . 80 : 10.1.1.1 . 80 }"
    good_part = after.incremental_script(before, changed)
    assert good_part
    ns = netns()
    with NftablesApplier(netns=ns) as applier:
        applier.apply_full(before)
        kernel_before = normalized(ns)
        with pytest.raises(NftablesError) as caught:
            applier.apply_changes(Injected(before, bad), Injected(after, bad), changed)
        assert caught.value.line == good_part.count("\n") + 1
        assert caught.value.line_text == bad
        assert "no-such-map" in str(caught.value)
        assert applier.rejected == 1
        assert applier.incremental_applies == 0
        # Atomic: the valid element changes before the bad line were not applied either.
        assert normalized(ns) == kernel_before
        assert "10.200.0.2" not in nft(ns, "list", "table", "ip", "minikproxy")
        # A syntax error is located too.
        with pytest.raises(NftablesError) as syntax:
            applier.context.run("add table ip minikproxy\nthis is not nft\n")
        assert (syntax.value.line, syntax.value.line_text) == (2, "this is not nft")
        assert normalized(ns) == kernel_before


def test_tampering_is_detected_and_repaired_by_a_full_apply(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    ruleset = compile_nftables(tracker.snapshot(IPV4).state, OPTIONS)
    ns = netns()
    # Another table with a filled chain of the canary's name must not count.
    nft(
        ns,
        "-f",
        "-",
        stdin="add table ip other\nadd chain ip other nat-prerouting\n"
        "add rule ip other nat-prerouting accept\n",
    )
    with NftablesApplier(netns=ns) as applier:
        assert not applier.table_intact(ruleset)  # nothing installed yet
        applier.apply_full(ruleset)
        assert applier.table_intact(ruleset)
        nft(ns, "delete", "table", "ip", "minikproxy")
        assert not applier.table_intact(ruleset)
        applier.apply_full(ruleset)
        assert applier.table_intact(ruleset)
        nft(ns, "flush", "table", "ip", "minikproxy")
        assert not applier.table_intact(ruleset)
        applier.apply_full(ruleset)
        assert applier.table_intact(ruleset)
        nft(ns, "flush", "chain", "ip", "minikproxy", "nat-prerouting")
        assert not applier.table_intact(ruleset)


def test_cleanup_removes_ours_and_kube_proxys_tables_only(netns: Callable[[], str]) -> None:
    ns = netns()
    nft(
        ns,
        "-f",
        "-",
        stdin="\n".join(
            [
                "add table ip minikproxy",
                "add table ip6 minikproxy",
                "add table ip kube-proxy",
                "add table ip6 kube-proxy",
                "add table ip filter",
                "add chain ip filter input { type filter hook input priority 0 ; }",
                "add table inet minikproxy",
                "add table ip kube-proxy-other",
                "",
            ]
        ),
    )
    with NftablesApplier(netns=ns) as applier:
        removed = applier.cleanup()
        assert removed == ["ip minikproxy", "ip6 minikproxy", "ip kube-proxy", "ip6 kube-proxy"]
        assert applier.cleanup() == []
        assert sorted(applier.tables()) == [
            ("inet", "minikproxy"),
            ("ip", "filter"),
            ("ip", "kube-proxy-other"),
        ]
    assert "chain input" in nft(ns, "list", "table", "ip", "filter")


def test_kube_proxy_layout_full_and_incremental(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    before: KubeProxyNftRuleset = compile_nftables_kubeproxy(tracker.snapshot(IPV4).state, OPTIONS)
    ns, reference = netns(), netns()
    with NftablesApplier(netns=ns) as applier:
        applier.apply_full(before)
        assert applier.table_intact(before)
        one_endpoint_moved(tracker, 5, "10.200.0.5")
        snap = tracker.snapshot(IPV4)
        assert snap.changed is not None
        after = compile_nftables_kubeproxy(snap.state, OPTIONS)
        assert applier.apply_changes(before, after, ports_of(snap.state, snap.changed)) is False
        assert applier.incremental_applies == 1
        assert applier.table_intact(after)
        assert applier.cleanup() == ["ip kube-proxy"]
        assert not applier.table_intact(after)
        applier.apply_full(after)
    nft(reference, "-f", "-", stdin=after.render())
    assert normalized(ns, table="kube-proxy") == normalized(reference, table="kube-proxy")


def test_set_elements_reads_one_sets_elements_over_netlink(netns: Callable[[], str]) -> None:
    """Raw keys and data (each part of a concatenation padded to 4 bytes), the element's own
    timeout (None when it is the set's default) and the time left; missing reads as empty."""
    ns = netns()
    nft(
        ns,
        "-f",
        "-",
        stdin="\n".join(
            [
                "add table ip t",
                "add map ip t m { typeof ip saddr . ip daddr . tcp dport : ip daddr . tcp dport ;"
                " flags dynamic,timeout ; timeout 3h ; }",
                "add element ip t m { 10.10.1.2 . 10.96.0.10 . 80 timeout 100s expires 50s"
                " : 10.10.2.3 . 8080 }",
                "add set ip t s { type ipv4_addr ; flags dynamic,timeout ; timeout 3h ; }",
                "add element ip t s { 10.10.1.2 expires 1h }",
                "",
            ]
        ),
    )
    with NftablesApplier(netns=ns) as applier:
        (element,) = applier.set_elements("ip", "t", "m")
        assert element.key == bytes([10, 10, 1, 2, 10, 96, 0, 10, 0, 80, 0, 0])
        assert element.data == bytes([10, 10, 2, 3, 0x1F, 0x90, 0, 0])
        assert element.timeout_ms == 100_000 and 40_000 < (element.expires_ms or 0) <= 50_000
        (member,) = applier.set_elements("ip", "t", "s")
        assert (member.key, member.data, member.timeout_ms) == (bytes([10, 10, 1, 2]), None, None)
        assert 3_500_000 < (member.expires_ms or 0) <= 3_600_000
        assert applier.set_elements("ip", "t", "nothing") == []
        assert applier.set_elements("ip", "nothing", "m") == []


class _BadAffinity:
    """A ruleset whose carried-over affinity entries nft rejects."""

    def __init__(self, ruleset: NftablesRuleset) -> None:
        self._ruleset = ruleset
        self.nft_table = ruleset.nft_table
        self.affinity_maps: tuple[str, ...] = ()

    def render(self) -> str:
        return self._ruleset.render()

    def affinity_restore(self, elements: Any) -> str:
        return "add element ip minikproxy no-such-set { 10.0.0.1 }\n"

    def incremental_script(self, previous: Any, changed: Iterable[ServicePortName]) -> str | None:
        return None


def test_rejected_affinity_carry_over_does_not_keep_the_table_out(
    netns: Callable[[], str], tracker: ClusterTracker
) -> None:
    ruleset = compile_nftables(tracker.snapshot(IPV4).state, OPTIONS)
    ns = netns()
    with NftablesApplier(netns=ns) as applier:
        applier.apply_full(_BadAffinity(ruleset))
        assert applier.table_intact(ruleset) and applier.rejected == 1
