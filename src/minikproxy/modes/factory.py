"""Build the :class:`~minikproxy.modes.base.ProxyMode` that ``--proxy-mode`` names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.dataplane.execer import Execer
from minikproxy.dataplane.iptables import IptablesBackend, RealIptables
from minikproxy.dataplane.nftables import NftablesApplier
from minikproxy.model.names import IPFamily
from minikproxy.modes.base import ProxyMode
from minikproxy.modes.iptables import IptablesMode
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
    if config.mode != "iptables":
        raise ValueError(f"unknown proxy mode {config.mode!r}")
    dataplanes = None if execer is None else {f: RealIptables(execer, f, backend) for f in families}
    return IptablesMode(dataplanes)
