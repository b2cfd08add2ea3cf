"""Command line: kube-proxy-like flags and subcommands. Wiring only."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from minikproxy import __version__, cli_bench, cli_explain, cli_run
from minikproxy.config import NFTABLES_LAYOUTS, ConfigError
from minikproxy.flags import add_node_flags, config_from_args, service_name
from minikproxy.gcutil import gc_paused
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.nodeopts import config_warnings, split_list

__all__ = ["EXIT_USAGE", "build_parser", "config_from_args", "main"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The ``minikproxy`` argument parser (also used to check the DaemonSet's args)."""
    parser = argparse.ArgumentParser(
        prog="minikproxy", description="A Python implementation of kube-proxy."
    )
    parser.add_argument("--version", action="version", version=f"minikproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser(
        "render",
        help="print the rules the proxy would install, from manifests (dry-run)",
        description="Compile Services, EndpointSlices, Endpoints and a Node from manifest "
        "files into the iptables-restore input the proxy would install on that node.",
    )
    render.add_argument(
        "-f", "--filename", dest="files", action="append", required=True, metavar="PATH",
        help="a file, a directory (its .yaml/.yml/.json files) or - for stdin; repeatable",
    )  # fmt: skip
    add_node_flags(render)
    render.add_argument(
        "--node-addresses", default=None, help="the node's addresses, for --nodeport-addresses"
    )
    render.add_argument("--ip-family", choices=(IPV4, IPV6), default=None)
    render.add_argument(
        "--nftables-layout",
        choices=NFTABLES_LAYOUTS,
        default=None,
        help="nftables mode: minikproxy's flat table (default) or kube-proxy's own layout",
    )
    render.add_argument(
        "--service", action="append", type=service_name, default=[], metavar="NS/NAME",
        help="print only the chains and rules of these Services (for reading, not loading)",
    )  # fmt: skip
    render.add_argument(
        "--strict", action="store_true", help="exit 2 if any object is invalid, printing nothing"
    )

    cli_run.add_subcommands(sub)
    cli_explain.add_subcommands(sub)
    cli_bench.add_subcommand(sub)
    return parser


def _render(args: argparse.Namespace) -> int:
    from minikproxy.render import render_objects
    from minikproxy.sources.manifests import ManifestError, load_manifests

    notes: list[str] = []
    try:
        config = config_from_args(args)
        objects = load_manifests(args.files, notes)
        families: tuple[IPFamily, ...] = (args.ip_family,) if args.ip_family else (IPV4, IPV6)
        result = render_objects(
            objects,
            config,
            families=families,
            node_addresses=split_list(args.node_addresses or ""),
            services=args.service,
        )
    except (ManifestError, ConfigError) as err:
        print(f"minikproxy render: {err}", file=sys.stderr)
        return EXIT_USAGE
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    for note in result.notes:
        print(f"warning: {note}", file=sys.stderr)
    for problem in result.problems:
        print(f"warning: {problem} (skipped)", file=sys.stderr)
    if args.strict and result.problems:
        print(
            f"minikproxy render: {len(result.problems)} invalid object(s) with --strict",
            file=sys.stderr,
        )
        return EXIT_USAGE
    out = sys.stdout
    if args.ip_family:
        out.writelines(result.parts[args.ip_family])
    else:
        for family in families:
            out.write(f"# {family}\n")
            out.writelines(result.parts[family])
    out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``minikproxy`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "render":
        # A one-shot run building ~10^6 acyclic objects: collections would only rescan them.
        with gc_paused():
            return _render(args)
    if args.command == "bench":
        return cli_bench.main_bench(args)
    if args.command in ("explain", "diff"):
        with gc_paused():
            code = cli_explain.dispatch(args)
            # One-shot: spare the interpreter's final collection of ~10^6 objects at exit.
            gc.freeze()
            return code
    return cli_run.dispatch(args)
