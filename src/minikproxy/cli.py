"""Command line: kube-proxy-like flags and subcommands. Wiring only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from minikproxy import __version__
from minikproxy.config import (
    HEALTHZ_PORT,
    METRICS_PORT,
    NFTABLES_LAYOUTS,
    PROXY_MODES,
    ConfigError,
    ProxyConfig,
    append_port_if_needed,
    load_config,
    parse_duration,
    validate_config,
)
from minikproxy.gcutil import gc_paused
from minikproxy.model.names import IPV4, IPV6, IPFamily, NamespacedName
from minikproxy.model.parse import canonical_cidr
from minikproxy.nodeopts import split_list

EXIT_USAGE = 2


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "t"):
        return True
    if lowered in ("false", "0", "no", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _cidr_list(text: str) -> tuple[str, ...]:
    cidrs = split_list(text)
    if not cidrs or len(cidrs) > 2:
        raise argparse.ArgumentTypeError(f"expected one CIDR or two (IPv4,IPv6), got {text!r}")
    families = []
    for cidr in cidrs:
        parsed = canonical_cidr(cidr)
        if parsed is None:
            raise argparse.ArgumentTypeError(f"invalid CIDR {cidr!r}")
        families.append(parsed[1])
    if len(set(families)) != len(families):
        raise argparse.ArgumentTypeError(f"two CIDRs must be of different families: {text!r}")
    return cidrs


def _service_name(text: str) -> NamespacedName:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, got {text!r}")
    return NamespacedName(namespace, name)


def add_node_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``render`` and ``run``: node identity, masquerading, NodePorts."""
    parser.add_argument("--config", help="a KubeProxyConfiguration (v1alpha1) file; flags win")
    parser.add_argument("--proxy-mode", choices=PROXY_MODES, default=None)
    parser.add_argument("--hostname-override", default=None, help="this node's name")
    parser.add_argument(
        "--node-ip", default=None, help="the node's primary IP(s), comma-separated (per family)"
    )
    parser.add_argument("--cluster-cidr", default=None, help="pod CIDR(s), comma-separated")
    parser.add_argument(
        "--detect-local-mode",
        choices=("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"),
        default=None,
    )
    parser.add_argument("--pod-bridge-interface", default=None)
    parser.add_argument("--pod-interface-name-prefix", default=None)
    parser.add_argument(
        "--masquerade-all", nargs="?", const=True, type=_bool, default=None, metavar="BOOL"
    )
    parser.add_argument("--iptables-masquerade-bit", type=int, default=None, metavar="BIT")
    parser.add_argument(
        "--nodeport-addresses", default=None, help="CIDRs (comma-separated) or 'primary'"
    )
    parser.add_argument(
        "--iptables-localhost-nodeports", type=_bool, default=None, metavar="true|false"
    )
    parser.add_argument(
        "--service-cidr",
        type=_cidr_list,
        default=None,
        metavar="CIDR[,CIDR]",
        help="the cluster's service CIDR(s), for nftables mode's checks of unallocated IPs",
    )


_FLAGS = {
    "mode": "--proxy-mode",
    "hostname_override": "--hostname-override",
    "cluster_cidr": "--cluster-cidr",
    "detect_local_mode": "--detect-local-mode",
    "bridge_interface": "--pod-bridge-interface",
    "interface_name_prefix": "--pod-interface-name-prefix",
    "masquerade_all": "--masquerade-all",
    "masquerade_bit": "--iptables-masquerade-bit",
    "localhost_nodeports": "--iptables-localhost-nodeports",
    "service_cidrs": "--service-cidr",
    "nftables_layout": "--nftables-layout",
    "node_ips": "--node-ip",
    "nodeport_addresses": "--nodeport-addresses",
    "min_sync_period": "--min-sync-period",
    "sync_period": "--sync-period",
    "kubeconfig": "--kubeconfig",
    "healthz_bind_address": "--healthz-bind-address",
    "metrics_bind_address": "--metrics-bind-address",
}


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """The config file (if any) with the explicitly given flags applied on top, validated as
    kube-proxy validates its configuration (errors name the flag or the file and field)."""
    config = load_config(args.config) if args.config else ProxyConfig()
    overrides: dict[str, Any] = {
        "mode": args.proxy_mode,
        "hostname_override": args.hostname_override,
        "cluster_cidr": args.cluster_cidr,
        "detect_local_mode": args.detect_local_mode,
        "bridge_interface": args.pod_bridge_interface,
        "interface_name_prefix": args.pod_interface_name_prefix,
        "masquerade_all": args.masquerade_all,
        "masquerade_bit": args.iptables_masquerade_bit,
        "localhost_nodeports": args.iptables_localhost_nodeports,
        "service_cidrs": args.service_cidr,
        "nftables_layout": getattr(args, "nftables_layout", None),
    }
    if args.node_ip is not None:
        overrides["node_ips"] = split_list(args.node_ip)
    if args.nodeport_addresses is not None:
        overrides["nodeport_addresses"] = split_list(args.nodeport_addresses)
    for name in ("min_sync_period", "sync_period", "kubeconfig"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    for name, port in (
        ("healthz_bind_address", HEALTHZ_PORT),
        ("metrics_bind_address", METRICS_PORT),
    ):
        value = getattr(args, name, None)
        if value is not None:  # "" disables the server
            overrides[name] = append_port_if_needed(value, port) if value else ""
    given = {name for name, value in overrides.items() if value is not None}
    config = config.with_overrides(**overrides)
    config = replace(config, origins={**config.origins, **{n: _FLAGS[n] for n in given}})
    validate_config(config)
    return config


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
        "--service", action="append", type=_service_name, default=[], metavar="NS/NAME",
        help="print only the chains and rules of these Services (for reading, not loading)",
    )  # fmt: skip
    render.add_argument(
        "--strict", action="store_true", help="exit 2 if any object is invalid, printing nothing"
    )

    from minikproxy import cli_explain, cli_run  # each subcommand's flags live with it

    cli_run.add_subcommands(sub, add_node_flags, _duration)
    cli_explain.add_subcommands(sub, add_node_flags)
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
    if config.mode == "nftables" and args.iptables_localhost_nodeports:
        print(
            "warning: localhost NodePorts are not supported in nftables mode (as in "
            "kube-proxy); --iptables-localhost-nodeports is ignored",
            file=sys.stderr,
        )
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
    if args.command in ("explain", "diff"):
        from minikproxy import cli_explain

        with gc_paused():
            return cli_explain.dispatch(args, config_from_args)
    from minikproxy import cli_run

    return cli_run.dispatch(args)
