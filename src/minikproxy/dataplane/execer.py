"""The one place the dataplane starts processes.

Every kernel-facing module (iptables, conntrack, netinfo) takes an :class:`Execer` and never
calls :mod:`subprocess` itself, so tests can substitute a recording fake and kernel tests can run
the real tools inside a test network namespace (``RealExecer(netns="...")``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

logger = logging.getLogger(__name__)


class ExecResult(NamedTuple):
    """The outcome of one command: exit status and captured output."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ExecError(RuntimeError):
    """A command was killed before it finished."""

    def __init__(self, argv: Sequence[str], message: str) -> None:
        self.argv = list(argv)
        super().__init__(message)


class ExecTimeoutError(ExecError):
    """A command did not finish within its timeout (its process group was killed)."""

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.timeout = timeout
        super().__init__(argv, f"{' '.join(argv)} did not finish within {timeout:g}s")


class ExecCancelledError(ExecError):
    """A command was killed (or never started) because the execer was closed."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, f"{' '.join(argv)} was cancelled: stopping")


class Execer(Protocol):
    """Runs a command to completion and returns its exit status and output.

    Implementations return non-zero exit statuses as results (they do not raise for them); they
    raise :class:`FileNotFoundError` when the program does not exist, :class:`ExecTimeoutError`
    when ``timeout`` expires and :class:`ExecCancelledError` once closed (both
    :class:`ExecError`).
    """

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None
    ) -> ExecResult:
        """Run ``argv`` feeding it ``stdin`` (none if None); wait at most ``timeout`` seconds
        (None: the execer's own default bound)."""
        ...


DEFAULT_TIMEOUT = 300.0  # seconds; kube-proxy has no bound, a hung child must not block forever


class RealExecer:
    """Runs commands in their own process group, optionally inside a network namespace.

    With ``netns`` every command is prefixed with ``ip netns exec NETNS``: kernel tests use it to
    run the real iptables/conntrack binaries inside a namespace they created.

    Each command runs in a new session, so a timeout kills its whole process group (helpers it
    started included) and the proxy's own signals never reach it. ``timeout`` is the bound for
    calls that give none (None: unbounded). :meth:`close` kills the commands in flight and
    makes later calls fail at once with :class:`ExecCancelledError`: stopping the proxy never
    waits for (or leaves behind) a hung ``iptables-restore``.
    """

    def __init__(
        self, netns: str | None = None, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        self.netns = netns
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._closed = False

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
        limit = self.timeout if timeout is None else timeout
        logger.debug("exec %s", full)
        with self._lock:
            if self._closed:
                raise ExecCancelledError(full)
            proc = subprocess.Popen(
                full,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._running.add(proc)
        try:
            try:
                stdout, stderr = proc.communicate(stdin if stdin is not None else b"", limit)
            except subprocess.TimeoutExpired as exc:
                _kill_group(proc)
                proc.communicate()
                raise ExecTimeoutError(full, limit or 0.0) from exc
            except BaseException:
                _kill_group(proc)
                proc.communicate()
                raise
        finally:
            with self._lock:
                self._running.discard(proc)
                cancelled = self._closed
        if cancelled and proc.returncode < 0:
            raise ExecCancelledError(full)
        return ExecResult(proc.returncode, stdout, stderr)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Kill every command in flight (its process group) and refuse new ones."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for proc in running:
            logger.info("killing %s (pid %d): stopping", proc.args, proc.pid)
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it leads one: ``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


if TYPE_CHECKING:
    _: Execer = RealExecer()

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExecCancelledError",
    "ExecError",
    "ExecResult",
    "ExecTimeoutError",
    "Execer",
    "RealExecer",
]
