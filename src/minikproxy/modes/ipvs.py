"""ipvs mode: kube-proxy's IPVS proxier (deprecated upstream since Kubernetes 1.35).

IPVS virtual servers, ipsets and the ``kube-ipvs0`` addresses go through netlink
(:class:`~minikproxy.dataplane.ipvs.NetlinkIpvsKernel`), the small iptables ruleset through
``iptables-restore --noflush``; :class:`~minikproxy.dataplane.ipvs.IpvsApplier` diffs each plan
against what the kernel holds. Unlike the iptables and nftables modes an apply is not one
transaction: as in kube-proxy, a failure half-way leaves part of the change applied, and the
next (full) sync completes or repairs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from minikproxy.compile.ipvs import KUBE_SERVICES, IpvsOptions, IpvsPlan, compile_ipvs
from minikproxy.dataplane.execer import Execer
from minikproxy.dataplane.iptables import IptablesError, IptablesRunner
from minikproxy.dataplane.ipvs import BulkLoader, IpvsApplier, IpvsKernel, delete_dummy
from minikproxy.dataplane.sysctl import SysctlError, ensure_sysctl
from minikproxy.model.names import IPFamily, NamespacedName, ServicePortName
from minikproxy.model.parse import NodeInfo
from minikproxy.model.state import ProxyState
from minikproxy.model.topology import CategorizedEndpoints
from minikproxy.modes.base import CategorizedView, FrontendOptions, ProxyMode
from minikproxy.nodeopts import ipvs_options

if TYPE_CHECKING:
    from minikproxy.config import ProxyConfig
    from minikproxy.metrics import ProxyMetrics

logger = logging.getLogger(__name__)

DEPRECATION = (
    "The ipvs proxier is deprecated upstream (a warning since Kubernetes 1.35, behind the "
    "KubeProxyIPVS feature gate since 1.37, planned off by default in 1.40): consider "
    "--proxy-mode nftables"
)

# kube-proxy's NewProxier: the sysctls the IPVS proxier needs (net.* are per namespace).
SYSCTLS = (
    ("net.ipv4.vs.conntrack", "1"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
)
STRICT_ARP_SYSCTLS = (
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
)


class IpvsMode(ProxyMode[IpvsPlan]):
    """ipvs mode over one kernel handle and one iptables runner per family (None: dry-run).

    ``local_addresses`` lists this node's addresses of a family (NodePort virtual servers go
    on those outside ``kube-ipvs0`` when ``--nodeport-addresses`` is empty, as in kube-proxy);
    without it the Node's addresses are used. ``bulk`` loads large initial additions.
    """

    name = "ipvs"

    def __init__(
        self,
        kernel: IpvsKernel | None = None,
        dataplanes: Mapping[IPFamily, IptablesRunner] | None = None,
        *,
        local_addresses: Callable[[IPFamily], Sequence[str]] | None = None,
        bulk: BulkLoader | None = None,
    ) -> None:
        self.kernel = kernel
        self.appliers: dict[IPFamily, IpvsApplier] | None = None
        if kernel is not None and dataplanes is not None:
            self.appliers = {f: IpvsApplier(kernel, ipt, f, bulk) for f, ipt in dataplanes.items()}
        self.local_addresses = local_addresses
        self._random_fully = {f: ipt.has_random_fully() for f, ipt in (dataplanes or {}).items()}
        # Addresses on kube-ipvs0 per family: never NodePort addresses.
        self._bound: dict[IPFamily, frozenset[str]] = {}
        if kernel is not None:
            for family in dataplanes or {}:
                self._bound[family] = frozenset(kernel.addresses(family))

    @property
    def dry_run(self) -> bool:
        """True without a kernel handle."""
        return self.appliers is None

    def prepare(self, execer: Execer, config: ProxyConfig) -> None:
        """kube-proxy's start-up settings: the IPVS sysctls, strict ARP, and the IPVS
        timeouts (``ipvsadm --set``, when one is given)."""
        wanted = SYSCTLS + (STRICT_ARP_SYSCTLS if config.ipvs_strict_arp else ())
        for name, value in wanted:
            try:
                ensure_sysctl(execer, name, value)
            except SysctlError as err:
                logger.warning("%s", err)
        timeouts = (config.ipvs_tcp_timeout, config.ipvs_tcp_fin_timeout, config.ipvs_udp_timeout)
        if any(t > 0 for t in timeouts):
            argv = ["ipvsadm", "--set", *(str(int(t)) for t in timeouts)]
            result = execer.run(argv, timeout=10.0)
            if result.returncode != 0:
                logger.error(
                    "failed to configure IPVS timeouts: %s", result.stderr.decode().strip()
                )

    def options(
        self,
        config: ProxyConfig,
        node: NodeInfo,
        family: IPFamily,
        node_addresses: Sequence[str],
        service_cidrs: Sequence[str],
    ) -> IpvsOptions:
        """:func:`~minikproxy.nodeopts.ipvs_options` with this node's addresses outside
        ``kube-ipvs0``."""
        addresses: Sequence[str] = node_addresses
        if self.local_addresses is not None:
            addresses = self.local_addresses(family)
        bound = self._bound.get(family, frozenset())
        addresses = [a for a in addresses if a not in bound]
        return ipvs_options(
            config,
            node,
            family,
            node_addresses=addresses,
            random_fully=self._random_fully.get(family, True),
        )

    def compile(
        self,
        state: ProxyState,
        options: FrontendOptions,
        previous: IpvsPlan | None,
        changed: frozenset[NamespacedName] | None,
    ) -> IpvsPlan:
        """:func:`~minikproxy.compile.ipvs.compile_ipvs`, incremental when it can."""
        assert isinstance(options, IpvsOptions)
        return compile_ipvs(
            state,
            options,
            previous=previous,
            changed_services=changed if previous is not None else None,
        )

    def changed_ports(self, plan: IpvsPlan) -> frozenset[ServicePortName] | None:
        """The plan's recompiled ports that changed."""
        return plan.changed

    def categorized(self, plan: IpvsPlan) -> Mapping[ServicePortName, CategorizedEndpoints]:
        """Each port's categorisation, as compiled."""
        return CategorizedView(plan.services)

    def describe(self, old: IpvsPlan | None, new: IpvsPlan) -> Iterator[str]:
        """Per service port: the ipset entries, ipvsadm lines and addresses added and removed."""
        family = new.options.family
        if old is None:
            yield (
                f"# {family}: initial sync: {len(new.services)} service ports, "
                f"{len(new.virtual_servers)} virtual servers, {len(new.bind_addresses)} "
                f"addresses on kube-ipvs0"
            )
            for name in new.order:
                svc = new.services[name]
                yield (
                    f"+ {_label(name)}: {len(svc.virtual_servers)} virtual servers, "
                    f"{len(svc.categorized.reachable)} endpoints"
                )
            return
        names = sorted(
            new.changed if new.changed is not None else set(old.services) | set(new.services)
        )
        for name in names:
            before, after = old.describe_service(name), new.describe_service(name)
            before_set, after_set = set(before), set(after)
            removed = [line for line in before if line not in after_set]
            added = [line for line in after if line not in before_set]
            if not removed and not added:
                continue
            verb = "added" if not before else "removed" if not after else "changed"
            yield f"# {family}: {_label(name)} {verb}: +{len(added)} -{len(removed)}"
            yield from (f"- {line}" for line in removed)
            yield from (f"+ {line}" for line in added)

    def apply(self, new: IpvsPlan, applied: IpvsPlan | None, full: bool) -> None:
        """Bring the kernel to ``new``: everything read back and diffed (full), or only what
        the changed service ports own."""
        assert self.appliers is not None, "apply() in dry-run"
        family = new.options.family
        self.appliers[family].apply(new, full=full or applied is None)
        self._bound[family] = frozenset(new.bind_addresses)

    def intact(self, applied: Mapping[IPFamily, IpvsPlan]) -> str | None:
        """Whether our virtual servers, ipsets, ``kube-ipvs0`` and KUBE-SERVICES are all still
        there (one dump of the virtual servers)."""
        if self.appliers is None or self.kernel is None:
            return None
        try:
            services = set(self.kernel.services())
            sets = self.kernel.set_names()
            for family, plan in applied.items():
                missing = [k for k in plan.virtual_servers if k not in services]
                if missing:
                    return f"{family} IPVS virtual server {missing[0]} gone"
                bound = self.kernel.addresses(family)
                gone = [a for a in plan.bind_addresses if a not in bound]
                if gone:
                    return f"{family} address {gone[0]} gone from kube-ipvs0"
                want = {plan.set_name(n) for n in plan.ipset_entries}
                if not want <= sets:
                    return f"{family} ipset {sorted(want - sets)[0]} gone"
                if not self.appliers[family].iptables.chain_exists("nat", KUBE_SERVICES):
                    return f"{family} chain {KUBE_SERVICES} gone from table nat"
        except Exception as err:  # OSError, IptablesError, pyroute2's NetlinkError
            logger.warning("cannot check the IPVS state: %s", err)
        return None

    def record_failure(self, metrics: ProxyMetrics, full: bool) -> None:
        """``sync_proxy_rules_iptables_restore_failures_total`` (kube-proxy's only IPVS
        failure counter)."""
        metrics.iptables_restore_failures_total.inc()

    def expected_error(self, err: Exception) -> str | None:
        """An iptables-restore rejection or a netlink error."""
        from pyroute2.netlink.exceptions import NetlinkError

        if isinstance(err, IptablesError | NetlinkError):
            return str(err)
        return super().expected_error(err)

    def cleanup(self) -> list[str]:
        """Remove our virtual servers, addresses, chains, ipsets and ``kube-ipvs0``."""
        if self.appliers is None or self.kernel is None:
            return []
        removed: list[str] = []
        for applier in self.appliers.values():
            removed += applier.cleanup()
        return removed + delete_dummy(self.kernel)

    def close(self) -> None:
        """Close the netlink sockets."""
        close = getattr(self.kernel, "close", None)
        if close is not None:
            close()
        self.kernel = None


def _label(name: ServicePortName) -> str:
    return f"{name} ({name.protocol.lower()})"
