"""``minikproxy run`` and ``minikproxy cleanup``: wiring the sources, proxier, runner, health
and metrics servers together. No logic of its own beyond start-up and shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from minikproxy.config import ConfigError, ProxyConfig
from minikproxy.ctreconcile import ConntrackReconciler
from minikproxy.dataplane.ctnetlink import NetlinkConntrack
from minikproxy.dataplane.execer import Execer, ExecError, RealExecer
from minikproxy.dataplane.iptables import (
    BackendDetectionError,
    IptablesBackend,
    IptablesError,
    RealIptables,
    detect_backend,
)
from minikproxy.dataplane.libnftables import NftablesError
from minikproxy.dataplane.netinfo import NetInfoError, local_addresses
from minikproxy.dataplane.sysctl import SysctlError, ensure_sysctl
from minikproxy.events import record_starting
from minikproxy.healthz import HealthzServer, ProxierHealth, ServiceHealthServer
from minikproxy.metrics import MetricsServer, ProxyMetrics
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.modes.factory import build_mode
from minikproxy.modes.iptables import IptablesMode
from minikproxy.modes.leftovers import (
    CleanupError,
    remove_iptables_state,
    remove_ipvs_leftovers,
    remove_nftables_state,
    remove_other_modes,
)
from minikproxy.nodeopts import config_warnings
from minikproxy.proxier import Proxier
from minikproxy.runner import BoundedFrequencyRunner
from minikproxy.sources.kubeapi import ENDPOINT_SLICES, SERVICES, Reflector, node_spec
from minikproxy.sources.servicecidrs import ServiceCIDRSource

logger = logging.getLogger("minikproxy")

ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"


def node_name_from(config: ProxyConfig) -> str:
    """``--hostname-override``, else ``$NODE_NAME``, else the hostname (lower-cased)."""
    name = config.hostname_override or os.environ.get("NODE_NAME", "") or socket.gethostname()
    return name.strip().lower()


def usable_families(execer: Execer, backend: IptablesBackend) -> list[IPFamily]:
    """IPv4, plus IPv6 when ip6tables works on this node."""
    families: list[IPFamily] = [IPV4]
    try:
        RealIptables(execer, IPV6, backend).save("nat")
        families.append(IPV6)
    except IptablesError as err:
        logger.info("IPv6 disabled: ip6tables is not usable here (%s)", err)
    return families


def usable_nft_families(execer: Execer) -> list[IPFamily]:
    """IPv4, plus IPv6 when nftables accepts an ``ip6`` table here (checked with ``nft
    --check``: nothing is committed), as kube-proxy's nftables mode runs single-stack when a
    family's nftables does not work."""
    families: list[IPFamily] = [IPV4]
    try:
        result = execer.run(["nft", "--check", "add table ip6 minikproxy-probe"])
    except (OSError, ExecError) as err:
        logger.info("IPv6 disabled: cannot check ip6 nftables (%s)", err)
        return families
    if result.returncode == 0:
        families.append(IPV6)
    else:
        logger.info(
            "IPv6 disabled: nftables refuses ip6 tables here (%s)",
            result.stderr.decode(errors="replace").strip(),
        )
    return families


