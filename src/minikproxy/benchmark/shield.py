"""Cleanups a second Ctrl-C or a SIGTERM cannot cut short: stopping the controller or the
IPVS VM and deleting network namespaces run to their end, or namespaces are left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol, TypeVar

#: The signals that interrupt ``minikproxy bench`` (Ctrl-C, and ``kill``/a supervisor).
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class _Closable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


def _deliver(handler: _Handler, signum: int) -> None:
    """What ``signum`` would have done under ``handler``."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


@contextmanager
def cleanup_shield() -> Iterator[None]:
    """Run the block (a cleanup) to its end: a SIGINT or SIGTERM arriving meanwhile is held,
    and handed to the handler it would have met once the block is done, unless the block
    ends with the interrupt (KeyboardInterrupt) that started the cleanup: then it is
    dropped. A block failing otherwise still gets it delivered (a ^C must not be lost to a
    cleanup error the caller records and moves on from). Off the main thread, where Python
    cannot set handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in SIGNALS}
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held and not interrupted:
            _deliver(previous[signal.Signals(held[0])], held[0])


@contextmanager
def closing(thing: _C) -> Iterator[_C]:
    """Like :func:`contextlib.closing`, with ``close()`` under :func:`cleanup_shield`."""
    try:
        yield thing
    finally:
        with cleanup_shield():
            thing.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM of :func:`interruptible`: further ones are ignored, as
    everything from here on is cleanup."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; after that (the run cleans up) both
    are ignored until the block ends, which restores the handlers there were before.

    SIGINT is handled even if it started ignored (Python leaves it so in a background job
    of a non-interactive shell): the run must stay interruptible all the same."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_process_group(proc: subprocess.Popen[Any], grace: float) -> None:
    """Stop ``proc``'s process group (it was started with ``start_new_session``): SIGTERM,
    then SIGKILL after ``grace`` seconds; under :func:`cleanup_shield`."""
    with cleanup_shield():
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
