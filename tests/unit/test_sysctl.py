"""ensure_sysctl: read, write only when different, and every failure as SysctlError."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from minikproxy.dataplane.execer import ExecResult
from minikproxy.dataplane.sysctl import SysctlError, ensure_sysctl

PATH = "/proc/sys/net/ipv4/conf/all/route_localnet"
NAME = "net.ipv4.conf.all.route_localnet"


class Proc:
    """/proc/sys as cat and tee see it; ``read_only`` is an unprivileged container's view."""

    def __init__(self, value: str, *, read_only: bool = False, tools: bool = True) -> None:
        self.value, self.read_only, self.tools = value, read_only, tools
        self.calls: list[list[str]] = []

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        self.calls.append(list(argv))
        if not self.tools:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        assert argv[1] == PATH
        if argv[0] == "cat":
            return ExecResult(0, self.value.encode() + b"\n", b"")
        if self.read_only:
            return ExecResult(1, b"", f"tee: {PATH}: Read-only file system\n".encode())
        self.value = (stdin or b"").decode().strip()
        return ExecResult(0, stdin or b"", b"")


def test_writes_only_when_the_value_differs() -> None:
    proc = Proc("0")
    assert ensure_sysctl(proc, NAME, "1") is True
    assert proc.value == "1"
    assert ensure_sysctl(proc, NAME, "1") is False
    assert [c[0] for c in proc.calls] == ["cat", "tee", "cat"]


def test_an_already_set_value_needs_no_write_access() -> None:
    assert ensure_sysctl(Proc("1", read_only=True), NAME, "1") is False


@pytest.mark.parametrize(
    ("proc", "message"),
    [
        (Proc("0", read_only=True), "cannot set net.ipv4.conf.all.route_localnet: tee: "),
        (Proc("0", tools=False), "cannot read net.ipv4.conf.all.route_localnet: "),
    ],
)
def test_failures_are_one_line_errors(proc: Proc, message: str) -> None:
    with pytest.raises(SysctlError, match=message) as info:
        ensure_sysctl(proc, NAME, "1")
    assert "\n" not in str(info.value)
