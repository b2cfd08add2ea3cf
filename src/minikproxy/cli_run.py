"""The controller's subcommands: ``run`` and ``cleanup`` (flags as kube-proxy's)."""

from __future__ import annotations

import argparse
from typing import Any

from minikproxy.config import NFTABLES_LAYOUTS
from minikproxy.dataplane.execer import DEFAULT_TIMEOUT
from minikproxy.flags import add_node_flags, duration


def add_subcommands(sub: Any) -> None:
    """Register ``run`` and ``cleanup`` on the top-level subparsers."""
    run = sub.add_parser(
        "run",
        help="watch the API server and keep this node's rules in sync (kube-proxy's job)",
        description="Watch Services, EndpointSlices, ServiceCIDRs and this Node and keep the "
        "node's iptables rules in sync, with partial syncs, metrics and health endpoints.",
    )
    add_node_flags(run)
    run.add_argument("--kubeconfig", default=None, help="default: in-cluster, then $KUBECONFIG")
    run.add_argument("--min-sync-period", type=duration, default=None, metavar="DURATION")
    run.add_argument("--sync-period", type=duration, default=None, metavar="DURATION")
    run.add_argument("--metrics-bind-address", default=None, metavar="IP:PORT")
    run.add_argument("--healthz-bind-address", default=None, metavar="IP:PORT")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="watch and compile as in production, print what would change, never touch the kernel",
    )
    run.add_argument(
        "--iptables-backend",
        choices=("auto", "nft", "legacy"),
        default="auto",
        help="iptables backend; auto picks the one that already holds rules",
    )
    run.add_argument(
        "--nftables-layout",
        choices=NFTABLES_LAYOUTS,
        default=None,
        help="nftables mode: minikproxy's flat table (default) or kube-proxy's own layout",
    )
    run.add_argument(
        "--exec-timeout",
        type=duration,
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help="kill a kernel tool (iptables-restore, conntrack, ...) and its process group "
        "when it runs longer than this (0: never; default 5m)",
    )

    # Benchmarks only: kube-proxy's partial sync (KUBE-SERVICES and the other top-level
    # chains rewritten on every sync), to compare ours with (bench/bench_e2e_latency.py).
    run.add_argument("--iptables-rewrite-top-level", action="store_true", help=argparse.SUPPRESS)

    cleanup = sub.add_parser(
        "cleanup",
        help="remove every chain and rule minikproxy (or kube-proxy's iptables mode) installed",
    )
    cleanup.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")


def dispatch(args: argparse.Namespace) -> int:
    """Run the ``run`` or ``cleanup`` subcommand."""
    from minikproxy.controller import main_cleanup, main_run  # heavy: only when running

    if args.command == "run":
        return main_run(args)
    return main_cleanup(args)
