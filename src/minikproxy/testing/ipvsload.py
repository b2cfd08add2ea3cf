"""Load ``render --proxy-mode ipvs`` output into a network namespace with the stock tools.

The four sections of one family's output go to ``ipset restore``, ``ipvsadm -R``, ``ip addr
add`` (on a dummy link ``kube-ipvs0``) and ``ip[6]tables-restore``, which is how a reader
would install them by hand. Needs a kernel with IPVS (see ``scripts/ipvs-vm.sh``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

from minikproxy.compile.ipvs import DUMMY_DEVICE

SECTIONS = ("ipset", "ipvs", "addresses", "iptables")


def kernel_has_ipvs() -> bool:
    """Whether this kernel has IPVS (``ip_vs`` loaded or built in)."""
    return os.path.exists("/proc/net/ip_vs")


def split_sections(text: str) -> dict[str, str]:
    """The ``# ipset`` / ``# ipvs`` / ``# addresses`` / ``# iptables`` sections of one
    family's render output (each without its header line)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("# ") and header[2:] in SECTIONS:
            current = out.setdefault(header[2:], [])
            continue
        if current is None:
            raise ValueError(f"text before the first section header: {line!r}")
        current.append(line)
    missing = [s for s in SECTIONS if s not in out]
    if missing:
        raise ValueError(f"missing sections: {missing}")
    return {k: "".join(v) for k, v in out.items()}


def _run(netns: str, argv: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns} failed: {result.stderr.strip()}")
    return result.stdout


def reset_ipvs(netns: str) -> None:
    """Remove every virtual server, iptables rule, ipset and ``kube-ipvs0`` in ``netns``."""
    _run(netns, ["ipvsadm", "-C"])
    _run(netns, ["nft", "flush", "ruleset"])  # iptables-nft rules; sets are then unreferenced
    _run(netns, ["ipset", "destroy"])
    links = _run(netns, ["ip", "-o", "link", "show"])
    if f" {DUMMY_DEVICE}:" in links:
        _run(netns, ["ip", "link", "del", DUMMY_DEVICE])


def load_ipvs(netns: str, text: str, family: str = "IPv4") -> Mapping[str, str]:
    """Install one family's render output in ``netns`` (after :func:`reset_ipvs`); returns the
    sections. Sets ``net.ipv4.vs.conntrack=1`` as kube-proxy does (MASQUERADE needs it)."""
    sections = split_sections(text)
    reset_ipvs(netns)
    _run(netns, ["sysctl", "-qw", "net.ipv4.vs.conntrack=1"])
    _run(netns, ["ip", "link", "add", DUMMY_DEVICE, "type", "dummy"])
    _run(netns, ["ipset", "restore"], sections["ipset"])
    _run(netns, ["ipvsadm", "-R"], sections["ipvs"])
    batch = "".join(f"address add {line}\n" for line in sections["addresses"].splitlines())
    if batch:
        _run(netns, ["ip", "-batch", "-"], batch)
    restore = "ip6tables-restore" if family == "IPv6" else "iptables-restore"
    _run(netns, [restore, "-w", "5"], sections["iptables"])
    return sections


def ipvsadm_save(netns: str) -> str:
    """``ipvsadm -S -n`` of ``netns``."""
    return _run(netns, ["ipvsadm", "-S", "-n"])
