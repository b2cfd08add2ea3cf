"""Which modes' state ``run`` removes at start-up (kube-proxy's platformCleanup)."""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.dataplane.execer import ExecResult
from minikproxy.modes import leftovers


@pytest.fixture
def called(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def remover(name: str) -> Any:
        return lambda execer, *args: calls.append(name) or []

    monkeypatch.setattr(
        leftovers, "REMOVERS", {name: remover(name) for name in ("iptables", "nftables", "ipvs")}
    )
    monkeypatch.setattr(leftovers, "remove_nftables_state", lambda ex, tables: calls.append(
        "other layout") or [])  # fmt: skip
    return calls


@pytest.mark.parametrize(
    ("mode", "removed"),
    [
        ("iptables", ["nftables"]),  # ipvs shares its chains: left alone, as kube-proxy
        ("ipvs", ["nftables"]),  # the same the other way round
        ("nftables", ["iptables", "ipvs", "other layout"]),
    ],
)
def test_start_up_removes_only_what_cannot_be_the_running_modes(
    called: list[str], mode: str, removed: list[str]
) -> None:
    leftovers.remove_other_modes(mode, object())  # type: ignore[arg-type]
    assert called == removed


class LinkProbe:
    """An execer answering ``ip link show dev kube-ipvs0`` with ``returncode``."""

    def __init__(self, returncode: int) -> None:
        self.returncode = returncode

    def run(self, argv: Any, *, stdin: Any = None, timeout: Any = None) -> ExecResult:
        assert list(argv) == ["ip", "link", "show", "dev", "kube-ipvs0"]
        return ExecResult(self.returncode, b"", b"")


@pytest.mark.parametrize(("returncode", "removed"), [(0, ["ipvs state"]), (1, [])])
def test_ipvs_state_is_removed_at_start_up_only_where_ipvs_mode_ran(
    monkeypatch: pytest.MonkeyPatch, returncode: int, removed: list[str]
) -> None:
    """Without kube-ipvs0 the node's virtual servers belong to other software (keepalived)."""
    monkeypatch.setattr(leftovers, "remove_ipvs_leftovers", lambda execer: ["ipvs state"])
    execer = LinkProbe(returncode)
    assert leftovers.remove_ipvs_mode_leftovers(execer) == removed
