"""``minikproxy cleanup``: remove every chain and rule minikproxy or kube-proxy's iptables mode
installed, in both families. Safe to run twice: the second run finds nothing."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from minikproxy.compile.iptables import (
    FILTER_CHAINS,
    JUMP_RULES,
    NAT_CHAINS,
)
from minikproxy.compile.names import KUBE_PROXY_CANARY, is_service_chain
from minikproxy.dataplane.iptables import IptablesRunner

# kube-proxy's iptables mode also owned these (older releases, and KUBE-MARK-DROP).
_LEGACY_CHAINS = {"nat": {"KUBE-MARK-DROP", "KUBE-LOAD-BALANCER"}, "filter": set[str]()}


def _owned(table: str, chain: str) -> bool:
    if chain == KUBE_PROXY_CANARY:
        return True
    if table == "nat":
        return chain in NAT_CHAINS or is_service_chain(chain) or chain in _LEGACY_CHAINS["nat"]
    if table == "filter":
        return chain in FILTER_CHAINS
    return False


@dataclass
class CleanupReport:
    """What was removed from one family's tables."""

    family: str
    jump_rules: list[str] = field(default_factory=list)
    chains: dict[str, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when nothing was found to remove."""
        return not self.jump_rules and not any(self.chains.values())


def cleanup_iptables(ipt: IptablesRunner) -> CleanupReport:
    """Unlink the jump rules, then flush and delete our chains, table by table.

    kubelet's KUBE-FIREWALL and its jumps are left alone (kubelet owns them). A jump whose
    target chain is gone is not looked for: ``iptables -C`` fails (exit 2) on a rule naming a
    chain that does not exist, and no such rule can exist anyway.
    """
    report = CleanupReport(ipt.family)
    existing = {table: ipt.list_chains(table) for table in {j.table for j in JUMP_RULES}}
    for jump in JUMP_RULES:
        if jump.target not in existing[jump.table]:
            continue
        args = shlex.split(jump.args())
        if ipt.delete_rule(jump.table, jump.source, args):
            report.jump_rules.append(f"-t {jump.table} -A {jump.source} {jump.args()}")
    for table in ("nat", "filter", "mangle"):
        chains = sorted(c for c in ipt.list_chains(table) if _owned(table, c))
        if not chains:
            continue
        decls = "".join(f":{c} - [0:0]\n" for c in chains)
        deletes = "".join(f"-X {c}\n" for c in chains)
        ipt.restore(f"*{table}\n{decls}{deletes}COMMIT\n".encode(), noflush=True, counters=False)
        report.chains[table] = chains
    return report
