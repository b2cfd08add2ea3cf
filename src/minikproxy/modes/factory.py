"""Build the :class:`~minikproxy.modes.base.ProxyMode` that ``--proxy-mode`` names."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.dataplane.execer import Execer
from minikproxy.dataplane.iptables import IptablesBackend, RealIptables
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPFamily
from minikproxy.modes.base import ProxyMode
from minikproxy.modes.iptables import IptablesMode
from minikproxy.modes.ipvs import DEPRECATION, IpvsMode
from minikproxy.modes.nftables import NftablesMode


def build_mode(
    config: ProxyConfig,
    families: Sequence[IPFamily],
    execer: Execer | None,
    backend: IptablesBackend = "nft",
) -> ProxyMode[Any]:
    """The mode of ``config.mode`` with its kernel handles in ``execer``'s network namespace;
    without ``execer``, the same mode in dry-run (it never touches the kernel)."""
    if config.mode == "nftables":
        applier = None if execer is None else NftablesApplier(getattr(execer, "netns", None))
        return NftablesMode(applier, config.nftables_layout)
    if config.mode == "ipvs":
        return _ipvs_mode(config, families, execer, backend)
    if config.mode != "iptables":
        raise ValueError(f"unknown proxy mode {config.mode!r}")
    dataplanes = None if execer is None else {f: RealIptables(execer, f, backend) for f in families}
    return IptablesMode(dataplanes)


def _ipvs_mode(
    config: ProxyConfig,
    families: Sequence[IPFamily],
    execer: Execer | None,
    backend: IptablesBackend,
) -> IpvsMode:
    logging.getLogger("minikproxy.modes.ipvs").warning(DEPRECATION)
    if execer is None:
        return IpvsMode()
    from minikproxy.dataplane.ipvs import ExecBulkLoader, NetlinkIpvsKernel
    from minikproxy.dataplane.netinfo import local_addresses

    def addresses(family: IPFamily) -> list[str]:
        return [str(ip) for ip in local_addresses(execer, family)]

    kernel = NetlinkIpvsKernel(getattr(execer, "netns", None))
    dataplanes = {f: RealIptables(execer, f, backend) for f in families}
    mode = IpvsMode(kernel, dataplanes, local_addresses=addresses, bulk=ExecBulkLoader(execer))
    mode.prepare(execer, config)
    return mode
