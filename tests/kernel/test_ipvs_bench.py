"""``minikproxy bench``'s IPVS part end to end at a tiny size, in an IPVS kernel (``ipvs``-marked:
test_ipvs_vm.py runs it in the VM, which is also where the bench runs it on this machine): the
first load against the stock tools' load, the real controller's first sync and updates, the
data path through IPVS and the iptables reference's, written as the VM writes them for the
host and merged as the host merges them. Kept tiny: every second here is 10-20 s emulated."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from minikproxy.benchmark.ipvsvm import SETTINGS_FILE, merge
from minikproxy.benchmark.report import ipvs_table
from minikproxy.benchmark.results import RECORD_KEYS, read_results
from minikproxy.benchmark.runner import Settings
from minikproxy.cli_bench import settings_as_json, vm_part_main

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]

IPVS_METRICS = (
    "load_total", "load_ours", "load_kernel", "load_baseline_tools", "load_vs_baseline",
    "controller_first_sync", "controller_rss", "update_endpoint_added",
    "update_endpoint_removed", "update_service_added", "update_service_deleted",
    "connect_latency", "connect_latency_p99", "connections_per_second",
)  # fmt: skip


def test_the_vm_part_measures_ipvs_against_its_baselines(tmp_path: Path) -> None:
    prefix = f"mkpbv{secrets.token_hex(2)}"
    settings = Settings(
        modes=("ipvs", "iptables"), sizes=(5,), endpoints=2, rounds=1, load_rounds=1,
        update_rounds=1, connections=10, rate_rounds=1, rate_seconds=0.2, sync_timeout=300,
        vm_part=True, prefix=prefix,
    )  # fmt: skip
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**settings_as_json(settings),
                                                      "prefix": prefix}))  # fmt: skip
    assert vm_part_main(tmp_path) == 0
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert prefix not in listed.stdout

    header, records = read_results(tmp_path / "results.json")
    assert header["skipped"] == [], header["skipped"]
    assert header["machine"]["kernel"] and header["settings"]["vm_part"] is True
    have = {(r.mode, r.metric): r for r in records}
    for metric in IPVS_METRICS:
        assert ("ipvs", metric) in have, metric
    assert not any(m.startswith("compile") for _, m in have)  # the host compiles
    assert have[("ipvs", "update_endpoint_added")].rounds == 1
    assert have[("ipvs", "load_vs_baseline")].median > 0
    assert have[("ipvs", "connections_unanswered")].median == 0
    assert {m for mode, m in have if mode == "iptables"} == {
        "connect_latency", "connect_latency_p99", "connections_per_second",
        "connections_unanswered",
    }  # fmt: skip
    assert have[("iptables", "connect_latency")].rounds == 10

    vm = merge(header, records, seconds=1.0)
    assert all(tuple(r.to_json()) == RECORD_KEYS for r in vm.records)
    assert [line.split("|")[1].strip() for line in ipvs_table(vm.records).splitlines()[2:]] == [
        "ipvs (VM)",
        "iptables (VM)",
    ]
