"""``minikproxy bench``: the proxy-mode trade-off benchmark (see :mod:`minikproxy.benchmark`).
Wiring only: flags, progress display, output files."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minikproxy.benchmark import ALL_MODES, DEFAULT_SIZES
from minikproxy.benchmark.cluster import MAX_ENDPOINTS

if TYPE_CHECKING:
    from minikproxy.benchmark.runner import Settings

EXIT_INTERRUPTED = 130


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in ALL_MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or text!r}; choose from {', '.join(ALL_MODES)}"
        )
    return modes


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Service counts like 1000,5000: {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _endpoints(text: str) -> int:
    value = _positive(text)
    if value > MAX_ENDPOINTS:
        # The answering Services' endpoints are addresses of one /24 in the backend namespace.
        raise argparse.ArgumentTypeError(
            f"at most {MAX_ENDPOINTS} (the backend namespace's /24 holds the answering "
            f"endpoints), got {value}"
        )
    return value


def add_subcommand(sub: Any) -> None:
    """Register ``bench`` on the top-level subparsers."""
    bench = sub.add_parser(
        "bench",
        help="compare the proxy modes on synthetic clusters in network namespaces (root)",
        description="Measure every proxy mode at every cluster size in real network "
        "namespaces: compile, first load, update latency through the real controller, "
        "connect latency and rate, memory; print a Markdown table, and with --out write "
        "results.json, report.md and PNG plots. Needs root and minikproxy[bench].",
    )
    bench.add_argument("--modes", type=_modes, default=ALL_MODES, metavar="MODE[,MODE...]",
                       help=f"default: {','.join(ALL_MODES)}")  # fmt: skip
    bench.add_argument("--sizes", type=_sizes, default=None, metavar="N[,N...]",
                       help="Services per cluster (default: 1000,5000,10000)")  # fmt: skip
    bench.add_argument(
        "--endpoints",
        type=_endpoints,
        default=10,
        metavar="N",
        help=f"endpoints per Service (default 10, at most {MAX_ENDPOINTS})",
    )
    bench.add_argument("--rounds", type=_positive, default=None, metavar="N",
                       help="rounds of each update kind and of each compile (default 20; "
                       "--quick: 5)")  # fmt: skip
    bench.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="write results.json, report.md and the plots here")  # fmt: skip
    bench.add_argument("--quick", action="store_true",
                       help="1000 Services only, few rounds (under 3 minutes)")  # fmt: skip
    bench.add_argument("--netns-prefix", default=None, metavar="PREFIX",
                       help="name the run's network namespaces PREFIX-... "
                       "(default: mkpb and random hex)")  # fmt: skip
    bench.add_argument("--ipvs-vm-sizes", type=_sizes, default=None, metavar="N[,N...]",
                       help="where this kernel has no IPVS, the sizes IPVS's kernel parts run "
                       "at in the emulated IPVS VM (default: 1000)")  # fmt: skip
    # Internal: this process is the IPVS VM's part of a run (settings in, results out, in DIR).
    bench.add_argument("--ipvs-vm-part", type=Path, default=None, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings` from the flags."""
    from minikproxy.benchmark.runner import Settings

    overrides: dict[str, Any] = {"modes": args.modes, "endpoints": args.endpoints}
    if args.sizes is not None:
        overrides["sizes"] = args.sizes
    if args.ipvs_vm_sizes is not None:
        overrides["vm_sizes"] = args.ipvs_vm_sizes
    if args.netns_prefix:
        overrides["prefix"] = args.netns_prefix
    if args.rounds is not None:
        rounds = args.rounds
        overrides.update(rounds=rounds, update_rounds=rounds,
                         rate_rounds=min(rounds, 5), load_rounds=min(rounds, 3))  # fmt: skip
    if args.quick:
        return Settings.quick(**overrides)
    if args.rounds is None:
        overrides.update(rounds=20, update_rounds=20)
    overrides.setdefault("sizes", DEFAULT_SIZES)
    return Settings(**overrides)


