"""The one place the dataplane starts processes.

Every kernel-facing module (iptables, conntrack, netinfo) takes an :class:`Execer` and never
calls :mod:`subprocess` itself, so tests can substitute a recording fake and kernel tests can run
the real tools inside a test network namespace (``RealExecer(netns="...")``).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

logger = logging.getLogger(__name__)


class ExecResult(NamedTuple):
    """The outcome of one command: exit status and captured output."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ExecTimeoutError(RuntimeError):
    """A command did not finish within its timeout (it was killed)."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        super().__init__(f"{' '.join(argv)} did not finish within {timeout:g}s")


class Execer(Protocol):
    """Runs a command to completion and returns its exit status and output.

    Implementations return non-zero exit statuses as results (they do not raise for them); they
    raise :class:`FileNotFoundError` when the program does not exist and
    :class:`ExecTimeoutError` when ``timeout`` expires.
    """

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        """Run ``argv`` feeding it ``stdin`` (none if None); wait at most ``timeout`` seconds."""
        ...


class RealExecer:
    """Runs commands with :func:`subprocess.run`, optionally inside a network namespace.

    With ``netns`` every command is prefixed with ``ip netns exec NETNS``: kernel tests use it to
    run the real iptables/conntrack binaries inside a namespace they created.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv actually executed for ``argv`` (with the netns prefix, if any)."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        """Run ``argv`` (see :class:`Execer`)."""
        full = self.command(argv)
        logger.debug("exec %s", full)
        try:
            proc = subprocess.run(
                full,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ExecTimeoutError(full, timeout or 0.0) from exc
        return ExecResult(proc.returncode, proc.stdout, proc.stderr)


if TYPE_CHECKING:
    _: Execer = RealExecer()

__all__ = ["ExecResult", "ExecTimeoutError", "Execer", "RealExecer"]
