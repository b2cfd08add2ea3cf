"""Running a function inside another network namespace, from a short-lived thread.

``setns(2)`` switches only the calling thread, and a socket belongs to the namespace it was
created in for its whole life: so a netlink socket opened by :func:`run_in_netns` talks to that
namespace's kernel state while the rest of the process stays where it is. Kernel tests run the
controller in this process against a test namespace this way.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


def _enter(netns: str) -> None:
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter_netns(netns: str) -> None:
    """Switch the calling thread into network namespace ``netns`` (a name under /run/netns)."""
    _enter(netns)


def run_in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Call ``fn`` on a fresh thread switched into network namespace ``netns`` (a name under
    ``/run/netns``); return its result or raise its exception.

    Sockets created by ``fn`` belong to that namespace (and stay there after the thread ends).
    Other threads, including the caller's, are not affected.
    """
    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            _enter(netns)
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


class NetnsThread:
    """A long-lived thread that entered network namespace ``netns`` once and runs every
    :meth:`call` there, one at a time (for state bound to a namespace at creation, such as a
    libnftables context). Raises the ``setns`` error at construction if it cannot enter.

    Example::

        worker = NetnsThread("test-ns")
        try:
            worker.call(lambda: socket.socket())  # a socket of test-ns
        finally:
            worker.close()
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], _Reply] | None] = (
            queue.SimpleQueue()
        )
        started = _Reply()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name=f"netns-{netns}", daemon=True
        )
        self._thread.start()
        started.wait()

    def _serve(self, started: _Reply) -> None:
        try:
            _enter(self.netns)
        except BaseException as exc:
            started.set(None, exc)
            return
        started.set(None, None)
        while (job := self._jobs.get()) is not None:
            fn, reply = job
            try:
                reply.set(fn(), None)
            except BaseException as exc:
                reply.set(None, exc)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the namespace thread; return its result or raise its exception."""
        if not self._thread.is_alive():
            raise RuntimeError(f"the thread of netns {self.netns} is not running")
        reply = _Reply()
        self._jobs.put((fn, reply))
        return reply.wait()  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the thread after the calls already queued; idempotent."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class _Reply:
    """A one-shot result slot a caller waits on."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def set(self, value: object, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def wait(self) -> object:
        # Looking up every 0.5 s: a ^C the kernel hands another thread runs its handler only
        # when this (often the main) thread runs Python code again.
        while not self._done.wait(0.5):
            pass
        if self._error is not None:
            raise self._error
        return self._value


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


__all__ = ["NetnsThread", "run_in_netns"]
