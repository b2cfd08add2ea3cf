"""Removing what each proxy mode leaves in the kernel (``minikproxy cleanup``, and the
removal of the *other* modes' state when ``run`` starts, as kube-proxy does since it made mode
switches work without a reboot; minikproxy does it right after its first successful sync, so
that the old mode's rules serve new connections until the new mode's are in).

Each remover returns one line per thing it removed and raises nothing for state that is not
there: running it twice is safe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from minikproxy.cleanup import cleanup_iptables
from minikproxy.compile.nftables import TABLE as FLAT_TABLE
from minikproxy.compile.nftables_kubeproxy import TABLE as KUBE_PROXY_TABLE
from minikproxy.dataplane.execer import Execer, ExecError
from minikproxy.dataplane.iptables import IptablesBackend, IptablesError, RealIptables
from minikproxy.dataplane.libnftables import NftablesError
from minikproxy.dataplane.nftables import OWNED_TABLES, NftablesApplier
from minikproxy.model.names import IPV4, IPV6

logger = logging.getLogger(__name__)


class CleanupError(Exception):
    """Some state could not be removed (the message says which)."""


def remove_iptables_state(
    execer: Execer, backends: Iterable[IptablesBackend] = ("nft", "legacy"), *, strict: bool = False
) -> list[str]:
    """Remove our (and kube-proxy's iptables mode's) chains and jumps from both families of
    each backend. A backend that cannot be read is skipped (logged), unless ``strict``."""
    removed: list[str] = []
    errors: list[str] = []
    for backend in backends:
        for family in (IPV4, IPV6):
            try:
                report = cleanup_iptables(RealIptables(execer, family, backend))
            except IptablesError as err:
                if strict:
                    errors.append(f"{backend} {family}: {err}")
                else:
                    logger.debug("%s %s iptables cleanup skipped: %s", backend, family, err)
                continue
            removed += [f"jump rule ({backend} {family}): {rule}" for rule in report.jump_rules]
            for table, chains in report.chains.items():
                removed.append(
                    f"{len(chains)} chains from {table} ({backend} {family}): {' '.join(chains)}"
                )
    if errors:
        raise CleanupError("; ".join(errors))
    return removed


def remove_nftables_state(
    execer: Execer, tables: Iterable[tuple[str, str]] = OWNED_TABLES
) -> list[str]:
    """Delete our ``minikproxy`` and kube-proxy's ``kube-proxy`` nftables tables (both
    families; or only ``tables``) in the execer's network namespace."""
    try:
        with NftablesApplier(getattr(execer, "netns", None)) as applier:
            return [f"nftables table {table}" for table in applier.cleanup(tables)]
    except (NftablesError, OSError) as err:
        raise CleanupError(f"nftables: {err}") from err


def remove_ipvs_leftovers(execer: Execer) -> list[str]:
    """:func:`~minikproxy.dataplane.ipvs.remove_ipvs_state`, its failures as CleanupError."""
    from minikproxy.dataplane.ipvs import remove_ipvs_state

    try:
        return remove_ipvs_state(execer)
    except (OSError, IptablesError) as err:
        raise CleanupError(f"ipvs: {err}") from err
    except Exception as err:  # pyroute2's NetlinkError and friends
        raise CleanupError(f"ipvs: {type(err).__name__}: {err}") from err


def remove_ipvs_mode_leftovers(execer: Execer) -> list[str]:
    """For another mode's ``run``: IPVS mode's state only where an IPVS-mode proxy left its
    ``kube-ipvs0`` device. Removing IPVS state deletes every virtual server of the node: on a
    node that never ran IPVS mode they belong to other software (keepalived, LVS), not to a
    proxy."""
    from minikproxy.compile.ipvs import DUMMY_DEVICE

    try:
        probe = execer.run(["ip", "link", "show", "dev", DUMMY_DEVICE])
    except (OSError, ExecError) as err:
        raise CleanupError(f"ipvs: cannot look for {DUMMY_DEVICE}: {err}") from err
    return remove_ipvs_leftovers(execer) if probe.returncode == 0 else []


#: Every mode's remover of its leftovers (for the other modes' ``run``), by ``--proxy-mode``.
REMOVERS: dict[str, Callable[[Execer], list[str]]] = {
    "iptables": remove_iptables_state,
    "nftables": remove_nftables_state,
    "ipvs": remove_ipvs_mode_leftovers,
}


#: The modes whose state lives in iptables chains (kube-proxy's ``isIPTablesBased``).
IPTABLES_BASED = frozenset({"iptables", "ipvs"})

#: The table each ``--nftables-layout`` owns (in both families).
LAYOUT_TABLES: dict[str, str] = {"flat": FLAT_TABLE, "kube-proxy": KUBE_PROXY_TABLE}


def remove_other_modes(mode: str, execer: Execer, nftables_layout: str = "flat") -> list[str]:
    """Once ``mode`` has its rules in (the controller calls this after the first sync in
    which every family succeeded, or one full-sync period after the first family's when
    another keeps failing): remove every other mode's state; in nftables mode, the
    other layout's table too (kube-proxy's nftables mode's leftovers, or ours): its hooks
    would still see every packet, and its stale rules could DNAT or reject our Services'
    traffic. Until then both rule sets are present; each DNATs a new connection to an
    endpoint of the same Service (the first NAT chain that translates a connection decides
    it; a later one is skipped), so only what changed while the proxy was down can go to
    the old mode's stale choice, for that short window. Failures are logged, never fatal
    (the proxy still works; the leftovers may shadow nothing or be cleaned later)."""
    # As kube-proxy's platformCleanup: iptables and ipvs mode share chains (KUBE-SERVICES,
    # KUBE-POSTROUTING, ...), so neither removes the other's state: that would flush the
    # running mode's own chains at every restart, breaking Services until the first sync.
    spared = IPTABLES_BASED if mode in IPTABLES_BASED else {mode}
    removers = [(other, remover) for other, remover in REMOVERS.items() if other not in spared]
    if mode == "nftables":
        ours = LAYOUT_TABLES[nftables_layout]
        others = [(family, name) for family, name in OWNED_TABLES if name != ours]
        removers.append(("the other nftables layout", lambda ex: remove_nftables_state(ex, others)))
    removed: list[str] = []
    for other, remover in removers:
        try:
            found = remover(execer)
        except CleanupError as err:
            logger.warning("cannot remove %s's leftovers: %s", _what(other), err)
            continue
        if found:
            logger.info("removed %s's leftovers: %s", _what(other), "; ".join(found))
        removed += found
    return removed


def _what(other: str) -> str:
    return other if other.startswith("the ") else f"{other} mode"
