"""RealIptables against the real binaries of both backends, each test in its own network
namespace (one backend per namespace, never mixed), plus backend detection."""

from __future__ import annotations

import secrets
import textwrap
from collections.abc import Iterator

import pytest

from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import (
    IptablesBackend,
    IptablesError,
    RealIptables,
    binary_name,
    detect_backend,
)
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.testing.netns import run_command

pytestmark = pytest.mark.kernel

BACKENDS: tuple[IptablesBackend, ...] = ("nft", "legacy")


def restore_text(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").encode()


def rules_for(family: IPFamily) -> bytes:
    vip, backend = (
        ("10.96.0.1", "10.1.0.1:8080") if family == IPV4 else ("fd00:96::1", "[fd00:1::1]:8080")
    )
    return restore_text(
        f"""
        *filter
        :KUBE-FORWARD - [0:0]
        -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
        COMMIT
        *nat
        :KUBE-SERVICES - [0:0]
        :KUBE-SVC-A - [0:0]
        :KUBE-SEP-A1 - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns/a:p80 cluster IP" -d {vip} -p tcp -m tcp --dport 80 -j KUBE-SVC-A
        -A KUBE-SVC-A -j KUBE-SEP-A1
        -A KUBE-SEP-A1 -p tcp -m tcp -j DNAT --to-destination {backend}
        COMMIT
        """  # noqa: E501
    )


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace with a unique name, deleted afterwards."""
    name = f"dpx-{secrets.token_hex(4)}"
    run_command(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        run_command(["ip", "netns", "del", name], check=False)


def runner(netns: str, backend: IptablesBackend, family: IPFamily = IPV4) -> RealIptables:
    return RealIptables(RealExecer(netns=netns), family, backend)


def saved(ipt: RealIptables, table: str) -> list[str]:
    """save() output without its timestamped comment lines."""
    return [line for line in ipt.save(table).decode().splitlines() if not line.startswith("#")]


def rule_lines(saved: bytes) -> list[str]:
    return [line for line in saved.decode().splitlines() if line.startswith("-A ")]


@pytest.mark.parametrize("family", [IPV4, IPV6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_then_save_round_trips(
    netns: str, backend: IptablesBackend, family: IPFamily
) -> None:
    ipt = runner(netns, backend, family)
    ipt.restore(rules_for(family))
    assert {"KUBE-SERVICES", "KUBE-SVC-A", "KUBE-SEP-A1", "PREROUTING"} <= ipt.list_chains("nat")
    assert "KUBE-FORWARD" in ipt.list_chains("filter")
    nat = rule_lines(ipt.save("nat"))
    assert "-A KUBE-SVC-A -j KUBE-SEP-A1" in nat
    assert any('--comment "ns/a:p80 cluster IP"' in line for line in nat)
    # --noflush: a second restore that redeclares one chain leaves the others alone
    ipt.restore(b"*nat\n:KUBE-SVC-A - [0:0]\n-A KUBE-SVC-A -j RETURN\nCOMMIT\n")
    after = rule_lines(ipt.save("nat"))
    assert "-A KUBE-SVC-A -j RETURN" in after
    assert "-A KUBE-SVC-A -j KUBE-SEP-A1" not in after
    assert [line for line in after if "KUBE-SEP-A1 -p" in line] == [
        line for line in nat if "KUBE-SEP-A1 -p" in line
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_without_noflush_replaces_the_table(netns: str, backend: IptablesBackend) -> None:
    ipt = runner(netns, backend)
    ipt.restore(rules_for(IPV4))
    ipt.restore(b"*nat\n:KUBE-OTHER - [0:0]\nCOMMIT\n", noflush=False, counters=False)
    assert not ipt.chain_exists("nat", "KUBE-SERVICES")
    assert ipt.chain_exists("nat", "KUBE-OTHER")
    assert ipt.chain_exists("filter", "KUBE-FORWARD")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_rule_operations(netns: str, backend: IptablesBackend) -> None:
    ipt = runner(netns, backend)
    ipt.restore(rules_for(IPV4))
    jump = ["-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"]
    other = ["-m", "comment", "--comment", "other", "-j", "RETURN"]
    assert ipt.ensure_rule_prepended("nat", "PREROUTING", other) is True
    assert ipt.ensure_rule_prepended("nat", "PREROUTING", jump) is True
    assert ipt.ensure_rule_prepended("nat", "PREROUTING", jump) is False
    prerouting = [line for line in rule_lines(ipt.save("nat")) if line.startswith("-A PREROUTING")]
    assert len(prerouting) == 2
    assert prerouting[0].endswith("-j KUBE-SERVICES")  # prepended: first in the chain
    assert ipt.ensure_chain("filter", "KUBE-FIREWALL") is True
    assert ipt.ensure_chain("filter", "KUBE-FIREWALL") is False
    assert ipt.chain_exists("filter", "KUBE-FIREWALL")
    assert not ipt.chain_exists("filter", "KUBE-NOPE")
    with pytest.raises(IptablesError) as info:  # still referenced from PREROUTING
        ipt.delete_chain("nat", "KUBE-SERVICES")
    assert info.value.returncode != 0 and info.value.stderr
    ipt.delete_rule("nat", "PREROUTING", jump)
    ipt.delete_rule("nat", "PREROUTING", jump)  # absent: no error
    ipt.flush_chain("nat", "KUBE-SERVICES")
    ipt.delete_chain("nat", "KUBE-SERVICES")
    ipt.delete_chain("nat", "KUBE-SERVICES")  # absent: no error
    assert not ipt.chain_exists("nat", "KUBE-SERVICES")
    with pytest.raises(IptablesError):
        ipt.flush_chain("nat", "KUBE-SERVICES")
    with pytest.raises(IptablesError):
        ipt.ensure_rule_prepended("nat", "KUBE-NOPE", ["-j", "RETURN"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_fully_is_detected_and_accepted(netns: str, backend: IptablesBackend) -> None:
    ipt = runner(netns, backend)
    assert ipt.has_random_fully() is True  # iptables 1.8.x
    ipt.restore(
        b"*nat\n:KUBE-POSTROUTING - [0:0]\n-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n"
        b"COMMIT\n"
    )
    assert any("--random-fully" in line for line in rule_lines(ipt.save("nat")))


BAD_LINES = {
    "missing-chain": "-A KUBE-SVC-A -j KUBE-SEP-MISSING",
    "unknown-option": "-A KUBE-SVC-A -p tcp --bogus 1 -j RETURN",
    "unknown-match": "-A KUBE-SVC-A -m nosuchmatch -j RETURN",
    "delete-nonempty-chain": "-X KUBE-SERVICES",
}


@pytest.mark.parametrize("bad", BAD_LINES.values(), ids=BAD_LINES.keys())
@pytest.mark.parametrize("family", [IPV4, IPV6])
@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_restore_leaves_rules_untouched_and_names_the_line(
    netns: str, backend: IptablesBackend, family: IPFamily, bad: str
) -> None:
    ipt = runner(netns, backend, family)
    ipt.restore(rules_for(family))
    before = {table: saved(ipt, table) for table in ("filter", "nat")}
    data = restore_text(
        f"""
        *nat
        :KUBE-SVC-A - [0:0]
        :KUBE-SEP-A2 - [0:0]
        -A KUBE-SVC-A -j KUBE-SEP-A2
        {bad}
        -A KUBE-SEP-A2 -j RETURN
        -X KUBE-SEP-A1
        COMMIT
        """
    )
    with pytest.raises(IptablesError) as info:
        ipt.restore(data)
    err = info.value
    assert err.returncode not in (None, 0)
    assert err.line == 5, err.stderr
    assert err.line_text == bad
    assert f"line {err.line}" in str(err)
    if backend == "nft" and bad == BAD_LINES["missing-chain"]:
        assert err.reported_line == 8  # iptables-nft blames COMMIT; mapped back to the jump
    assert {table: saved(ipt, table) for table in ("filter", "nat")} == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_is_atomic_per_table(netns: str, backend: IptablesBackend) -> None:
    """Documents iptables-restore's contract: a table COMMITted before the failure stays."""
    ipt = runner(netns, backend)
    ipt.restore(rules_for(IPV4))
    nat_before = saved(ipt, "nat")
    with pytest.raises(IptablesError) as info:
        ipt.restore(
            b"*filter\n:KUBE-NEW - [0:0]\nCOMMIT\n"
            b"*nat\n:KUBE-SVC-A - [0:0]\n-A KUBE-SVC-A -j KUBE-NOPE\nCOMMIT\n"
        )
    assert info.value.line == 6
    assert ipt.chain_exists("filter", "KUBE-NEW")
    assert saved(ipt, "nat") == nat_before


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_binary_accepts_the_wait_flag(netns: str, backend: IptablesBackend) -> None:
    """-w is passed to restore; check the binary's own usage agrees (no "unknown option")."""
    execer = RealExecer(netns=netns)
    result = execer.run(
        [binary_name(IPV4, backend, "restore"), "-w", "5", "--noflush", "--counters"],
        stdin=b"*filter\nCOMMIT\n",
    )
    assert result.returncode == 0, result.stderr
    assert b"unknown" not in result.stderr.lower()


@pytest.mark.parametrize("holder", BACKENDS)
def test_detect_backend_picks_the_backend_holding_rules(
    netns: str, holder: IptablesBackend
) -> None:
    execer = RealExecer(netns=netns)
    assert detect_backend(execer) == "nft"  # empty namespace: the default
    runner(netns, holder, IPV6).restore(b"*filter\n-A INPUT -j ACCEPT\nCOMMIT\n")
    assert detect_backend(execer) == holder


def test_detect_backend_follows_a_legacy_hint_chain(netns: str) -> None:
    execer = RealExecer(netns=netns)
    runner(netns, "legacy").restore(b"*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")
    assert detect_backend(execer) == "legacy"
