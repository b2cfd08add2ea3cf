"""Which modes' state ``run`` removes at start-up (kube-proxy's platformCleanup)."""

from __future__ import annotations

from typing import Any

import pytest

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
