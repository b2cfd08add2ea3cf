"""ClientIP affinity upkeep in the flat layout at 10k Services x 10 endpoints: the cost of an
endpoint change of a Service with affinity while its affinity map holds 10,000 learned entries
(1,000 of them pointing to the endpoint that goes), i.e. ``apply_changes``: the element
transaction, then the affinity maps read over netlink and the 1,000 stale entries deleted in a
second transaction; and of a full apply that carries the 10,000 entries over. The stale entries
are put back (untimed) before each round, so every round deletes 1,000.

One run on the shared 2-core box, while other test suites ran (medians): the endpoint change
with its cleanup 96 ms (min 48 ms; reading and decoding the 10,000 entries is most of it, ~5 us
each; an endpoint change of a Service without affinity is 0.5-1.1 ms, bench_nftables_apply.py);
the full apply with the 10,000 entries carried over 5.0 s (the 10k table's load itself).

Run: .venv/bin/python -m pytest bench/bench_nftables_affinity.py --benchmark-only
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from minikproxy.changes import ClusterTracker
from minikproxy.compile.nftables import NftablesRuleset, compile_nftables
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPV4, ServicePortName
from minikproxy.testing.synthetic import synthetic_cluster, synthetic_slice

from .conftest import ENDPOINTS_PER_SERVICE, bench_nft_options

SERVICES = 10000
ENTRIES = 10000
VICTIM = SERVICES // 2


@dataclass
class Loaded:
    applier: NftablesApplier
    before: NftablesRuleset
    after: NftablesRuleset
    changed: list[ServicePortName]
    entries: str  # the add element command for every learned entry
    stale: str  # the entries pointing to the endpoint that goes


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    objs = synthetic_cluster(SERVICES, ENDPOINTS_PER_SERVICE)
    victim = next(o for o in objs if o["metadata"]["name"] == f"svc-{VICTIM}")
    victim["spec"]["sessionAffinity"] = "ClientIP"
    tracker = ClusterTracker("node-0")
    tracker.add_objects(objs)
    options = bench_nft_options()
    before = compile_nftables(tracker.snapshot(IPV4).state, options)
    obj = copy.deepcopy(synthetic_slice(VICTIM, ENDPOINTS_PER_SERVICE))
    gone = obj["endpoints"][0]["addresses"][0]
    obj["endpoints"][0]["addresses"] = ["10.255.255.1"]  # same count: elements only
    obj["metadata"]["resourceVersion"] = "2"
    tracker.upsert_endpoint_slice(obj)
    snap = tracker.snapshot(IPV4)
    assert snap.changed is not None
    after = compile_nftables(snap.state, options)
    changed = [name for name in snap.state.services if name.service in snap.changed]
    vip = victim["spec"]["clusterIP"]
    endpoints = [
        e["addresses"][0] for e in synthetic_slice(VICTIM, ENDPOINTS_PER_SERVICE)["endpoints"]
    ]

    def element(k: int) -> str:
        client = f"172.16.{k // 256}.{k % 256}"
        return f"{client} . {vip} . 80 timeout 10800s : {endpoints[k % len(endpoints)]} . 8080"

    items = [element(k) for k in range(ENTRIES)]
    stale_items = [i for i in items if i.endswith(f": {gone} . 8080")]
    assert len(stale_items) == ENTRIES // ENDPOINTS_PER_SERVICE

    def command(elements: list[str]) -> str:
        return f"add element ip minikproxy affinity-tcp {{ {', '.join(elements)} }}\n"

    netns = f"mkpbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    applier = NftablesApplier(netns=netns)
    try:
        applier.apply_full(before)
        yield Loaded(applier, before, after, changed, command(items), command(stale_items))
    finally:
        applier.close()
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _count(loaded: Loaded) -> int:
    """How many entries the affinity map holds."""
    out = loaded.applier.context.run("list map ip minikproxy affinity-tcp", json=True)
    items = json.loads(out)["nftables"]
    return sum(len(i["map"].get("elem", [])) for i in items if "map" in i)


def test_endpoint_change_with_affinity_cleanup(benchmark: Any, loaded: Loaded) -> None:
    applier = loaded.applier
    applier.context.run(loaded.entries)
    state = {"current": loaded.before}

    def setup() -> None:
        if state["current"] is loaded.after:  # back to the endpoint, stale entries back
            applier.apply_changes(loaded.after, loaded.before, loaded.changed)
            state["current"] = loaded.before
        applier.context.run(loaded.stale)

    def change() -> None:
        applier.apply_changes(loaded.before, loaded.after, loaded.changed)
        state["current"] = loaded.after

    benchmark.pedantic(change, setup=setup, rounds=20)
    assert _count(loaded) == ENTRIES - ENTRIES // ENDPOINTS_PER_SERVICE


def test_full_apply_carrying_affinity_over(benchmark: Any, loaded: Loaded) -> None:
    applier = loaded.applier
    applier.apply_full(loaded.before)
    applier.context.run(loaded.entries)
    benchmark.pedantic(lambda: applier.apply_full(loaded.before), rounds=3)
    assert _count(loaded) == ENTRIES
