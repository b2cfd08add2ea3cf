"""What a run prints and writes: the Markdown table (stdout and report.md), report.md with a
paragraph per figure, and the PNG plots (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minikproxy.benchmark.ipvsvm import is_vm
from minikproxy.benchmark.results import Record, Skipped

Index = dict[tuple[str, int, str], Record]


def index(records: Iterable[Record]) -> Index:
    """Records by (mode, size, metric)."""
    return {(r.mode, r.size, r.metric): r for r in records}


@dataclass(frozen=True)
class Column:
    """One table column: its header (with the unit) and how to show a (mode, size) cell."""

    header: str
    cell: Callable[[Index, str, int], str]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def median_of(metric: str, scale: float = 1.0) -> Callable[[Index, str, int], str]:
    """A cell showing ``metric``'s median (times ``scale``), or "-"."""

    def cell(idx: Index, mode: str, size: int) -> str:
        record = idx.get((mode, size, metric))
        return "-" if record is None else _fmt(record.median * scale)

    return cell


def count_of(metric: str) -> Callable[[Index, str, int], str]:
    """A cell showing a count."""

    def cell(idx: Index, mode: str, size: int) -> str:
        record = idx.get((mode, size, metric))
        return "-" if record is None else f"{record.median:.0f}"

    return cell


def median_p95(metric: str) -> Callable[[Index, str, int], str]:
    """A cell showing ``median / p95``."""

    def cell(idx: Index, mode: str, size: int) -> str:
        record = idx.get((mode, size, metric))
        return "-" if record is None else f"{_fmt(record.median)} / {_fmt(record.p95)}"

    return cell


def rules_cell(idx: Index, mode: str, size: int) -> str:
    """The rules column: IPVS's few iptables rules come with its per-Service kernel objects,
    the IPVS virtual and real servers, or its row would look tiny."""
    rules = idx.get((mode, size, "ruleset_rules"))
    if rules is None:
        return "-"
    virtual = idx.get((mode, size, "ruleset_virtual_servers"))
    real = idx.get((mode, size, "ruleset_real_servers"))
    if virtual is None or real is None:
        return f"{rules.median:.0f}"
    return (
        f"{rules.median:.0f} iptables + IPVS {virtual.median:.0f} virtual, "
        f"{real.median:.0f} real servers"
    )


#: The controller's and the data path's columns, shared by every mode's table.
LIVE_COLUMNS: tuple[Column, ...] = (
    Column("controller first sync (s)", median_of("controller_first_sync")),
    Column("controller RSS (MiB)", median_of("controller_rss")),
    Column("endpoint added p50/p95 (ms)", median_p95("update_endpoint_added")),
    Column("endpoint removed p50/p95 (ms)", median_p95("update_endpoint_removed")),
    Column("Service added p50/p95 (ms)", median_p95("update_service_added")),
    Column("Service deleted p50/p95 (ms)", median_p95("update_service_deleted")),
    Column("connect p50 (µs)", median_of("connect_latency")),
    Column("connect p99 (µs)", median_of("connect_latency_p99")),
    Column("new connections (1/s)", median_of("connections_per_second")),
)

COLUMNS: tuple[Column, ...] = (
    Column("full compile (ms)", median_of("compile_full")),
    Column("1 change compile (ms)", median_of("compile_one_change")),
    Column("rules", rules_cell),
    Column("chains", count_of("ruleset_chains")),
    Column("sets+maps", count_of("ruleset_sets")),
    Column("elements", count_of("ruleset_elements")),
    Column("ruleset (KiB)", median_of("ruleset_bytes", 1 / 1024)),
    Column("first load (s)", median_of("load_total")),
    Column("of it tools+kernel (s)", median_of("load_kernel")),
    Column("kernel table (KiB)", median_of("kernel_table_bytes", 1 / 1024)),
    *LIVE_COLUMNS,
)


def _rows(records: Sequence[Record]) -> list[tuple[str, int]]:
    seen: dict[tuple[str, int], None] = {}
    for r in records:
        seen.setdefault((r.mode, r.size), None)
    return list(seen)


