"""detect_backend when one backend's rules cannot be read (legacy iptables without NET_RAW)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from minikproxy.dataplane.execer import ExecResult
from minikproxy.dataplane.iptables import BackendDetectionError, detect_backend

DENIED = (
    b"iptables-legacy-save v1.8.9 (legacy): Cannot initialize: Permission denied "
    b"(you must be root)\n"
)


class Node:
    """iptables-*-save answers: nft holds ``nft_rules``; legacy is unreadable."""

    def __init__(self, nft_rules: bytes) -> None:
        self.nft_rules = nft_rules

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        if "legacy" in argv[0]:
            return ExecResult(1, b"", DENIED)
        return ExecResult(0, self.nft_rules if "mangle" not in argv else b"", b"")


def test_an_unreadable_legacy_backend_and_an_empty_nft_one_is_an_error() -> None:
    with pytest.raises(BackendDetectionError, match=r"Permission denied.*NET_RAW"):
        detect_backend(Node(b""))


def test_nft_holding_rules_wins_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert detect_backend(Node(b"*filter\n-A INPUT -j ACCEPT\nCOMMIT\n")) == "nft"
    assert "Permission denied" in caplog.text and "--iptables-backend" in caplog.text
