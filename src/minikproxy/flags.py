"""The flags ``render``, ``run`` and the other subcommands share, and the configuration they
make: kube-proxy's flag names on top of a KubeProxyConfiguration file."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from minikproxy.config import (
    HEALTHZ_PORT,
    METRICS_PORT,
    PROXY_MODES,
    ProxyConfig,
    append_port_if_needed,
    load_config,
    parse_duration,
    validate_config,
)
from minikproxy.model.names import NamespacedName
from minikproxy.model.parse import strict_cidr
from minikproxy.nodeopts import split_list


def parse_bool(text: str) -> bool:
    """An argparse type: true/false (also 1/0, yes/no, t/f)."""
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "t"):
        return True
    if lowered in ("false", "0", "no", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def duration(text: str) -> float:
    """An argparse type: a Go duration (``1s``, ``500ms``, ``1h2m``) in seconds."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cidr_list(text: str) -> tuple[str, ...]:
    """An argparse type: one CIDR, or two of different families (comma-separated), validated
    as kube-proxy validates its CIDR lists (``address/prefix-length``, as Go's
    ``net.ParseCIDR`` reads it)."""
    cidrs = split_list(text)
    if not cidrs or len(cidrs) > 2:
        raise argparse.ArgumentTypeError(
            f"expected one CIDR or two (IPv4,IPv6), got {text!r} (only two CIDRs are allowed)"
        )
    families = []
    for cidr in cidrs:
        parsed = strict_cidr(cidr)
        if parsed is None:
            raise argparse.ArgumentTypeError(
                f"invalid CIDR {cidr!r}: must be a valid CIDR block (e.g. 10.100.0.0/16 or "
                "fde4:8dba:82e1::/48)"
            )
        families.append(parsed[1])
    if len(set(families)) != len(families):
        raise argparse.ArgumentTypeError(
            f"two CIDRs must be of different families: {text!r} (must be a valid DualStack "
            "CIDR, e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)"
        )
    return cidrs


def service_name(text: str) -> NamespacedName:
    """An argparse type: ``NAMESPACE/NAME``."""
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, got {text!r}")
    return NamespacedName(namespace, name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


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
        "--masquerade-all", nargs="?", const=True, type=parse_bool, default=None, metavar="BOOL"
    )
    parser.add_argument("--iptables-masquerade-bit", type=int, default=None, metavar="BIT")
    parser.add_argument(
        "--nodeport-addresses", default=None, help="CIDRs (comma-separated) or 'primary'"
    )
    parser.add_argument(
        "--iptables-localhost-nodeports", type=parse_bool, default=None, metavar="true|false"
    )
    parser.add_argument(
        "--ipvs-scheduler", default=None, metavar="NAME",
        help="ipvs mode: the IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh)",
    )  # fmt: skip
    parser.add_argument(
        "--ipvs-exclude-cidrs", default=None, metavar="CIDR[,CIDR...]",
        help="ipvs mode: virtual servers in these CIDRs are left alone by cleanup",
    )  # fmt: skip
    parser.add_argument("--ipvs-strict-arp", type=parse_bool, default=None, metavar="true|false")
    parser.add_argument("--ipvs-sync-period", type=duration, default=None, metavar="DURATION")
    parser.add_argument("--ipvs-min-sync-period", type=duration, default=None, metavar="DURATION")
    parser.add_argument("--ipvs-tcp-timeout", type=duration, default=None, metavar="DURATION")
    parser.add_argument("--ipvs-tcpfin-timeout", type=duration, default=None, metavar="DURATION")
    parser.add_argument("--ipvs-udp-timeout", type=duration, default=None, metavar="DURATION")
    parser.add_argument(
        "--service-cidr",
        type=cidr_list,
        default=None,
        metavar="CIDR[,CIDR]",
        help="the cluster's service CIDR(s), for nftables mode's checks of unallocated IPs "
        "(run: instead of the API's ServiceCIDR objects)",
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
    "ipvs_scheduler": "--ipvs-scheduler",
    "ipvs_exclude_cidrs": "--ipvs-exclude-cidrs",
    "ipvs_strict_arp": "--ipvs-strict-arp",
    "ipvs_sync_period": "--ipvs-sync-period",
    "ipvs_min_sync_period": "--ipvs-min-sync-period",
    "ipvs_tcp_timeout": "--ipvs-tcp-timeout",
    "ipvs_tcp_fin_timeout": "--ipvs-tcpfin-timeout",
    "ipvs_udp_timeout": "--ipvs-udp-timeout",
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
        "ipvs_scheduler": args.ipvs_scheduler,
        "ipvs_strict_arp": args.ipvs_strict_arp,
        "ipvs_sync_period": args.ipvs_sync_period,
        "ipvs_min_sync_period": args.ipvs_min_sync_period,
        "ipvs_tcp_timeout": args.ipvs_tcp_timeout,
        "ipvs_tcp_fin_timeout": args.ipvs_tcpfin_timeout,
        "ipvs_udp_timeout": args.ipvs_udp_timeout,
    }
    if args.ipvs_exclude_cidrs is not None:
        overrides["ipvs_exclude_cidrs"] = split_list(args.ipvs_exclude_cidrs)
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
    origins = {**config.origins, **{n: _FLAGS[n] for n in given}}
    if config.mode == "ipvs":
        # kube-proxy's IPVS proxier syncs with the ipvs periods (--sync-period still wins).
        periods: dict[str, Any] = {}
        for name in ("sync_period", "min_sync_period"):
            if name not in given:
                periods[name] = getattr(config, f"ipvs_{name}")
                origins[name] = origins.get(f"ipvs_{name}") or f"ipvs.{_camel(name)} (default)"
        config = config.with_overrides(**periods)
    config = replace(config, origins=origins)
    validate_config(config)
    return config
