"""The benchmark's IPVS parts that need no IPVS kernel: the ruleset's size, the settings sent
to the IPVS VM, merging its records (modes marked ``(VM)``) into the run, and the report's
separate IPVS section."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from minikproxy.benchmark import ipvsvm, runner
from minikproxy.benchmark.adapters import Ipvs, IpvsRulesetSize, ipvs_size
from minikproxy.benchmark.ipvsvm import (
    GuestProgress,
    VmError,
    VmOutcome,
    is_vm,
    mark,
    merge,
    progress_text,
)
from minikproxy.benchmark.report import (
    FIGURES,
    IPVS_VM_TITLE,
    ipvs_table,
    markdown_table,
    report_markdown,
    ruleset_lines,
    write_plots,
)
from minikproxy.benchmark.results import Record, Skipped, make_header, write_results
from minikproxy.benchmark.runner import QUICK_WITHOUT_VM, Outcome, Runner, Settings
from minikproxy.cli import build_parser
from minikproxy.cli_bench import settings_as_json, settings_from_args, settings_from_json

RENDERED = (
    "# ipset\n"
    "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n"
    "create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536\n"
    "add KUBE-CLUSTER-IP 10.96.0.1,tcp:80\n"
    "add KUBE-CLUSTER-IP 10.96.0.2,tcp:80\n"
    "add KUBE-LOOP-BACK 10.10.2.2,tcp:8080,10.10.2.2\n"
    "# ipvs\n"
    "-A -t 10.96.0.1:80 -s rr\n"
    "-a -t 10.96.0.1:80 -r 10.10.2.2:8080 -m -w 1\n"
    "-a -t 10.96.0.1:80 -r 10.10.2.3:8080 -m -w 1\n"
    "-A -t 10.96.0.2:80 -s rr\n"
    "# addresses\n"
    "10.96.0.1/32 dev kube-ipvs0\n"
    "10.96.0.2/32 dev kube-ipvs0\n"
    "# iptables\n"
    "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n"
    "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n"
)


def test_ipvs_size_counts_each_section() -> None:
    size = ipvs_size(RENDERED)
    assert (size.virtual_servers, size.real_servers, size.addresses) == (2, 2, 2)
    assert (size.sets, size.elements, size.rules, size.chains) == (2, 3, 1, 2)
    assert size.bytes == len(RENDERED.encode())


def test_ipvs_adapter_compiles_and_sizes_a_cluster() -> None:
    from minikproxy.benchmark.measure import build_cluster, measure_compile

    cluster = build_cluster(20, 3)
    compiled = measure_compile(Ipvs(), cluster, rounds=2)
    assert isinstance(compiled.size, IpvsRulesetSize)
    assert len(compiled.full) == len(compiled.incremental) == 2
    # 20 synthetic Services (some with NodePorts and LBs) + the benchmark's three ClusterIPs.
    assert compiled.size.virtual_servers > 23
    assert compiled.size.real_servers >= 20 * 3
    assert compiled.size.elements > 0 and compiled.size.rules > 0


def test_progress_text_reads_the_guests_plain_progress_lines() -> None:
    assert progress_text("[  12 s, ~340 s left, 3.5% done] ipvs @ 1000: compile") == (
        GuestProgress("ipvs @ 1000: compile", 0.035)
    )
    assert progress_text("[    0 s, 0.0% done] 1000 Services: building the cluster") == (
        GuestProgress("1000 Services: building the cluster", 0.0)
    )
    assert progress_text("[  12 s, ~340 s left] ipvs @ 1000: compile") == (
        GuestProgress("ipvs @ 1000: compile", None)
    )
    assert progress_text("The ipvs proxier is deprecated upstream") is None


def _vm_results(tmp_path: Path) -> Path:
    header = make_header(
        {"sizes": [50], "update_rounds": 20, "load_rounds": 3, "connections": 1000},
        [Skipped("ipvs", "data path at 50", "ProbeError: no answer")],
        machine={"kernel": "6.1.0-57-amd64", "cores": 1, "memory_mib": 1967},
        date="2026-12-06T05:17:38+00:00",
    )
    records = [
        Record.of("ipvs", 50, 10, "load_total", "s", [10.0, 11.0, 12.0]),
        Record.of("ipvs", 50, 10, "load_baseline_tools", "s", [2.5]),
        Record.of("ipvs", 50, 10, "load_vs_baseline", "x", [4.4]),
        Record.of("ipvs", 50, 10, "update_endpoint_added", "ms", [900.0, 1100.0]),
        Record.of("iptables", 50, 10, "connect_latency", "us", [500.0]),
    ]
    path = tmp_path / "results.json"
    write_results(path, header, records)
    return path


def test_merge_marks_every_vm_record_and_skip(tmp_path: Path) -> None:
    from minikproxy.benchmark.results import read_results

    header, records = read_results(_vm_results(tmp_path))
    vm = merge(header, records, seconds=361.96)
    assert [r.mode for r in vm.records] == ["ipvs (VM)"] * 4 + ["iptables (VM)"]
    assert all(is_vm(r.mode) for r in vm.records) and not is_vm("ipvs")
    # Only the mode changes: the record schema and figures stay as measured.
    assert [(r.metric, r.median, r.rounds) for r in vm.records] == [
        (r.metric, r.median, r.rounds) for r in records
    ]
    assert vm.skipped == [Skipped("ipvs (VM)", "data path at 50", "ProbeError: no answer")]
    assert vm.header["machine"]["kernel"] == "6.1.0-57-amd64"
    assert vm.header["settings"]["sizes"] == [50] and vm.header["seconds"] == 362.0


def _vm_outcome(tmp_path: Path) -> VmOutcome:
    from minikproxy.benchmark.results import read_results

    return merge(*read_results(_vm_results(tmp_path)), seconds=360.0)


def test_report_keeps_vm_rows_apart(tmp_path: Path) -> None:
    vm = _vm_outcome(tmp_path)
    host = [
        Record.of("iptables", 1000, 10, "load_total", "s", [1.0]),
        Record.of("ipvs", 1000, 10, "compile_full", "ms", [40.0]),
        Record.of("ipvs", 1000, 10, "ruleset_virtual_servers", "count", [1210.0]),
    ]
    records = host + vm.records
    main = markdown_table(records)
    assert "(VM)" not in main and "| ipvs | 1000 | 40.0 |" in main
    table = ipvs_table(records)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert rows == ["ipvs (VM)", "iptables (VM)"]
    assert "| ipvs (VM) | 50 | 11.0 | - | 2.50 | 4.40 |" in table
    header = make_header({"sizes": [1000], "endpoints": 10}, vm.skipped)
    header["ipvs_vm"] = vm.header
    text = report_markdown(header, records, vm.skipped, [])
    section = text[text.index(f"## {IPVS_VM_TITLE}") :]
    assert "kernel 6.1.0-57-amd64" in section and "at 50 Services" in section
    assert "20 update rounds" in section and "took 6.0 min" in section
    assert "| virtual servers |" in section and "| ipvs | 1000 | 1210 | - |" in section
    assert "**ipvs (VM)**, data path at 50: ProbeError" in text
    # IPVS measured directly (a kernel with IPVS) is reported in the same table, unmarked.
    direct = [Record.of("ipvs", 1000, 10, "load_baseline_tools", "s", [1.0])]
    assert "| ipvs | 1000 |" in ipvs_table(direct)
    assert ipvs_table(host) == ""


def test_plots_leave_vm_records_out(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    only_vm = [
        Record.of(mark("ipvs"), 50, 10, "connect_latency", "us", [700.0]),
        Record.of(mark("ipvs"), 50, 10, "load_total", "s", [10.0]),
    ]
    write_plots(only_vm, tmp_path)
    both = tmp_path / "both"
    both.mkdir()
    write_plots([*only_vm, Record.of("iptables", 50, 10, "connect_latency", "us", [50.0])], both)
    # The VM's records add no line: the plots are those of the host's records alone.
    alone = tmp_path / "alone"
    alone.mkdir()
    write_plots([Record.of("iptables", 50, 10, "connect_latency", "us", [50.0])], alone)
    assert (both / "connect_latency.png").read_bytes() == (
        alone / "connect_latency.png"
    ).read_bytes()


def _args(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["bench", *argv]))


def test_vm_settings_flags_and_round_trip() -> None:
    assert _args().vm_sizes == (1000,)
    assert _args("--ipvs-vm-sizes", "200,500").vm_sizes == (200, 500)
    assert _args("--quick").vm_sizes == ()
    assert _args("--quick", "--ipvs-vm-sizes", "50").vm_sizes == (50,)
    settings = _args("--sizes", "100", "--rounds", "4")
    body = json.loads(json.dumps(settings_as_json(settings)))
    again = settings_from_json({**body, "vm_part": True})
    assert again.vm_part and again.sizes == (100,) and again.update_rounds == 4
    assert again.strategy_sizes == settings.strategy_sizes


@pytest.fixture
def no_ipvs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "kernel_has_ipvs", lambda: False)


def _run(
    settings: Settings, tmp_path: Path, shown: list[tuple[str, float]] | None = None
) -> Outcome:
    sink = shown if shown is not None else []
    progress = runner.Progress(
        runner.plan_weight(settings), lambda text, advance: sink.append((text, advance))
    )
    return Runner(settings, progress, tmp_path).run()


def test_without_ipvs_compile_runs_here_and_the_rest_in_the_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ipvs_kernel: None
) -> None:
    calls: list[tuple[dict[str, Any], float]] = []

    def fake_vm(settings: dict[str, Any], timeout: float, show: Any) -> VmOutcome:
        calls.append((settings, timeout))
        show("[  30 s, ~60 s left, 25.0% done] ipvs @ 50: first load into empty namespaces")
        show("[  40 s, ~50 s left, 30.0% done] ipvs @ 50: the stock tools' load")
        return _vm_outcome(tmp_path)

    monkeypatch.setattr(ipvsvm, "run_vm_part", fake_vm)
    settings = Settings(modes=("ipvs",), sizes=(20,), vm_sizes=(50,), rounds=2)
    shown: list[tuple[str, float]] = []
    outcome = _run(settings, tmp_path, shown)
    # The guest's share done moves the host's estimate along; "done" counts the rest.
    vm_weight = 50 / 1000 * runner.VM_WEIGHT
    vm_steps = [(text, advance) for text, advance in shown if text.startswith("ipvs in the VM")]
    assert [text for text, _ in vm_steps] == [
        "ipvs in the VM: ipvs @ 50: first load into empty namespaces",
        "ipvs in the VM: ipvs @ 50: the stock tools' load",
        "ipvs in the VM: done",
    ]
    advances = [advance for _, advance in vm_steps]
    assert advances == pytest.approx([0.25 * vm_weight, 0.05 * vm_weight, 0.7 * vm_weight])
    assert sum(advance for _, advance in shown) == pytest.approx(runner.plan_weight(settings))
    [(sent, timeout)] = calls
    assert (
        sent["vm_part"] is True
        and sent["sizes"] == [50]
        and sent["modes"]
        == [
            "ipvs",
            "iptables",
        ]
    )
    assert "prefix" not in sent and timeout > 300
    here = {(r.mode, r.size, r.metric) for r in outcome.records if not is_vm(r.mode)}
    assert ("ipvs", 20, "compile_full") in here and ("ipvs", 20, "ruleset_real_servers") in here
    assert not any(m == "load_total" for _, _, m in here)  # no IPVS kernel here
    assert ("ipvs (VM)", 50, "load_vs_baseline") in {
        (r.mode, r.size, r.metric) for r in outcome.records
    }
    assert outcome.header["ipvs_vm"]["settings"]["sizes"] == [50]
    assert [s.mode for s in outcome.skipped] == ["ipvs (VM)"]


def test_a_failed_vm_run_is_reported_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ipvs_kernel: None
) -> None:
    def failing(settings: dict[str, Any], timeout: float, show: Any) -> VmOutcome:
        raise VmError("the IPVS VM's run exited 125:\nguest: 9p mount")

    monkeypatch.setattr(ipvsvm, "run_vm_part", failing)
    outcome = _run(Settings(modes=("ipvs",), sizes=(20,), vm_sizes=(50,), rounds=1), tmp_path)
    assert [(s.mode, s.what) for s in outcome.skipped] == [
        ("ipvs (VM)", "everything in the IPVS VM")
    ]
    assert "9p mount" in outcome.skipped[0].reason
    assert "ipvs_vm" not in outcome.header


def test_quick_compiles_ipvs_here_and_says_why_the_vm_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ipvs_kernel: None
) -> None:
    def unexpected(*args: Any) -> VmOutcome:
        raise AssertionError("--quick must not boot the VM")

    monkeypatch.setattr(ipvsvm, "run_vm_part", unexpected)
    outcome = _run(Settings.quick(modes=("ipvs",), sizes=(20,)), tmp_path)
    assert ("ipvs", "compile_one_change") in {(r.mode, r.metric) for r in outcome.records}
    [skipped] = outcome.skipped
    assert skipped.mode == "ipvs (VM)" and skipped.reason == QUICK_WITHOUT_VM


def test_a_ctrl_c_taken_by_another_thread_stops_a_silent_vm_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest can stay silent for many minutes (a 10k first load): a ^C the kernel hands
    another thread of ``bench`` must not wait for its next line."""
    monkeypatch.setattr(ipvsvm, "ensure_vm", lambda vm_dir=None: None)
    silent_guest = ["sh", "-c", "echo guest-ready; exec sleep 120"]
    monkeypatch.setattr(ipvsvm, "vm_argv", lambda command, vm_dir=None: silent_guest)
    ready = threading.Event()

    def interrupt_from_another_thread() -> None:
        ready.wait(30)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=interrupt_from_another_thread, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ipvsvm.run_vm_part({}, 300, show=lambda line: ready.set())
    assert time.monotonic() - start < 20  # not the guest's 120 s of silence