@contextmanager
def progress_display(
    total: float, *, plain: bool = False
) -> Iterator[Callable[[str, float], None]]:
    """A ``show(description, advance)`` callback: a rich progress bar with the time left on
    a terminal, plain lines on stderr otherwise (or when ``plain``)."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
    except ImportError:
        Console = None  # type: ignore[assignment,misc]
    if Console is not None and sys.stderr.isatty() and not plain:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True),
        ) as bar:  # fmt: skip
            task = bar.add_task("starting", total=total)
            yield lambda text, advance: bar.update(task, description=text, advance=advance)
        return
    start = time.monotonic()
    done = [0.0]

    def show(text: str, advance: float) -> None:
        done[0] += advance
        elapsed = time.monotonic() - start
        left = elapsed / done[0] * (total - done[0]) if done[0] else None
        eta = "" if left is None else f", ~{left:.0f} s left"
        share = f", {100 * min(done[0] / total, 1.0):.1f}% done" if total else ""
        print(f"[{elapsed:5.0f} s{eta}{share}] {text}", file=sys.stderr, flush=True)

    yield show


def main_bench(args: argparse.Namespace) -> int:
    """``minikproxy bench``."""
    from minikproxy.benchmark import report
    from minikproxy.benchmark.ipvsvm import is_vm
    from minikproxy.benchmark.results import machine_info, make_header, now_utc, write_results
    from minikproxy.benchmark.runner import plan_weight, run_benchmark
    from minikproxy.benchmark.shield import interruptible

    if os.geteuid() != 0:
        print("minikproxy bench needs root (network namespaces, iptables, nftables)",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.ipvs_vm_part is not None:
        return vm_part_main(args.ipvs_vm_part)
    settings = settings_from_args(args)
    machine, started = machine_info(), now_utc()  # the load average before the run
    # SIGTERM is cleaned up like Ctrl-C; a second one while the run cleans up is ignored.
    try:
        with interruptible(), progress_display(plan_weight(settings)) as show:
            outcome = run_benchmark(settings, show)
    except KeyboardInterrupt:
        print("minikproxy bench: interrupted; its network namespaces were deleted",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    print(report.markdown_table(outcome.records))
    strategies = report.strategies_table(outcome.records)
    if strategies:
        print(strategies)
    ipvs = report.ipvs_table(outcome.records)
    if ipvs:
        vm = any(is_vm(r.mode) for r in outcome.records)
        print(f"{report.IPVS_VM_TITLE if vm else 'IPVS'}:\n\n{ipvs}")
    for skipped in outcome.skipped:
        print(f"- skipped: {skipped.mode}, {skipped.what}: {skipped.reason}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        plots: list[str] = []
        try:
            plots = report.write_plots(outcome.records, args.out)
        except ImportError as exc:
            print(f"no plots: {exc} (install minikproxy[bench])", file=sys.stderr)
        header = make_header(
            settings_as_json(settings), outcome.skipped, machine=machine, date=started
        )
        header.update(outcome.header)
        write_results(args.out / "results.json", header, outcome.records)
        text = report.report_markdown(header, outcome.records, outcome.skipped, plots)
        (args.out / "report.md").write_text(text)
        print(f"\nwrote {args.out}/results.json, report.md and {len(plots)} plots",
              file=sys.stderr)  # fmt: skip
    return 0


def vm_part_main(directory: Path) -> int:
    """Inside the IPVS VM: run the part the host asked for, write its results.json."""
    from minikproxy.benchmark.ipvsvm import read_vm_settings, write_vm_results
    from minikproxy.benchmark.results import machine_info, make_header, now_utc
    from minikproxy.benchmark.runner import plan_weight, run_benchmark

    settings = settings_from_json(read_vm_settings(directory))
    machine, started = machine_info(), now_utc()
    # Plain lines: the host shows them in its own progress display.
    with progress_display(plan_weight(settings), plain=True) as show:
        outcome = run_benchmark(settings, show)
    header = make_header(settings_as_json(settings), outcome.skipped, machine=machine,
                         date=started)  # fmt: skip
    write_vm_results(directory, header, outcome.records)
    return 0


def settings_from_json(body: dict[str, Any]) -> Settings:
    """:class:`Settings` from :func:`settings_as_json`'s form (lists back to tuples)."""
    from minikproxy.benchmark.runner import Settings

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in body.items()}
    return Settings(**fields)


def settings_as_json(settings: Settings) -> dict[str, Any]:
    """The settings for the results header (everything but the namespace prefix)."""
    from dataclasses import asdict

    body = asdict(settings)
    body.pop("prefix")
    return body
