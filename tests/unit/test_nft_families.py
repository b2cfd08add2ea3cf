"""Which IP families nftables mode runs: IPv6 only when nft accepts an ip6 table."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from minikproxy.controller import usable_nft_families
from minikproxy.dataplane.execer import ExecResult
from minikproxy.model.names import IPV4, IPV6


class CheckExecer:
    def __init__(self, returncode: int) -> None:
        self.returncode = returncode
        self.argv: list[str] = []

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        self.argv = list(argv)
        return ExecResult(self.returncode, b"", b"Error: Could not process rule")


@pytest.mark.parametrize(("returncode", "families"), [(0, [IPV4, IPV6]), (1, [IPV4])])
def test_ipv6_only_when_nft_accepts_an_ip6_table(returncode: int, families: list[str]) -> None:
    execer = CheckExecer(returncode)
    assert usable_nft_families(execer) == families
    assert execer.argv[:2] == ["nft", "--check"]  # nothing is committed