def test_ipvs_ruleset_size_counts_its_virtual_and_real_servers() -> None:
    """IPVS's per-Service kernel objects are IPVS servers, not rules or ipset entries: the
    main table and ruleset_size.png show them, labelled, or IPVS would look tiny."""
    records = [
        Record.of("nftables", 10000, 10, "ruleset_rules", "count", [38.0]),
        Record.of("nftables", 10000, 10, "ruleset_elements", "count", [254000.0]),
        Record.of("ipvs", 10000, 10, "ruleset_rules", "count", [32.0]),
        Record.of("ipvs", 10000, 10, "ruleset_elements", "count", [3000.0]),
        Record.of("ipvs", 10000, 10, "ruleset_virtual_servers", "count", [12003.0]),
        Record.of("ipvs", 10000, 10, "ruleset_real_servers", "count", [120011.0]),
    ]
    table = markdown_table(records)
    assert "| ipvs | 10000 | - | - | 32 iptables + IPVS 12003 virtual, 120011 real servers |" in (
        table
    )
    assert "| nftables | 10000 | - | - | 38 |" in table
    assert ruleset_lines(records) == [
        ("nftables rules", "-", [(10000, 38.0)]),
        ("ipvs iptables rules", "-", [(10000, 32.0)]),
        ("nftables set/map elements", ":", [(10000, 254000.0)]),
        ("ipvs ipset entries", ":", [(10000, 3000.0)]),
        ("ipvs IPVS virtual + real servers", "-.", [(10000, 132014.0)]),
    ]
    [caption] = [text for name, _, text in FIGURES if name == "ruleset_size.png"]
    assert "IPVS virtual servers" in caption and "real servers" in caption
