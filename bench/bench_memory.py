"""Peak memory of model + full compile + render at 10k Services x 10 endpoints, measured in a
fresh process from /proc/self/status VmHWM (``ru_maxrss`` is no good here: Linux carries the
forking parent's high-water mark across exec, so a child of a big pytest process reports the
parent's peak)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from minikproxy.changes import ClusterTracker
from minikproxy.compile.iptables import IptablesOptions, compile_iptables
from minikproxy.testing.synthetic import synthetic_service, synthetic_slice, synthetic_node
tracker = ClusterTracker("node-0")
tracker.set_node(synthetic_node())
for i in range(10000):  # fed one by one, as a watch delivers them
    tracker.upsert_service(synthetic_service(i))
    tracker.upsert_endpoint_slice(synthetic_slice(i, 10))
ruleset = compile_iptables(tracker.snapshot("IPv4").state, IptablesOptions())
text = ruleset.render()
status = open("/proc/self/status").read()
print(int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) // 1024)
"""


def test_peak_memory_10k(benchmark) -> None:  # type: ignore[no-untyped-def]
    peaks: list[int] = []

    def run() -> None:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True
        )
        peaks.append(int(out.stdout.strip()))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mb"] = max(peaks)
    print(f"\npeak RSS at 10k x 10: {max(peaks)} MB")
