"""The benchmark's pure parts: statistics, ruleset counting, records and results.json, the
Markdown table and report, the CLI's settings."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from minikproxy.benchmark.adapters import count_elements, iptables_size, nft_size
from minikproxy.benchmark.cluster import (
    MAX_ENDPOINTS,
    REFUSING_BACKEND,
    backend_addresses,
    cluster_objects,
)
from minikproxy.benchmark.ipvsvm import GuestProgress, progress_text
from minikproxy.benchmark.report import (
    COLUMNS,
    markdown_table,
    report_markdown,
    strategies_table,
    write_plots,
)
from minikproxy.benchmark.results import (
    RECORD_KEYS,
    Record,
    Skipped,
    make_header,
    read_results,
    write_results,
)
from minikproxy.benchmark.runner import Settings
from minikproxy.benchmark.stats import percentile, summarize
from minikproxy.cli import build_parser
from minikproxy.cli_bench import progress_display, settings_from_args
from minikproxy.testing.synthetic import service_type, synthetic_service


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0], 95) == 10.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_bad_input(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_summarize() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    s = summarize(values)
    assert (s.median, s.min, s.max, s.rounds) == (3.0, 1.0, 5.0, 5)
    assert s.p95 == pytest.approx(4.8)
    assert s.p99 == pytest.approx(4.96)
    assert s.median == statistics.median(values)
    with pytest.raises(ValueError):
        summarize([])


def test_count_elements() -> None:
    assert count_elements("add element ip t s { 1.2.3.4, 1.2.3.5 . tcp . 80, 1.1.1.1 }") == 3
    assert count_elements("add element ip t m { 1.2.3.4 . tcp . 80 : goto svc-x }") == 1
    assert count_elements("add element ip t s { }") == 0


def test_nft_size_counts_script_statements() -> None:
    script = (
        "add table ip t\n"
        "add chain ip t c { type nat hook output priority 0 ; }\n"
        "add chain ip t d\n"
        "add set ip t s { type ipv4_addr ; }\n"
        "add map ip t m { type ipv4_addr : verdict ; }\n"
        "add rule ip t c ip daddr @s jump d\n"
        "add element ip t s { 10.0.0.1, 10.0.0.2 }\n"
        "add element ip t m { 10.0.0.1 : jump d }\n"
    )
    size = nft_size(script)
    assert (size.rules, size.chains, size.sets, size.elements) == (1, 2, 2, 3)
    assert size.bytes == len(script.encode())


def test_iptables_size_counts_rules_and_chains() -> None:
    text = (
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n"
        "-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n"
    )
    size = iptables_size(text)
    assert (size.rules, size.chains, size.sets, size.elements) == (1, 2, 0, 0)


def test_synthetic_mix_is_kube_proxy_shaped() -> None:
    kinds = [service_type(i) for i in range(1000)]
    assert kinds.count("ClusterIP") == 850
    assert kinds.count("NodePort") == 100
    assert kinds.count("LoadBalancer") == 50
    node_ports = [
        synthetic_service(i)["spec"]["ports"][0]["nodePort"]
        for i in range(10000)
        if service_type(i) != "ClusterIP"
    ]
    assert len(node_ports) == len(set(node_ports)), "NodePorts must not collide"
    lb = synthetic_service(5)
    assert lb["status"]["loadBalancer"]["ingress"][0]["ip"] == "198.18.0.0"


def test_cluster_objects_add_the_benchmarks_services() -> None:
    objs = cluster_objects(20, 4)
    names = [
        (o["kind"], o["metadata"]["name"])
        for o in objs
        if o["metadata"].get("namespace") == "zz-bench"
    ]
    assert ("Service", "datapath") in names and ("Service", "flip-service") in names
    datapath = next(o for o in objs if o["metadata"]["name"] == "datapath-bench")
    assert [e["addresses"][0] for e in datapath["endpoints"]] == list(backend_addresses(4))
    assert ("Service", "flip-service") not in [
        (o["kind"], o["metadata"]["name"]) for o in cluster_objects(20, 4, flip_service=False)
    ]
    with pytest.raises(ValueError, match="--endpoints"):
        backend_addresses(0)


def _records() -> list[Record]:
    return [
        Record.of("iptables", 1000, 10, "compile_full", "ms", [10.0, 12.0, 11.0]),
        Record.of("iptables", 1000, 10, "ruleset_bytes", "bytes", [2048.0]),
        Record.of("iptables", 1000, 10, "update_endpoint_added", "ms", [5.0, 7.0, 6.0, 30.0]),
        Record.of("nftables", 1000, 10, "compile_full", "ms", [3.0]),
        Record.of("iptables-legacy", 1000, 10, "apply_iptables_restore", "s", [0.5]),
        Record.of("iptables-legacy", 1000, 10, "apply_python_iptables", "s", [10.0]),
    ]


def test_results_json_round_trip(tmp_path: Path) -> None:
    header = make_header({"sizes": [1000]}, [Skipped("ipvs", "everything", "not landed")])
    path = tmp_path / "results.json"
    write_results(path, header, _records())
    body = json.loads(path.read_text())
    assert set(body) == {"header", "records"}
    assert all(tuple(r) == RECORD_KEYS for r in body["records"])
    assert body["records"][0] == {
        "mode": "iptables", "size": 1000, "endpoints": 10, "metric": "compile_full",
        "unit": "ms", "median": 11.0, "min": 10.0, "max": 12.0, "p95": 11.9, "rounds": 3,
    }  # fmt: skip
    machine = body["header"]["machine"]
    assert {"cores", "memory_mib", "kernel", "cpu_model", "iptables", "nft"} <= set(machine)
    assert body["header"]["minikproxy_version"] and body["header"]["date"]
    assert body["header"]["skipped"] == [
        {"mode": "ipvs", "what": "everything", "reason": "not landed"}
    ]
    read_header, records = read_results(path)
    assert records == _records() and read_header == body["header"]


def test_read_results_names_the_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"header": {}, "records": [{"mode": "x"}]}))
    with pytest.raises(ValueError, match="record 0"):
        read_results(path)


def test_markdown_table_one_row_per_mode_and_size() -> None:
    table = markdown_table(_records())
    lines = table.splitlines()
    header = lines[0]
    assert header.startswith("| mode | Services |")
    assert "full compile (ms)" in header and "connect p99 (µs)" in header
    assert len(header.split("|")) - 2 == 2 + len(COLUMNS)
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["iptables", "nftables", "iptables-legacy"]
    iptables = rows[0].split("|")
    assert iptables[3].strip() == "11.0"  # the median
    assert "6.50 / 26.6" in rows[0]  # median / p95 of the update latencies
    assert "2.00" in rows[0]  # 2048 bytes in KiB
    assert rows[1].count(" - ") >= len(COLUMNS) - 1  # nftables: only its compile


def test_strategies_table() -> None:
    table = strategies_table(_records())
    assert "| iptables-legacy | 1000 | 0.500 | 10.0 | 20x |" in table
    assert strategies_table(_records()[:2]) == ""


def test_report_markdown_says_what_each_figure_means() -> None:
    header = make_header({"sizes": [1000], "endpoints": 10}, [Skipped("ipvs", "all", "why")])
    plots = ["update_latency.png", "load_time.png", "connect_latency.png", "ruleset_size.png"]
    text = report_markdown(header, _records(), [Skipped("ipvs", "all", "why")], plots)
    assert "noisy" in text and "within this one run" in text and "extrapolated" in text
    for plot in plots:
        assert f"]({plot})" in text
    assert "| mode | Services |" in text and "python-iptables" in text
    assert "**ipvs**, all: why" in text


def test_write_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        *_records(),
        Record.of("iptables", 1000, 10, "load_total", "s", [1.0]),
        Record.of("iptables", 1000, 10, "load_kernel", "s", [0.8]),
        Record.of("iptables", 1000, 10, "connect_latency", "us", [30.0, 40.0]),
        Record.of("iptables", 1000, 10, "connect_latency_p99", "us", [90.0]),
        Record.of("iptables", 1000, 10, "ruleset_rules", "count", [100.0]),
    ]
    names = write_plots(records, tmp_path)
    assert len(names) == 4
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["bench", *argv]))


def test_bench_flags() -> None:
    default = _args()
    assert default.sizes == (1000, 5000, 10000) and default.update_rounds == 20
    assert default.modes == (
        "iptables",
        "iptables-legacy",
        "nftables",
        "nftables-kube-proxy",
        "ipvs",
    )
    quick = _args("--quick", "--modes", "iptables,nftables")
    assert quick.sizes == (1000,) and quick.modes == ("iptables", "nftables")
    assert quick.update_rounds < 20
    custom = _args("--sizes", "100,200", "--endpoints", "3", "--rounds", "7", "--netns-prefix", "x")
    assert (custom.sizes, custom.endpoints, custom.update_rounds, custom.prefix) == (
        (100, 200), 3, 7, "x",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--modes", "userspace"],
        ["--sizes", "1k"],
        ["--sizes", "0"],
        ["--rounds", "0"],
        ["--endpoints", "0"],
        ["--endpoints", "251"],
    ],
)
def test_bench_flags_reject_bad_values(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", *argv])
    assert "bench: error" in capsys.readouterr().err


def test_bench_endpoints_above_the_address_plan_are_rejected_by_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _args("--endpoints", "250").endpoints == 250 == MAX_ENDPOINTS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--endpoints", "251"])
    err = capsys.readouterr().err
    assert "bench: error: argument --endpoints: at most 250" in err, err
    assert "Traceback" not in err


def test_plain_progress_lines_say_the_time_left_and_the_share_done(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with progress_display(4.0, plain=True) as show:
        show("starting", 0.0)
        show("compiled", 1.0)
    first, second = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[\s*\d+ s, 0\.0% done\] starting", first), first
    assert re.fullmatch(r"\[\s*\d+ s, ~\d+ s left, 25\.0% done\] compiled", second), second
    # What the host reads back from the IPVS VM's lines.
    assert progress_text(second) == GuestProgress("compiled", 0.25)


def test_the_package_docstring_names_exactly_its_modules() -> None:
    import minikproxy.benchmark as package

    named = set(re.findall(r":mod:`\.(\w+)`", package.__doc__ or ""))
    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__"}
    assert named == modules


def test_run_rewrite_top_level_is_a_hidden_benchmark_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench/bench_e2e_latency.py starts kube-proxy-style partial syncs with it; ``run
    --help`` does not show it."""
    parser = build_parser()
    assert parser.parse_args(["run", "--iptables-rewrite-top-level"]).iptables_rewrite_top_level
    assert not parser.parse_args(["run"]).iptables_rewrite_top_level
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    assert "rewrite-top-level" not in capsys.readouterr().out


def test_refusing_backend_is_outside_every_answering_one() -> None:
    assert REFUSING_BACKEND not in backend_addresses(250)
