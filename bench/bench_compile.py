"""Compile benchmarks: full compiles at 1k/10k/30k Services x 10 endpoints, a partial compile
after one EndpointSlice change, and whole-process ``minikproxy render`` of a 10k snapshot.

Run: .venv/bin/python -m pytest bench/bench_compile.py --benchmark-only
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from minikproxy.compile import names
from minikproxy.compile.iptables import compile_iptables
from minikproxy.model.names import IPV4
from minikproxy.testing.synthetic import synthetic_cluster, synthetic_slice

from .conftest import ENDPOINTS_PER_SERVICE, bench_options, tracked


def _clear_name_caches() -> None:
    names.service_chains.cache_clear()
    names.endpoint_chain_for_key.cache_clear()


@pytest.mark.parametrize("services", [1000, 10000, 30000])
def test_full_compile_warm(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A full compile as every sync after the first does it (chain names already hashed)."""
    _, snapshot = tracked(services)
    options = bench_options()
    ruleset = compile_iptables(snapshot.state, options)
    benchmark.extra_info["lines"] = ruleset.render().count("\n")
    benchmark.pedantic(
        lambda: compile_iptables(snapshot.state, options).render(), rounds=5, iterations=1
    )


@pytest.mark.parametrize("services", [1000, 10000])
def test_full_compile_cold(benchmark, services: int) -> None:  # type: ignore[no-untyped-def]
    """A first compile in a fresh process: every chain name hashed (SHA-256 + base32)."""
    _, snapshot = tracked(services)
    options = bench_options()
    benchmark.pedantic(
        lambda: compile_iptables(snapshot.state, options).render(),
        setup=_clear_name_caches,
        rounds=5,
        iterations=1,
    )


def test_partial_compile_one_slice_change(benchmark) -> None:  # type: ignore[no-untyped-def]
    """One EndpointSlice changes at 10k x 10: snapshot, incremental compile, partial render."""
    tracker, snapshot = tracked(10000)
    options = bench_options()
    base = compile_iptables(snapshot.state, options)
    generation = iter(range(1, 10**6))
    sizes: list[int] = []

    def change_and_compile() -> None:
        tracker.upsert_endpoint_slice(
            synthetic_slice(4242, ENDPOINTS_PER_SERVICE, generation=next(generation))
        )
        snap = tracker.snapshot(IPV4)
        ruleset = compile_iptables(
            snap.state, options, previous=base, changed_services=snap.changed
        )
        sizes.append(len(ruleset.render_partial()))

    benchmark.pedantic(change_and_compile, rounds=50, iterations=1, warmup_rounds=2)
    benchmark.extra_info["partial_bytes"] = max(sizes)
    benchmark.extra_info["full_bytes"] = len(base.render())


def test_partial_compile_only(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Just the incremental compile + partial render (the snapshot prepared outside)."""
    tracker, snapshot = tracked(10000)
    options = bench_options()
    base = compile_iptables(snapshot.state, options)
    tracker.upsert_endpoint_slice(synthetic_slice(77, ENDPOINTS_PER_SERVICE, generation=3))
    snap = tracker.snapshot(IPV4)
    benchmark.pedantic(
        lambda: compile_iptables(
            snap.state, options, previous=base, changed_services=snap.changed
        ).render_partial(),
        rounds=50,
        iterations=1,
    )
    # Restore the shared tracker for other benchmarks.
    tracker.upsert_endpoint_slice(synthetic_slice(77, ENDPOINTS_PER_SERVICE))
    tracker.snapshot(IPV4)


@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "cluster-10k.json"
    items = synthetic_cluster(10000, ENDPOINTS_PER_SERVICE)
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return path


def test_render_process_10k_json(benchmark, snapshot_file: Path) -> None:  # type: ignore[no-untyped-def]
    """``minikproxy render`` of a 10k-Service JSON snapshot, as a whole process."""
    argv = [sys.executable, "-m", "minikproxy", "render", "-f", str(snapshot_file)]
    argv += ["--ip-family", "IPv4", "--hostname-override", "node-0"]

    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    benchmark.pedantic(run, rounds=3, iterations=1)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    benchmark.extra_info["peak_rss_mb_children"] = before / 1024
