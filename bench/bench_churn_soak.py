"""The churn soak, long form (issue 7's shape): 300 Services (20% of ports UDP, every Service
type, Local policies, affinity, terminating endpoints, topology hints, multi-port), 3000
random changes in bursts against the fake API server (its own process), the real controller
with ``--min-sync-period 0`` programming a node network namespace (nf_tables), and at every
500 changes the kernel compared rule for rule with a fresh render of the same objects.

The node's conntrack table holds 2500 UDP flows to the UDP Services' cluster IPs and
NodePorts, answered by their serving endpoints and topped up at every checkpoint (the churn
makes them stale), and 1000 UDP flows that are no Service's; at every checkpoint no stale
Service flow may be left and every other flow must be there.

Printed per run: sync times with the conntrack reconcile (what
``kubeproxy_sync_proxy_rules_duration_seconds`` observes) and without it (p50, p95, max), the
reconcile's own time and the flows it deleted, the lag from each API change to the end of the
first sync that put it in the kernel (p50, p99, max), how many syncs wrote each burst,
checkpoints, restore failures and RSS growth after warm-up. Three runs separate the costs:
as issue 7 describes it, the same without the UDP conntrack cleanup (the proxier's
``conntrack`` unset), and TCP only; a fourth adds 20,000 TCP flows to the table. Needs root. Run:

    .venv/bin/python -m pytest bench/bench_churn_soak.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from minikproxy.testing.soak import SoakReport, SoakSettings, run_soak

RUNS = {
    "udp20": SoakSettings(),
    "udp20-no-conntrack": SoakSettings(conntrack=False),
    "tcp-only": SoakSettings(udp_share=0.0),
    "udp20-20k-tcp-flows": SoakSettings(tcp_flows=20_000),
}


def _figures(report: SoakReport) -> dict[str, Any]:
    times, lags = sorted(report.sync_times), sorted(report.lags)
    rules, ct = sorted(report.rules_times), sorted(report.conntrack_times)
    return {
        "syncs": len(times),
        "sync_p50_ms": round(statistics.median(times) * 1000),
        "sync_p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000),
        "sync_max_ms": round(times[-1] * 1000),
        "rules_p50_ms": round(statistics.median(rules) * 1000),
        "rules_max_ms": round(rules[-1] * 1000),
        "conntrack_p50_ms": round(statistics.median(ct) * 1000, 1),
        "conntrack_max_ms": round(ct[-1] * 1000, 1),
        "conntrack_deleted": report.conntrack_deleted,
        "conntrack_checks_ok": report.conntrack_ok,
        "lag_p50_ms": round(statistics.median(lags) * 1000),
        "lag_max_ms": round(lags[-1] * 1000),
        "checkpoints_identical": sum(c.identical for c in report.checkpoints),
        "checkpoints": len(report.checkpoints),
        "restore_failures": report.restore_failures,
        "rss_growth_pct": round(report.rss_growth * 100, 1),
        "max_syncs_per_burst": max(s for _, s in report.bursts),
    }


@pytest.mark.parametrize("run", list(RUNS))
def test_churn_soak(benchmark: Any, run: str, tmp_path: Path) -> None:
    reports: list[SoakReport] = []

    def soak() -> None:
        reports.append(run_soak(RUNS[run], tmp_path))

    benchmark.pedantic(soak, rounds=1, iterations=1)
    report = reports[0]
    benchmark.extra_info.update(_figures(report))
    print(f"\n[{run}]\n{report.summary()}")
    assert all(c.identical for c in report.checkpoints)
    assert report.restore_failures == 0
    if RUNS[run].conntrack:
        assert report.conntrack_ok, [c.flows for c in report.checkpoints]
