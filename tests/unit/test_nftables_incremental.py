"""Property: an incremental flat-layout compile equals a from-scratch compile of the same
state, and its element update takes a table from the old ruleset to the new one."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables import NftablesRuleset, compile_nftables
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.testing.strategies import NODE, feed_change

from .test_iptables_properties import PROPERTY_SETTINGS, cluster_and_change


def options(family: IPFamily) -> NftablesOptions:
    cidr = "10.244.0.0/16" if family == IPV4 else "fd00:10:244::/56"
    return NftablesOptions(family=family, local=LocalMatch("saddr", cidr))


def element_table(ruleset: NftablesRuleset) -> set[tuple[str, str]]:
    """The elements a table holds after loading ``ruleset`` (keyed as nft keys them)."""
    return {(name, text) for name, texts in ruleset.elements_by_set().items() for text in texts}


def apply_update(table: set[tuple[str, str]], skeleton: set[str], script: str) -> None:
    """Apply ``delete``/``add element`` commands to ``table`` as nft would (maps by key), and
    the chain commands to ``skeleton`` (the ``add chain``/``add rule`` lines)."""
    for line in script.splitlines():
        if " element " not in line:
            verb, what, family, name, chain = line.split(" ", 5)[:5]
            if verb == "add":
                assert what in ("chain", "rule") and line + "\n" not in skeleton, line
                if what == "rule":
                    assert f"add chain {family} {name} {chain}\n" in skeleton, line
                skeleton.add(line + "\n")
            elif verb == "flush":
                prefix = f"add rule {family} {name} {chain} "
                skeleton -= {rule for rule in skeleton if rule.startswith(prefix)}
            else:
                assert not any(
                    rule.startswith(f"add rule {family} {name} {chain} ") for rule in skeleton
                )
                skeleton.remove(f"add chain {family} {name} {chain}\n")
            continue
        verb, _, _, _, setname, rest = line.split(" ", 5)
        items = rest.strip().removeprefix("{ ").removesuffix(" }").split(", ")
        for item in items:
            if verb == "delete":
                matches = {e for e in table if e[0] == setname and e[1].partition(" : ")[0] == item}
                assert matches, f"deleting a missing element: {line}"
                table -= matches
            else:
                # nft accepts adding an identical element again, not a key with other data.
                key = item.partition(" : ")[0]
                assert not any(
                    e[0] == setname and e[1].partition(" : ")[0] == key and e[1] != item
                    for e in table
                ), f"adding a key that maps to something else: {setname} {item}"
                table.add((setname, item))


@PROPERTY_SETTINGS
@given(change=cluster_and_change(), family=st.sampled_from([IPV4, IPV6]))
def test_incremental_compile_equals_full_compile(
    change: tuple[list[dict[str, Any]], list[dict[str, Any]]], family: IPFamily
) -> None:
    before, after = change
    tracker = ClusterTracker(NODE)
    tracker.add_objects(before)
    first = compile_nftables(tracker.snapshot(family).state, options(family))
    first.shared_refs  # noqa: B018 - computed, so the incremental compile carries it forward

    feed_change(tracker, before, after)  # as watch events would arrive
    snapshot = tracker.snapshot(family)
    assert snapshot.changed is not None
    partial = compile_nftables(snapshot.state, options(family), first, snapshot.changed)
    full = compile_nftables(snapshot.state, options(family))
    assert partial.changed is not None
    assert partial.render() == full.render()
    assert partial.shared_refs == full.shared_refs
    assert partial.skeleton_refs == full.skeleton_refs
    script = partial.update_script(first, partial.changed)
    assert script is not None  # same options: count-class chains travel with the elements
    table, skeleton = element_table(first), set(first.skeleton)
    apply_update(table, skeleton, script)
    assert table == element_table(full)
    assert skeleton == set(full.skeleton)


def test_nothing_changed_reuses_everything() -> None:
    tracker = ClusterTracker(NODE)
    first = compile_nftables(tracker.snapshot(IPV4).state, options(IPV4))
    again = compile_nftables(tracker.snapshot(IPV4).state, options(IPV4), first, frozenset())
    assert again.changed == frozenset()
    assert again.skeleton is first.skeleton
    assert again.update_script(first, ()) == ""