def _table(records: Sequence[Record], rows: Sequence[tuple[str, int]],
           columns: Sequence[Column]) -> str:  # fmt: skip
    idx = index(records)
    header = ["mode", "Services", *(c.header for c in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, size in rows:
        cells = [mode, str(size), *(c.cell(idx, mode, size) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(records: Sequence[Record]) -> str:
    """One row per mode x size (in the order measured), one column per figure; the modes
    measured in the IPVS VM are left to :func:`ipvs_table`."""
    rows = [(mode, size) for mode, size in _rows(records) if not is_vm(mode)]
    return _table(records, rows, COLUMNS)


IPVS_RULESET_COLUMNS: tuple[Column, ...] = (
    Column("virtual servers", count_of("ruleset_virtual_servers")),
    Column("real servers", count_of("ruleset_real_servers")),
    Column("addresses on kube-ipvs0", count_of("ruleset_addresses")),
    Column("ipsets", count_of("ruleset_sets")),
    Column("ipset entries", count_of("ruleset_elements")),
    Column("iptables rules", count_of("ruleset_rules")),
    Column("rendered (KiB)", median_of("ruleset_bytes", 1 / 1024)),
)

IPVS_COLUMNS: tuple[Column, ...] = (
    Column("first load (s)", median_of("load_total")),
    Column("of it tools+kernel (s)", median_of("load_kernel")),
    Column("stock tools' load (s)", median_of("load_baseline_tools")),
    Column("first load / stock tools", median_of("load_vs_baseline")),
    *LIVE_COLUMNS,
)


def ipvs_ruleset_table(records: Sequence[Record]) -> str:
    """IPVS's compiled objects per size ("" when IPVS was not compiled)."""
    rows = [(m, s) for m, s in _rows(records) if m == "ipvs"]
    idx = index(records)
    rows = [(m, s) for m, s in rows if (m, s, "ruleset_virtual_servers") in idx]
    return _table(records, rows, IPVS_RULESET_COLUMNS) if rows else ""


def ipvs_table(records: Sequence[Record]) -> str:
    """IPVS's kernel figures against the stock tools' load, with the data path of the
    reference measured in the same kernel: the modes measured in the IPVS VM, or IPVS
    measured here ("" when neither)."""
    idx = index(records)
    rows = [
        (m, s)
        for m, s in _rows(records)
        if is_vm(m) or (m == "ipvs" and (m, s, "load_baseline_tools") in idx)
    ]
    return _table(records, rows, IPVS_COLUMNS) if rows else ""


def strategies_table(records: Sequence[Record]) -> str:
    """iptables-restore against python-iptables, where measured ("" when not)."""
    idx = index(records)
    rows = [
        (mode, size)
        for mode, size in _rows(records)
        if (mode, size, "apply_python_iptables") in idx
    ]
    if not rows:
        return ""
    lines = [
        "| mode | Services | iptables-restore (s) | python-iptables (s) | ratio |",
        "|---|---|---|---|---|",
    ]
    for mode, size in rows:
        restore = idx[(mode, size, "apply_iptables_restore")].median
        python = idx[(mode, size, "apply_python_iptables")].median
        lines.append(
            f"| {mode} | {size} | {_fmt(restore)} | {_fmt(python)} | {python / restore:.0f}x |"
        )
    return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------

PLOTS = ("update_latency.png", "load_time.png", "connect_latency.png", "ruleset_size.png")
UPDATE_KINDS = (
    ("update_endpoint_added", "endpoint added"),
    ("update_endpoint_removed", "endpoint removed"),
    ("update_service_added", "Service added"),
    ("update_service_deleted", "Service deleted"),
)


def _series(records: Sequence[Record], metric: str) -> dict[str, list[Record]]:
    by_mode: dict[str, list[Record]] = {}
    for r in records:
        if r.metric == metric:
            by_mode.setdefault(r.mode, []).append(r)
    return {m: sorted(rs, key=lambda r: r.size) for m, rs in by_mode.items()}


def _line(ax: Any, rows: list[Record], label: str, attr: str = "median", **style: Any) -> None:
    ax.plot([r.size for r in rows], [getattr(r, attr) for r in rows], marker="o",
            label=label, **style)  # fmt: skip


def _finish(ax: Any, title: str, ylabel: str, logy: bool = True) -> None:
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Services")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def ruleset_lines(records: Sequence[Record]) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """The lines of ruleset_size.png's count panel: (label, line style, (Services, count)
    points). A mode with IPVS servers (IPVS) shows them as a line of their own, virtual and
    real servers together: its per-Service kernel objects, next to its iptables rules (a
    fixed few) and ipset entries."""
    virtual = _series(records, "ruleset_virtual_servers")
    real = _series(records, "ruleset_real_servers")
    lines: list[tuple[str, str, list[tuple[int, float]]]] = []
    for mode, rows in _series(records, "ruleset_rules").items():
        label = f"{mode} iptables rules" if mode in virtual else f"{mode} rules"
        lines.append((label, "-", [(r.size, r.median) for r in rows]))
    for mode, rows in _series(records, "ruleset_elements").items():
        if any(r.median for r in rows):
            label = f"{mode} ipset entries" if mode in virtual else f"{mode} set/map elements"
            lines.append((label, ":", [(r.size, r.median) for r in rows]))
    for mode, rows in virtual.items():
        reals = {r.size: r.median for r in real.get(mode, [])}
        points = [(r.size, r.median + reals[r.size]) for r in rows if r.size in reals]
        lines.append((f"{mode} IPVS virtual + real servers", "-.", points))
    return lines


def write_plots(records: Sequence[Record], out: Path) -> list[str]:
    """Write the PNGs of :data:`PLOTS` into ``out``; return their names. Records measured in
    the IPVS VM are left out: emulation makes their times incomparable."""
    import matplotlib

    records = [r for r in records if not is_vm(r.mode)]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), sharex=True)
    for ax, (metric, title) in zip(axes.flat, UPDATE_KINDS, strict=True):
        for mode, rows in _series(records, metric).items():
            line = ax.plot([r.size for r in rows], [r.median for r in rows], marker="o",
                           label=f"{mode} p50")[0]  # fmt: skip
            _line(ax, rows, f"{mode} p95", "p95", linestyle="--", color=line.get_color(),
                  alpha=0.6)  # fmt: skip
        _finish(ax, title, "API change → kernel (ms)")
    fig.suptitle("Update latency through the controller (log-log)")
    fig.tight_layout()
    fig.savefig(out / "update_latency.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    kernel = _series(records, "load_kernel")
    for mode, rows in _series(records, "load_total").items():
        line = ax.plot([r.size for r in rows], [r.median for r in rows], marker="o",
                       label=f"{mode} total")[0]  # fmt: skip
        if mode in kernel:
            _line(ax, kernel[mode], f"{mode} tools+kernel", linestyle="--",
                  color=line.get_color(), alpha=0.6)  # fmt: skip
    _finish(ax, "First full sync into an empty namespace", "seconds")
    fig.tight_layout()
    fig.savefig(out / "load_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    p99 = _series(records, "connect_latency_p99")
    for mode, rows in _series(records, "connect_latency").items():
        line = ax.plot([r.size for r in rows], [r.median for r in rows], marker="o",
                       label=f"{mode} p50")[0]  # fmt: skip
        if mode in p99:
            _line(ax, p99[mode], f"{mode} p99", linestyle="--", color=line.get_color(),
                  alpha=0.6)  # fmt: skip
    _finish(ax, "TCP connect to a ClusterIP (new connections)", "µs")
    fig.tight_layout()
    fig.savefig(out / "connect_latency.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, style, points in ruleset_lines(records):
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                     linestyle=style)  # fmt: skip
    _finish(axes[0], "Rules, set/map elements, IPVS servers", "count")
    for mode, rows in _series(records, "ruleset_bytes").items():
        axes[1].plot([r.size for r in rows], [r.median / 2**20 for r in rows], marker="o",
                     label=mode)  # fmt: skip
    _finish(axes[1], "Rendered ruleset", "MiB")
    fig.tight_layout()
    fig.savefig(out / "ruleset_size.png", dpi=110)
    plt.close(fig)
    return list(PLOTS)


# --- report.md --------------------------------------------------------------------------------

FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "update_latency.png",
        "Update latency",
        "From just before the fake API server makes the change to the first TCP probe from the "
        "client namespace that sees it take effect (a connection to the ClusterIP answered "
        "once an endpoint or Service is added, refused once it is removed), through the real "
        "controller (`minikproxy run`, `--min-sync-period 0`) watching the API server with "
        "the `kubernetes` client. It includes the watch delivery, the controller's sync "
        "(snapshot, incremental compile, the kernel write) and the probe's own resolution, "
        "about a millisecond: a probe (a non-blocking connect from a new source port) "
        "starts every millisecond without waiting for the ones before it, and the time "
        "taken is the send time of the earliest probe that saw the change. This holds for "
        "all four kinds, also where the state before or after drops packets (nftables mode "
        "drops traffic to unallocated ClusterIPs: its Service added and deleted): a dropped "
        "probe only takes up to its 10 ms timeout longer to count as unanswered, which "
        "delays the end of the measurement, not the time it reports. Solid "
        "lines are medians, dashed p95. Where a line is "
        "missing, the controller could not run that mode (see Skipped).",
    ),
    (
        "load_time.png",
        "First full sync",
        "A full compile and the mode's full apply into a new, empty namespace, run by the "
        "controller's own mode code as its first sync runs them. Dashed: the share spent in "
        "the kernel tools and the kernel (the wall time of `iptables-restore`/`iptables-save` "
        "processes, or of the libnftables transaction); the rest is our process (compile, "
        "render, bookkeeping). The API list and the model's first snapshot are not included. "
        'The table\'s "kernel table" column is the rule blob the legacy x_tables backend '
        "reports for its tables (`IPT_SO_GET_INFO`; per-CPU rule counters come on top); "
        "nf_tables reports no such figure, so it is left empty there.",
    ),
    (
        "connect_latency.png",
        "Data path: connect latency",
        "New TCP connections, one after another, from the client namespace to the ClusterIP "
        "of a Service whose endpoints answer in the backend namespace, through the node "
        "namespace holding the mode's rules for the whole cluster (the answering Service "
        "sorts last, so iptables walks every other Service's KUBE-SERVICES rule first). "
        "The time is `connect()`'s: SYN to SYN-ACK, including DNAT and conntrack; each "
        "connection is reset at once. Solid: median, dashed: p99. The table's new "
        "connections per second come from one client opening connections back to back for "
        "a second per round; one not answered within a second counts as an attempt only "
        "(results.json: `connections_unanswered`).",
    ),
    (
        "ruleset_size.png",
        "Ruleset size",
        "Counted in the rendered text a first sync loads (IPv4): rules and chains, sets and "
        "maps with their elements, and bytes. iptables puts every Service in rules and "
        "chains; nftables' flat layout puts them in set and map elements. IPVS puts them in "
        "neither: its per-Service kernel objects are IPVS virtual servers (one per Service "
        "port on each of its addresses: ClusterIP, the node's for a NodePort, load-balancer "
        "IP) and real servers (one per endpoint of each), drawn as one line (dash-dot, "
        "virtual + real) and counted in the table's rules cell next to its few dozen "
        "iptables rules; its elements are ipset "
        "entries, and its bytes the whole rendered state (ipvsadm, ipset, iptables and "
        "kube-ipvs0 address lines).",
    ),
)


def report_markdown(
    header: dict[str, Any],
    records: Sequence[Record],
    skipped: Sequence[Skipped],
    plots: Sequence[str],
) -> str:
    """The whole report.md."""
    machine = header["machine"]
    settings = header["settings"]
    out = [
        "# minikproxy bench: proxy modes compared",
        "",
        f"Run started {header['date']} with minikproxy {header['minikproxy_version']}: "
        f"{machine['cores']} cores ({machine['cpu_model']}), {machine['memory_mib']} MiB, "
        f"kernel {machine['kernel']}, {machine['iptables']}, {machine['nft']}; load average "
        f"{', '.join(str(x) for x in machine['load_average'])} at the start.",
        "",
        f"Clusters: {', '.join(str(s) for s in settings['sizes'])} Services, "
        f"{settings['endpoints']} endpoints each (a kube-proxy-shaped mix: 85% ClusterIP, "
        "10% NodePort, 5% LoadBalancer), IPv4, in real network namespaces.",
        "",
        "**Read these numbers with care.** The machine may be shared and noisy: compare the "
        "modes within this one run only, never with another run's or another machine's "
        "numbers. Each figure says below what it includes. Nothing is extrapolated: a size "
        "or mode without a number was not measured.",
        "",
        "## Results",
        "",
        "Medians (and p95 where shown) of the rounds in `results.json`.",
        "",
        markdown_table(records),
    ]
    strategies = strategies_table(records)
    if strategies:
        out += [
            "## iptables apply strategies (legacy backend)",
            "",
            "The same complete ruleset loaded into an empty namespace by one "
            "`iptables-legacy-restore` process and by python-iptables (libiptc bindings: one "
            "Python object per rule and match, one commit per table; its process start-up "
            "not included). This is why minikproxy, like kube-proxy, writes rules with "
            "`iptables-restore`.",
            "",
            strategies,
        ]
    out += ipvs_section(header, records)
    for name, title, text in FIGURES:
        if name in plots:
            out += [f"## {title}", "", f"![{title}]({name})", "", text, ""]
    if skipped:
        out += ["## Skipped", ""]
        out += [f"- **{s.mode}**, {s.what}: {s.reason}" for s in skipped]
        out.append("")
    return "\n".join(out)


IPVS_VM_TITLE = "IPVS (in an emulated VM; compare only with its own baseline)"


def _vm_sentence(vm: dict[str, Any]) -> str:
    machine, settings = vm.get("machine", {}), vm.get("settings", {})
    sizes = ", ".join(str(x) for x in settings.get("sizes", []))
    minutes = float(vm.get("seconds", 0)) / 60
    return (
        f"This machine's kernel has no IPVS, so these rows were measured inside the IPVS VM "
        f"(`scripts/ipvs-vm.sh`: Debian's kernel {machine.get('kernel', '?')} under qemu "
        f"without KVM, {machine.get('cores', '?')} vCPU, {machine.get('memory_mib', '?')} "
        f"MiB; started {vm.get('date', '?')}) at {sizes} Services "
        f"(`--ipvs-vm-sizes`), {settings.get('update_rounds', '?')} update rounds of each "
        f"kind, {settings.get('load_rounds', '?')} loads, {settings.get('connections', '?')} "
        f"connections; the VM's part took {minutes:.1f} min. Emulation runs Python and "
        "every tool 10-50x slower than this machine does, so compare these rows only with "
        "each other: IPVS's first load with the stock tools' load of the same state in the "
        "same kernel, its data path with iptables mode's measured in the same VM "
        "(`iptables (VM)`), never with the table above. Larger VM sizes take "
        "proportionally longer (see README)."
    )


def ipvs_section(header: dict[str, Any], records: Sequence[Record]) -> list[str]:
    """report.md's IPVS section ([] when IPVS was not measured)."""
    ruleset, kernel = ipvs_ruleset_table(records), ipvs_table(records)
    if not ruleset and not kernel:
        return []
    vm = header.get("ipvs_vm")
    out = [f"## {IPVS_VM_TITLE if vm else 'IPVS'}", ""]
    if ruleset:
        out += [
            "IPVS's compile is pure and was measured here, natively, like every mode's (its "
            "full and one-change compile times are in the table above; the one-change "
            "figure includes the change's ipset/ipvsadm/address lines, standing for the "
            "netlink operations a partial sync makes). What one plan holds:",
            "",
            ruleset,
        ]
    if kernel:
        if vm:
            out += [_vm_sentence(vm), ""]
        out += [
            "First load: a full compile and the mode's own full apply into a new, empty "
            "namespace (its bulk path: `ipvsadm -R`, `ipset restore`, `ip -batch` for the "
            "additions, netlink for the rest, `iptables-restore`, then the jump rules one "
            "`iptables` call each); tools+kernel is the wall time of those processes and "
            "netlink calls. The stock tools' load is `ip link add kube-ipvs0`, `ipset "
            "restore`, `ipvsadm -R`, `ip -batch` and `iptables-restore --noflush` of the "
            "same rendered state into another empty namespace, nothing else (no compile, "
            "no read-back): the ratio is what our apply costs over loading the text by hand. "
            "Update latency and the data path are measured as for the "
            "other modes (see below), through IPVS's hash lookup.",
            "",
            kernel,
        ]
    return out
