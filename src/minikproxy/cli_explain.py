"""``minikproxy explain`` and ``minikproxy diff``: flags and output. Wiring only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from minikproxy.config import NFTABLES_LAYOUTS, ConfigError, ProxyConfig
from minikproxy.explain.packet import ORIGINS, PROTOS
from minikproxy.flags import add_node_flags, config_from_args
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.nodeopts import split_list

EXIT_USAGE = 2


def add_subcommands(sub: Any) -> None:
    """Register ``explain`` and ``diff`` on the top-level subparsers."""
    explain = sub.add_parser(
        "explain",
        help="say what the compiled rules do to one packet, and why",
        description="Compile Services and EndpointSlices (manifests, or a live cluster read "
        "once) for this node in the selected mode, then follow one packet through the rules: "
        "the verdict, the endpoints with their shares, masquerading, affinity, the Kubernetes "
        "reasons and the path rule by rule.",
    )
    _add_inputs(explain, required=False)
    explain.add_argument("--kubeconfig", default=None, help="read a live cluster (without -f)")
    explain.add_argument("--src", required=True, metavar="IP", help="the packet's source")
    explain.add_argument("--from", dest="origin", choices=ORIGINS, default="external")
    explain.add_argument("--dst", required=True, metavar="IP")
    explain.add_argument("--dport", required=True, type=int, metavar="PORT")
    explain.add_argument("--proto", choices=PROTOS, default="tcp")
    explain.add_argument(
        "--in-interface",
        default="",
        metavar="NAME",
        help="the interface the packet arrives by (for interface-based local detection)",
    )
    explain.add_argument("--json", action="store_true", help="one JSON object")

    diff = sub.add_parser(
        "diff",
        help="what changes for each service port between two snapshots, or two proxy modes",
        description="Explain every kind of traffic (from a pod, the node, outside; to each "
        "ClusterIP, NodePort, external and load-balancer IP) with the rules of both sides and "
        "list what differs: verdict, endpoints and weights, masquerading, affinity, "
        "reachability.",
    )
    _add_inputs(diff, required=True)
    diff.add_argument(
        "--against", action="append", default=[], metavar="PATH",
        help="the new snapshot (default: the same files, for --to-proxy-mode)",
    )  # fmt: skip
    diff.add_argument("--to-proxy-mode", choices=("iptables", "nftables", "ipvs"), default=None)
    diff.add_argument(
        "--to-nftables-layout", choices=NFTABLES_LAYOUTS, default=None, metavar="LAYOUT"
    )
    diff.add_argument(
        "--against-live",
        action="store_true",
        help="compare with the rules in this node's kernel (iptables-save, nft list table, or "
        "for ipvs: ipset save, ipvsadm -S -n, kube-ipvs0's addresses and iptables-save)",
    )
    diff.add_argument("--ip-family", choices=(IPV4, IPV6), default=None)
    diff.add_argument("--json", action="store_true", help="one JSON object")
    diff.add_argument("--exit-code", action="store_true", help="exit 1 when something differs")


def _add_inputs(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "-f", "--filename", dest="files", action="append", required=required, default=[],
        metavar="PATH", help="a file, a directory or - for stdin; repeatable",
    )  # fmt: skip
    add_node_flags(parser)
    parser.add_argument("--node-addresses", default=None, help="the node's addresses")
    parser.add_argument("--nftables-layout", choices=NFTABLES_LAYOUTS, default=None)


def dispatch(args: argparse.Namespace) -> int:
    """Run ``explain`` or ``diff``."""
    from minikproxy.dataplane.execer import ExecError
    from minikproxy.dataplane.iptables import BackendDetectionError
    from minikproxy.explain.engine import ExplainError
    from minikproxy.sources.kubeclient import KubeConfigError
    from minikproxy.sources.manifests import ManifestError

    try:
        config = config_from_args(args)
        if args.command == "explain":
            return _explain(args, config)
        return _diff(args, config)
    except BrokenPipeError:  # the reader (| head) went away: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0
    except (
        ManifestError,
        ConfigError,
        ExplainError,
        KubeConfigError,
        ValueError,
        ExecError,
        BackendDetectionError,
        FileNotFoundError,
    ) as err:
        print(f"minikproxy {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE


def _objects(files: Sequence[str], kubeconfig: str | None, config: ProxyConfig) -> list[Any]:
    from minikproxy.sources.manifests import load_manifests

    if files:
        notes: list[str] = []
        objects = load_manifests(files, notes)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return objects
    from minikproxy.explain.live import list_cluster

    return list_cluster(kubeconfig or config.kubeconfig or None, config.hostname_override)


def _explain(args: argparse.Namespace, config: ProxyConfig) -> int:
    from minikproxy.explain.driver import build_view, explain_packet, track
    from minikproxy.explain.packet import make_packet

    packet = make_packet(args.src, args.dst, args.dport, args.proto, args.origin, args.in_interface)
    objects = _objects(args.files, args.kubeconfig, config)
    tracker, problems = track(objects, config)
    for problem in problems:
        print(f"warning: {problem} (skipped)", file=sys.stderr)
    view = build_view(
        tracker, config, packet.family, node_addresses=split_list(args.node_addresses or "")
    )
    result = explain_packet(view, packet)
    if args.json:
        json.dump(result.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.writelines(f"{line}\n" for line in result.lines())
    return 0


def _diff(args: argparse.Namespace, config: ProxyConfig) -> int:
    from minikproxy.explain.diff import diff_views, mode_notes
    from minikproxy.explain.driver import Feed, build_view, mode_name, with_mode

    old_config = config
    new_config = config
    if args.to_proxy_mode or args.to_nftables_layout:
        target = args.to_proxy_mode or config.mode
        if target == "nftables" and args.to_nftables_layout == "kube-proxy":
            target = "nftables/kube-proxy"
        new_config = with_mode(config, target)
    if not (args.against or args.to_proxy_mode or args.to_nftables_layout or args.against_live):
        raise ConfigError(
            "nothing to compare with: give --against, --to-proxy-mode or --against-live"
        )
    if args.against_live and (args.against or args.to_proxy_mode):
        raise ConfigError("--against-live compares with the kernel: no --against/--to-proxy-mode")
    node_addresses = split_list(args.node_addresses or "")
    old_objects = _objects(args.files, None, config)
    fed = Feed(old_objects, config)
    families: tuple[IPFamily, ...] = (args.ip_family,) if args.ip_family else (IPV4, IPV6)
    old_snaps = {family: fed.tracker.snapshot(family) for family in families}
    new_snaps = old_snaps
    if args.against:
        fed.replace(old_objects, _objects(args.against, None, config))
        new_snaps = {family: fed.tracker.snapshot(family) for family in families}
    for problem in fed.problems:
        print(f"warning: {problem} (skipped)", file=sys.stderr)
    old_mode, new_mode = mode_name(old_config), mode_name(new_config)
    notes = list(mode_notes(old_mode, new_mode))
    changes = []
    for family in families:
        old = build_view(
            fed.tracker, old_config, family, node_addresses=node_addresses,
            snapshot=old_snaps[family],
        )  # fmt: skip
        if args.against_live:
            from minikproxy.explain.live import live_view

            new = live_view(old)
        else:
            new = build_view(
                fed.tracker, new_config, family, node_addresses=node_addresses,
                snapshot=new_snaps[family], previous=old if args.against else None,
            )  # fmt: skip
        changes.extend(diff_views(old, new))
    new_label = "live kernel" if args.against_live else new_mode
    if args.json:
        out = {
            "old_mode": old_mode,
            "new_mode": new_label,
            "mode_differences": notes,
            "changes": [c.as_json() for c in changes],
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        head = old_mode if old_mode == new_label else f"{old_mode} -> {new_label}"
        print(f"# {head}: {len(changes)} change(s)")
        for note in notes:
            print(f"known mode difference: {note}")
        for change in changes:
            p = change.probe.packet
            print(
                f"{change.probe.port} ({change.probe.port.protocol}) {change.probe.frontend} "
                f"{p.dst}:{p.dport} from {p.origin} {p.src}: {'; '.join(change.what)}"
            )
            print(f"    old: {change.old.describe()}")
            print(f"    new: {change.new.describe()}")
            if change.known:
                print(f"    known mode difference: {change.known}")
    return 1 if args.exit_code and changes else 0
