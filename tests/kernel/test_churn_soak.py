"""The churn soak, short form: a couple of hundred random API changes in bursts against the
real controller (``--min-sync-period 0``) programming a node namespace; at every checkpoint
the kernel's rules must equal, rule for rule, a fresh render of the objects the API server
holds, and the node's conntrack table (a few thousand UDP flows to the Services, topped up at
every checkpoint, and flows that are no Service's) must hold no flow to a Service frontend
answered by anything but a serving endpoint, with every other flow kept. The figures (sync
times, API -> kernel lag, RSS) are printed, not asserted: they are measured by the long form,
``bench/bench_churn_soak.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from minikproxy.testing.soak import SoakSettings, run_soak

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_churn_keeps_the_kernel_equal_to_a_fresh_render(tmp_path: Path) -> None:
    settings = SoakSettings(changes=240, checkpoint_every=80, seed=3)
    report = run_soak(settings, tmp_path)
    print("\n" + report.summary())
    assert len(report.checkpoints) == 3
    for checkpoint in report.checkpoints:
        assert checkpoint.identical, f"after {checkpoint.changes} changes:\n{checkpoint.diff}"
    assert report.restore_failures == 0
    assert not any(s.full for s in report.syncs), "churn alone never needs a full sync"
    # every change the proxy can see reached the kernel, and each is counted once
    assert len(report.lags) == sum(size for size, _ in report.bursts)
    for checkpoint in report.checkpoints:
        flows = checkpoint.flows
        assert flows is not None
        assert not flows.violations, f"after {checkpoint.changes} changes: {flows.violations[:5]}"
        assert flows.other_flows == flows.others_inserted == settings.other_flows
        assert flows.service_flows + flows.added == settings.service_flows
    assert report.conntrack_deleted > 0, "the churn left no Service flow stale: nothing tested"
    assert all(s.conntrack_seconds > 0 for s in report.syncs)
