"""``minikproxy cleanup`` on a real kernel: a full ruleset (jump rules included) rendered from the
example cluster is loaded into a test node netns next to foreign rules; cleanup removes every
chain and jump minikproxy owns, leaves the foreign ones alone, and finds nothing the second time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from minikproxy.cleanup import CleanupReport, cleanup_iptables
from minikproxy.config import ProxyConfig
from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import IptablesBackend, RealIptables
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import load_manifests
from minikproxy.testing.netns import Topology

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "cluster"
FAMILIES: tuple[IPFamily, ...] = (IPV4, IPV6)

# Chains cleanup must remove (names, or prefixes ending in "-").
OWNED = (
    "KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SVL-",
    "KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ",
    "KUBE-PROXY-CANARY", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL",
)  # fmt: skip
KUBELET_CHAINS = {"KUBE-FIREWALL"}  # kubelet's: cleanup leaves it alone


def owned(chain: str) -> bool:
    """Whether ``chain`` is one minikproxy (or kube-proxy's iptables mode) owns."""
    return any(chain.startswith(p) if p.endswith("-") else chain == p for p in OWNED)


def tool(family: IPFamily, backend: IptablesBackend) -> str:
    """``iptables-nft``, ``ip6tables-legacy`` and so on."""
    return f"{'ip6tables' if family == IPV6 else 'iptables'}-{backend}"


def chains_in(saved: str) -> set[str]:
    """Every chain declared in ``iptables-save`` output."""
    return {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}


def jump_targets(saved: str) -> set[str]:
    """Every ``-j``/``-g`` target in ``iptables-save`` output."""
    return set(re.findall(r" -[jg] (\S+)", saved))


def render_examples() -> dict[IPFamily, str]:
    """The full restore payloads (with jump rules) of the example cluster, per family."""
    config = ProxyConfig().with_overrides(cluster_cidr="10.244.0.0/16,fd00:10:244::/56")
    result = render_objects(load_manifests([str(EXAMPLES)], []), config, families=FAMILIES)
    assert not result.problems, result.problems
    for family, payload in result.payloads.items():
        for needed in ("-A PREROUTING ", "-A OUTPUT ", "-A POSTROUTING ", "KUBE-SVC-"):
            assert needed in payload, (family, needed)
    return result.payloads


FOREIGN = {
    IPV4: [
        ["-t", "nat", "-N", "FOREIGN"],
        ["-t", "nat", "-A", "FOREIGN", "-s", "10.10.1.0/24", "-j", "RETURN"],
        ["-t", "nat", "-A", "POSTROUTING", "-o", "up0", "-j", "FOREIGN"],
        ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"],
    ],
    IPV6: [
        ["-t", "nat", "-N", "FOREIGN"],
        ["-t", "nat", "-A", "FOREIGN", "-s", "fd00:10:1::/64", "-j", "RETURN"],
        ["-t", "nat", "-A", "POSTROUTING", "-o", "up0", "-j", "FOREIGN"],
        ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT"],
    ],
}


def load_everything(topology: Topology, backend: IptablesBackend) -> None:
    """Load the example rules of both families, then add the foreign chain and rules."""
    for family, payload in render_examples().items():
        topology.load_iptables(payload, family, backend)
        for rule in FOREIGN[family]:
            topology.node_exec([tool(family, backend), "-w", "5", *rule])
        saved = topology.iptables_save(family, backend)
        assert {c for c in chains_in(saved) if owned(c)} >= {
            "KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING", "KUBE-PROXY-CANARY",
        }  # fmt: skip
        assert any(c.startswith("KUBE-SVC-") for c in chains_in(saved)), family


def assert_clean(topology: Topology, family: IPFamily, backend: IptablesBackend) -> None:
    """No owned chain or jump to one is left; the foreign chain and rules are intact."""
    saved = topology.iptables_save(family, backend)
    assert not {c for c in chains_in(saved) if owned(c)}, saved
    assert not {t for t in jump_targets(saved) if owned(t)}, saved
    assert {t for t in jump_targets(saved) if t.startswith("KUBE-")} <= KUBELET_CHAINS, saved
    assert "FOREIGN" in chains_in(saved)
    assert "-A POSTROUTING -o up0 -j FOREIGN" in saved
    assert "-A FOREIGN -s " in saved and " -j RETURN" in saved
    assert "-A INPUT -p tcp -m tcp --dport 2222 -j ACCEPT" in saved


def check_report(report: CleanupReport, family: IPFamily) -> None:
    """The report lists the jumps and the chains (by table) that were removed."""
    assert report.family == family and not report.empty
    assert any("-A PREROUTING" in r and "KUBE-SERVICES" in r for r in report.jump_rules)
    assert any("-A POSTROUTING" in r and "KUBE-POSTROUTING" in r for r in report.jump_rules)
    assert all(r.startswith("-t ") for r in report.jump_rules)
    nat = set(report.chains["nat"])
    assert {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"} <= nat
    assert any(c.startswith("KUBE-SVC-") for c in nat)
    assert any(c.startswith("KUBE-SEP-") for c in nat)
    assert "KUBE-PROXY-CANARY" in nat
    assert {"KUBE-SERVICES", "KUBE-PROXY-CANARY"} <= set(report.chains["filter"])
    assert report.chains["mangle"] == ["KUBE-PROXY-CANARY"]
    assert all(owned(c) for chains in report.chains.values() for c in chains), report.chains


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_cleanup_removes_ours_and_keeps_foreign_rules(
    topology: Topology, backend: IptablesBackend
) -> None:
    load_everything(topology, backend)
    execer = RealExecer(topology.namespaces["node"])
    for family in FAMILIES:
        ipt = RealIptables(execer, family, backend)
        check_report(cleanup_iptables(ipt), family)
        assert_clean(topology, family, backend)
        again = cleanup_iptables(ipt)
        assert again.empty, again
        assert_clean(topology, family, backend)
    if backend == "legacy":  # nothing leaked into the nf_tables backend
        assert "KUBE-" not in topology.node_exec(["nft", "list", "ruleset"]).stdout


def test_cleanup_command_reports_then_finds_nothing(topology: Topology) -> None:
    load_everything(topology, "nft")
    node = topology.namespaces["node"]
    argv = ["ip", "netns", "exec", node, sys.executable, "-m", "minikproxy", "cleanup"]
    argv += ["--iptables-backend", "nft"]

    first = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    for family in FAMILIES:
        tag = f"(nft {family})"
        assert any(
            line.startswith(f"removed jump rule {tag}: -t nat -A PREROUTING") for line in lines
        ), lines
        chains = [line for line in lines if line.startswith("removed ") and f"nat {tag}:" in line]
        assert len(chains) == 1 and "KUBE-SERVICES" in chains[0] and "KUBE-SVC-" in chains[0]
        assert re.match(rf"removed \d+ chains from nat \(nft {family}\): KUBE-", chains[0])
        assert any(f"from mangle {tag}: KUBE-PROXY-CANARY" in line for line in lines), lines
        assert_clean(topology, family, "nft")
    assert "nothing to remove" not in first.stdout

    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    assert second.stdout == (
        "nothing to remove: no minikproxy or kube-proxy iptables rules or nftables tables\n"
    ), second.stdout
    for family in FAMILIES:
        assert_clean(topology, family, "nft")
