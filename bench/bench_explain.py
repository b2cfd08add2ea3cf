"""``minikproxy explain`` and ``minikproxy diff`` at 10k Services x 10 endpoints, whole process
(interpreter start, reading the JSON snapshot, tracking, compiling, evaluating, printing).

Targets (issue 13): explain <= 2 s, diff of two 10k snapshots <= 5 s. The second snapshot
differs from the first in 1% of the Services' endpoints (100 EndpointSlices).

Run: .venv/bin/python -m pytest bench/bench_explain.py --benchmark-only
"""

from __future__ import annotations

import compileall
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import minikproxy
from minikproxy.testing.synthetic import synthetic_cluster, synthetic_slice

SERVICES = 10000
NODE_FLAGS = ["--hostname-override", "node-0", "--cluster-cidr", "10.128.0.0/9",
              "--node-ip", "192.168.0.10"]  # fmt: skip


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 10k snapshot and the same with 1% of the EndpointSlices moved."""
    # The bytecode an installed package has (PYTHONDONTWRITEBYTECODE would otherwise make
    # every run compile minikproxy's modules again: ~0.2 s of CPU not spent in real use).
    compileall.compile_dir(Path(minikproxy.__file__).parent, quiet=1)
    directory = tmp_path_factory.mktemp("snapshots")
    objs: list[Any] = list(synthetic_cluster(SERVICES, 10))
    old = directory / "old.json"
    old.write_text(json.dumps({"kind": "List", "items": objs}))
    for i in range(0, SERVICES, 100):
        assert objs[2 * i + 2]["kind"] == "EndpointSlice"
        objs[2 * i + 2] = synthetic_slice(i, 10, generation=1)
    new = directory / "new.json"
    new.write_text(json.dumps({"kind": "List", "items": objs}))
    return old, new


def _run(argv: list[str], cpu: list[float]) -> str:
    """Run minikproxy; append the child's CPU time (user + system) to ``cpu``: on a shared
    machine the wall-clock time also measures the other processes."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "minikproxy", *argv], capture_output=True, text=True, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


def _bench(benchmark: Any, argv: list[str]) -> Any:
    cpu: list[float] = []
    out = json.loads(benchmark.pedantic(_run, args=(argv, cpu), rounds=5, iterations=1))
    benchmark.extra_info["cpu_seconds_median"] = round(statistics.median(cpu), 3)
    return out


@pytest.mark.parametrize("mode", ["iptables", "nftables", "nftables/kube-proxy", "ipvs"])
def test_explain_10k(benchmark: Any, snapshots: tuple[Path, Path], mode: str) -> None:
    """One ClusterIP packet from a pod, explained in ``mode`` (JSON output)."""
    proxy_mode, _, layout = mode.partition("/")
    argv = ["explain", "--proxy-mode", proxy_mode, "-f", str(snapshots[0]), *NODE_FLAGS,
            "--src", "10.128.0.5", "--from", "pod", "--dst", "10.96.5.5", "--dport", "80",
            "--json"]  # fmt: skip
    if layout:
        argv += ["--nftables-layout", layout]
    out = _bench(benchmark, argv)
    assert out["verdict"] == "dnat" and len(out["endpoints"]) == 10


def test_diff_two_10k_snapshots(benchmark: Any, snapshots: tuple[Path, Path]) -> None:
    """The semantic diff (iptables mode) of the two snapshots."""
    old, new = snapshots
    argv = ["diff", "-f", str(old), "--against", str(new), *NODE_FLAGS, "--ip-family", "IPv4",
            "--json"]  # fmt: skip
    out = _bench(benchmark, argv)
    assert len({c["service_port"] for c in out["changes"]}) == SERVICES // 100