@dataclass
class Controller:
    """The running proxy: reflectors -> proxier -> runner, plus health and metrics servers.

    ``execer`` None means dry-run (compile and print to ``out``, never touch the kernel).
    The service CIDRs come from ``--service-cidr`` or, without it, from the API's ServiceCIDR
    objects when the API server serves them (:attr:`service_cidr_source`; None with the flag).
    """

    config: ProxyConfig
    node_name: str
    api_client: Any
    execer: Execer | None = None
    backend: IptablesBackend = "nft"
    families: Sequence[IPFamily] = (IPV4,)
    out: TextIO | None = None
    metrics_bind_address: str | None = None
    healthz_bind_address: str | None = None
    service_health_addresses: Sequence[str] = ("",)
    reflector_options: dict[str, Any] = field(default_factory=dict)
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)  # replaced if of another mode
    record_events: bool = True  # the Starting Event on the Node (never in dry-run)
    node_wait_log_interval: float = 10.0  # seconds between "waiting for the Node" lines

    def __post_init__(self) -> None:
        self.stop_event = threading.Event()
        self.health = ProxierHealth(health_timeout=2 * self.config.sync_period)
        if self.metrics.proxy_mode != self.config.mode:
            self.metrics = ProxyMetrics(proxy_mode=self.config.mode)
        conntrack = None
        addresses: Callable[[IPFamily], Sequence[str]] | None = None
        service_health = None
        self.mode = build_mode(self.config, self.families, self.execer, self.backend)
        if self.execer is not None:
            execer = self.execer
            # The flows of the namespace the rules go to (a test's node namespace, if any).
            conntrack = ConntrackReconciler(NetlinkConntrack(getattr(execer, "netns", None)))
            addresses = self._local_addresses
            service_health = ServiceHealthServer(self.service_health_addresses, self.health)
        self.proxier = Proxier(
            config=self.config,
            node_name=self.node_name,
            families=self.families,
            metrics=self.metrics,
            health=self.health,
            mode=self.mode,
            conntrack=conntrack,
            service_health=service_health,
            local_addresses=addresses,
            out=self.out,
            service_cidrs=tuple(self.config.service_cidrs),  # --service-cidr, if given
        )
        self.runner = BoundedFrequencyRunner(
            "sync-runner",
            self.proxier.sync_proxy_rules,
            min_interval=self.config.min_sync_period,
            max_interval=self.config.sync_period,
            retry_interval=self.config.sync_period,
        )
        self.proxier.runner = self.runner
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []
        self.reflectors = [
            Reflector(self.api_client, spec, self.proxier.handler(kind), **self.reflector_options)
            for spec, kind in (
                (SERVICES, "services"),
                (ENDPOINT_SLICES, "endpointslices"),
                (node_spec(self.node_name), "nodes"),
            )
        ]
        self.service_cidr_source: ServiceCIDRSource | None = None
        if not self.config.service_cidrs:  # the flag overrides the API's objects
            self.service_cidr_source = ServiceCIDRSource(
                self.api_client,
                self.proxier.set_service_cidrs,
                reflector_options=self.reflector_options,
            )

    def _local_addresses(self, family: IPFamily) -> list[str]:
        assert self.execer is not None
        try:
            return [str(ip) for ip in local_addresses(self.execer, family)]
        except NetInfoError as err:
            logger.warning("cannot list local addresses for --nodeport-addresses: %s", err)
            return []

    def start(self) -> None:
        """Start servers, watches and the sync loop (returns at once)."""
        self.proxier.initial_load_gc.hold()
        if self.execer is not None:
            # Not before the first sync: the old mode's rules keep serving until ours are in.
            self.proxier.on_first_sync = self._remove_other_modes
        if (
            self.execer is not None
            and self.config.mode == "iptables"
            and self.config.localhost_nodeports
            and IPV4 in self.families
        ):
            self._enable_route_localnet(self.execer)
        if self.metrics_bind_address:
            server = MetricsServer(self.metrics_bind_address, self.metrics, self.config.mode)
            server.start()
            self._servers.append(server)
        if self.healthz_bind_address:
            healthz = HealthzServer(self.healthz_bind_address, self.health, metrics=self.metrics)
            healthz.start()
            self._servers.append(healthz)
        for reflector in self.reflectors:
            self._threads.append(reflector.start(self.stop_event))
        if self.service_cidr_source is not None:
            self._threads.append(self.service_cidr_source.start(self.stop_event))
        else:
            logger.info(
                "Service CIDRs from --service-cidr: %s", ", ".join(self.config.service_cidrs)
            )
        if self.record_events:
            self._spawn("event-recorder", self._record_starting)
        # As kube-proxy's SyncLoop: start the health clock now, so that a first sync that never
        # succeeds makes /healthz and /livez fail instead of leaving them unjudged (healthy).
        for family in self.families:
            self.health.updated(family)
        self._spawn("sync-loop", lambda: self.runner.loop(self.stop_event))
        if self.proxier.node_dependency():
            self._spawn("node-wait", self._log_node_wait)
        if self.execer is not None:
            self._spawn("canary-monitor", self._monitor_canaries)

    def _remove_other_modes(self) -> None:
        """Remove the other modes' leftovers, once every family has its rules (see
        :func:`~minikproxy.modes.leftovers.remove_other_modes`): until then the old mode's
        rules keep new connections working."""
        assert self.execer is not None
        try:
            remove_other_modes(self.config.mode, self.execer, self.config.nftables_layout)
        except Exception:  # stopping (commands cancelled), or a bug: never fail the sync
            logger.exception("removing the other modes' leftovers failed")

    @staticmethod
    def _enable_route_localnet(execer: Execer) -> None:
        """Localhost NodePorts need ``route_localnet`` (kube-proxy sets it too; the
        KUBE-FIREWALL rule closes the hole it opens, k/k#90259). Without it the rules are
        still installed, but NodePorts on 127.0.0.1 do not answer."""
        try:
            if ensure_sysctl(execer, ROUTE_LOCALNET, "1"):
                logger.info("set %s=1 for NodePorts on 127.0.0.1", ROUTE_LOCALNET)
        except SysctlError as err:
            logger.warning(
                "%s: NodePorts on 127.0.0.1 will not work (a container needs privileged: true "
                "to write /proc/sys); set iptables.localhostNodePorts: false to silence this",
                err,
            )

    def _record_starting(self) -> None:
        record_starting(self.api_client, self.node_name)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _log_node_wait(self) -> None:
        """Say, again and again, why nothing is synced while the Node is missing."""
        while not self.stop_event.wait(self.node_wait_log_interval):
            reason = self.proxier.waiting_for_node()
            if reason is None:
                return
            logger.warning("waiting for the Node before the first sync: %s", reason)

    def _monitor_canaries(self) -> None:
        while not self.stop_event.wait(self.config.sync_period):
            self.proxier.check_canaries()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop everything, leaving the installed rules in place (no traffic interruption).

        Every thread is told to stop first and commands in flight are killed (a hung
        ``iptables-restore`` must not hold the sync thread or outlive the proxy); then all the
        threads are joined within one shared ``timeout``, well inside a pod's grace period.
        Closes the execer: a restarted controller needs a new one.
        """
        self.stop_event.set()
        close = getattr(self.execer, "close", None)
        if callable(close):
            close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            logger.warning("stopping without waiting for %s", ", ".join(stuck))
        self.proxier.initial_load_gc.release()
        for server in self._servers:
            server.stop()
        if "sync-loop" in stuck:
            # A sync is still running (it ends when its kernel call returns): closing what
            # it uses under it would turn a late success into a crash. The process is ending.
            return
        if self.proxier.service_health is not None:
            self.proxier.service_health.stop()
        if self.proxier.conntrack is not None:
            self.proxier.conntrack.close()
        self.mode.close()

    @property
    def servers(self) -> list[Any]:
        """The started HTTP servers (metrics first, then healthz, when enabled)."""
        return list(self._servers)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # urllib3 warns of each of its own retries; the final failure is logged once, in one
    # line, by whoever made the request (reflectors, the event recorder).
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _choose_backend(execer: Execer, flag: str) -> IptablesBackend:
    if flag in ("nft", "legacy"):
        return flag  # type: ignore[return-value]
    return detect_backend(execer)


def _close_when(stop: threading.Event, execer: RealExecer) -> None:
    stop.wait()
    execer.close()


#: How often the main thread looks up while it waits for a signal (see :func:`_wait_for_stop`).
SIGNAL_POLL_SECONDS = 0.5


def _wait_for_stop(stop: threading.Event) -> None:
    """Wait in the main thread until a signal handler sets ``stop``.

    The kernel may hand a process's SIGTERM to any of its threads, and Python runs the
    handler only when the main thread next runs Python code: a main thread blocked for good
    in ``stop.wait()`` would never see it (until the kubelet's SIGKILL). So it looks up
    regularly."""
    while not stop.wait(SIGNAL_POLL_SECONDS):
        pass


def main_run(args: argparse.Namespace) -> int:
    """``minikproxy run``."""
    from minikproxy.flags import config_from_args
    from minikproxy.sources.kubeclient import KubeConfigError, load_api_client

    _setup_logging()
    try:
        config = config_from_args(args)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    for warning in config_warnings(config):
        logger.warning("%s", warning)
    node_name = node_name_from(config)
    dry_run = bool(args.dry_run)
    if not dry_run and os.geteuid() != 0:
        logger.error(
            "minikproxy run needs root (NET_ADMIN) to program %s; use --dry-run", config.mode
        )
        return 1
    execer = None if dry_run else RealExecer(timeout=args.exec_timeout or None)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info(
            "received %s: stopping, leaving the rules in place", signal.Signals(signum).name
        )
        stop.set()

    # Installed before the first command runs: a tool hung during start-up (backend
    # detection, the IPv6 probe) is killed on SIGTERM too, from a thread (a signal handler
    # must not take the execer's lock).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if execer is not None:
        threading.Thread(
            target=_close_when, args=(stop, execer), name="execer-closer", daemon=True
        ).start()
    backend: IptablesBackend = "nft"
    families: list[IPFamily] = [IPV4, IPV6]
    where = "dry-run: the kernel is never touched"
    if execer is not None and config.mode in ("iptables", "ipvs"):
        try:
            backend = _choose_backend(execer, args.iptables_backend)
        except BackendDetectionError as err:
            logger.error("%s", err)
            return 2
        families = usable_families(execer, backend)
        where = f"iptables backend {backend}"
    elif execer is not None:
        families = usable_nft_families(execer)
        where = f"layout {config.nftables_layout}"
    logger.info("Using %s proxier (%s)", config.mode, where)
    logger.info("Node name %r; families %s", node_name, ", ".join(families))
    logger.info(
        "Node IPs: %s",
        ", ".join(config.node_ips) if config.node_ips else "from the Node object's addresses",
    )
    logger.info(
        "Cluster CIDR %r; local traffic detection: %s",
        config.cluster_cidr or "",
        config.detect_local_mode
        if config.cluster_cidr or config.detect_local_mode != "ClusterCIDR"
        else "none (no --cluster-cidr)",
    )
    try:
        api_client = load_api_client(config.kubeconfig or None)
    except KubeConfigError as err:
        logger.error("%s", err)
        return 2
    if stop.is_set():  # stopped during start-up
        return 0
    try:
        controller = Controller(
            config,
            node_name,
            api_client,
            execer=execer,
            backend=backend,
            families=families,
            out=sys.stdout if dry_run else None,
            record_events=not dry_run,
            metrics_bind_address=config.metrics_bind_address or None,
            healthz_bind_address=config.healthz_bind_address or None,
        )
    except (IptablesError, NftablesError, OSError) as err:
        if stop.is_set():
            return 0
        logger.error("cannot start: %s", err)
        return 1
    if getattr(args, "iptables_rewrite_top_level", False):
        if not isinstance(controller.mode, IptablesMode):
            logger.error("--iptables-rewrite-top-level needs --proxy-mode iptables")
            controller.stop()
            return 2
        controller.mode.rewrite_top_level = True
    try:
        controller.start()
    except OSError as err:  # a server could not bind its address, say
        logger.error("cannot start: %s", err)
        controller.stop()
        return 1
    _wait_for_stop(stop)
    controller.stop()
    return 0


def main_cleanup(args: argparse.Namespace) -> int:
    """``minikproxy cleanup``: remove every mode's state (ours and kube-proxy's): iptables
    chains and rules in both families and backends, the nftables tables, and the IPVS state
    (virtual servers, kube-ipvs0, IPVS chains and ipsets)."""
    _setup_logging()
    if os.geteuid() != 0:
        logger.error("minikproxy cleanup needs root")
        return 1
    execer = RealExecer()
    removed: list[str] = []
    failed = False
    steps: list[Callable[[], list[str]]] = []
    if args.iptables_backend in ("nft", "legacy"):
        steps.append(lambda: remove_iptables_state(execer, [args.iptables_backend], strict=True))
    else:  # the legacy tools may be missing or unusable: only nft must work
        steps.append(lambda: remove_iptables_state(execer, ["nft"], strict=True))
        steps.append(lambda: remove_iptables_state(execer, ["legacy"]))
    steps.append(lambda: remove_nftables_state(execer))
    steps.append(lambda: remove_ipvs_leftovers(execer))
    for step in steps:
        try:
            removed += step()
        except CleanupError as err:
            logger.error("cleanup failed: %s", err)
            failed = True
    for line in removed:
        print(f"removed {line}")
    if not removed and not failed:
        print("nothing to remove: no minikproxy or kube-proxy iptables rules or nftables tables")
    return 1 if failed else 0
