"""``minikproxy bench`` end to end, in the real kernel: ``--quick`` writes a complete
results.json, report.md and the plots (so the benchmark cannot rot), and an interrupted run
leaves no network namespace and no controller behind."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minikproxy.benchmark.report import PLOTS
from minikproxy.benchmark.results import RECORD_KEYS
from minikproxy.testing.ipvsload import kernel_has_ipvs
from tests.helpers import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

MODES = ("iptables", "iptables-legacy", "nftables", "nftables-kube-proxy")
EVERY_MODE_METRICS = (
    "compile_full", "compile_one_change", "ruleset_rules", "ruleset_chains", "ruleset_sets",
    "ruleset_elements", "ruleset_bytes", "load_total", "load_ours", "load_kernel",
    "connect_latency", "connect_latency_p99", "connections_per_second",
)  # fmt: skip
CONTROLLER_METRICS = (
    "controller_first_sync", "controller_rss", "update_endpoint_added",
    "update_endpoint_removed", "update_service_added", "update_service_deleted",
)  # fmt: skip


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def test_quick_run_writes_results_report_and_plots(tmp_path: Path) -> None:
    prefix = f"mkpbq{secrets.token_hex(2)}"
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "minikproxy", "bench", "--quick", "--out", str(out),
            "--netns-prefix", prefix]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _namespaces(prefix) == []

    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | Services | full compile (ms)")
    assert [row.split("|")[1].strip() for row in table[1:5]] == list(MODES)
    assert all(row.split("|")[2].strip() == "1000" for row in table[1:5])

    body = json.loads((out / "results.json").read_text())
    header = body["header"]
    assert {"cores", "memory_mib", "kernel", "cpu_model", "iptables", "nft"} <= set(
        header["machine"]
    )
    assert header["minikproxy_version"] and header["date"]
    skipped = {(s["mode"], s["what"].split(":")[0]) for s in header["skipped"]}
    if not kernel_has_ipvs():  # IPVS compiles here; --quick leaves the IPVS VM out, saying so
        assert ("ipvs (VM)", "first load, baseline, controller, data path") in skipped
    records = body["records"]
    for record in records:
        assert tuple(record) == RECORD_KEYS
        assert record["min"] <= record["median"] <= record["max"], record
        assert record["min"] <= record["p95"] <= record["max"], record
        assert record["size"] == 1000 and record["endpoints"] == 10
    have = {(r["mode"], r["metric"]): r for r in records}
    for mode in MODES:
        for metric in EVERY_MODE_METRICS:
            assert (mode, metric) in have, (mode, metric)
        controller = [(mode, m) in have for m in CONTROLLER_METRICS]
        # A mode `run` cannot start yet is reported as skipped, never left out silently.
        assert all(controller) or (mode, "controller") in skipped, mode
    for mode in ("iptables", "iptables-legacy", "nftables"):
        assert have[(mode, "update_endpoint_added")]["rounds"] >= 5
        assert have[(mode, "controller_rss")]["median"] > 10
    assert ("iptables-legacy", "apply_python_iptables") in have
    assert ("iptables-legacy", "apply_iptables_restore") in have
    assert have[("iptables-legacy", "kernel_table_bytes")]["median"] > 1_000_000
    assert have[("nftables", "ruleset_elements")]["median"] > 10000  # Services in maps
    assert have[("iptables", "ruleset_rules")]["median"] > 10000  # Services in rules
    assert have[("ipvs", "ruleset_virtual_servers")]["median"] > 1000  # compiled natively
    assert ("ipvs", "compile_one_change") in have

    report = (out / "report.md").read_text()
    assert "| mode | Services |" in report and "noisy" in report
    for plot in PLOTS:
        assert f"]({plot})" in report
        data = (out / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_interrupts_leave_no_namespace_or_controller_behind(tmp_path: Path) -> None:
    prefix = f"mkpbi{secrets.token_hex(2)}"
    # Many update rounds on a small cluster: the controller runs long enough to be caught.
    argv = [sys.executable, "-m", "minikproxy", "bench", "--quick", "--modes", "iptables",
            "--sizes", "200", "--rounds", "500", "--netns-prefix", prefix]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        # Interrupt while the controller runs in the topology's node namespace.
        wait_for(
            lambda: bool(_processes_mentioning(f"{tmp_path}/mkpbench-")),
            timeout=180,
            what="the benchmark's controller (in its topology's node namespace)",
        )
        assert f"{prefix}-t1-node" in _namespaces(prefix)
        proc.send_signal(signal.SIGINT)
        # A second ^C and a SIGTERM while it stops the controller and deletes namespaces:
        # ignored, the cleanup runs to its end.
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert _namespaces(prefix) == []
    assert _processes_mentioning(str(tmp_path)) == []


def test_stopping_the_ipvs_vm_stops_qemu(tmp_path: Path) -> None:
    """What an interrupted ``bench`` does to its IPVS VM (``ipvsvm._stop``: SIGTERM to the VM
    script's process group) stops qemu at once. ``timeout`` used to give qemu a group of its
    own: it outlived the run until it next wrote to its closed output, or for hours."""
    from minikproxy.benchmark import ipvsvm

    ipvsvm.ensure_vm()
    proc = subprocess.Popen(
        ipvsvm.vm_argv(["sh", "-c", "echo guest-ready; exec sleep 600"]), cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    try:
        # The guest runs its command (as a bench's VM part runs for an hour, silent at times):
        # before that, a guest that lost its run directory powered itself off.
        wait_for(lambda: "guest-ready\n" in lines, timeout=240, what="the guest's command")
        ipvsvm._stop(proc)  # the output pipe stays open: qemu must go by the signal alone
        wait_for(lambda: _qemu_in_session(proc.pid) == [], timeout=10, what="qemu stopped")
    finally:
        for pid in _qemu_in_session(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _qemu_in_session(session: int) -> list[int]:
    """The qemu processes of ``session`` (the VM script started its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if name.startswith("qemu-system") and int(rest.split()[3]) == session:
            found.append(int(entry.name))
    return found


def test_legacy_table_bytes_grow_with_the_rules() -> None:
    from minikproxy.benchmark.kmem import legacy_table_bytes
    from minikproxy.benchmark.measure import scratch_namespaces

    rules = "*nat\n:BENCH - [0:0]\n" + "".join(
        f"-A BENCH -s 10.0.{i // 256}.{i % 256} -j RETURN\n" for i in range(500)
    ) + "COMMIT\n"  # fmt: skip
    with scratch_namespaces(f"mkpbk{secrets.token_hex(2)}") as scratch:
        netns = scratch.fresh()
        before = legacy_table_bytes(netns)
        subprocess.run(
            ["ip", "netns", "exec", netns, "iptables-legacy-restore", "-w", "60"],
            input=rules, text=True, check=True,
        )  # fmt: skip
        after = legacy_table_bytes(netns)
    assert after - before > 500 * 100  # each rule's entry, match and target: >100 bytes
