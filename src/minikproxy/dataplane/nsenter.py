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
import threading
from collections.abc import Callable
from typing import TypeVar

_CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")


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
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            results.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


__all__ = ["run_in_netns"]
