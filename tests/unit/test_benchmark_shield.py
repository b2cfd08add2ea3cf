"""A second Ctrl-C or a SIGTERM while ``minikproxy bench`` cleans up: the cleanup (stopping
the controller, deleting namespaces) still runs to its end."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

import pytest

from minikproxy.benchmark.measure import Scratch
from minikproxy.benchmark.shield import cleanup_shield, interruptible


class FakeIp:
    """Stands for ``subprocess.run`` of ``ip netns``: keeps the namespaces, and sends this
    process ``signum`` while deleting the first one."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.namespaces: list[str] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        if argv[:3] == ["ip", "netns", "add"]:
            self.namespaces.append(argv[3])
        elif argv[:3] == ["ip", "netns", "del"]:
            if self.signum:
                os.kill(os.getpid(), self.signum)
                self.signum = 0
            self.namespaces.remove(argv[3])
        return subprocess.CompletedProcess(argv, 0)


def scratch_of(ip: FakeIp, monkeypatch: pytest.MonkeyPatch, count: int = 3) -> Scratch:
    monkeypatch.setattr("minikproxy.benchmark.measure.subprocess.run", ip)
    scratch = Scratch("mkpbtest")
    for _ in range(count):
        scratch.fresh()
    assert len(ip.namespaces) == count
    return scratch


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_cleanup_is_ignored(
    second: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip = FakeIp(second)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interruptible():
        scratch = scratch_of(ip, monkeypatch)
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the first: the run stops and cleans up
            pytest.fail("SIGTERM did not interrupt")
        except KeyboardInterrupt:
            try:
                scratch.close()  # gets the second signal while deleting the first namespace
            except KeyboardInterrupt:
                pytest.fail(f"the cleanup was cut short; left {ip.namespaces}")
    assert ip.namespaces == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_interrupt_during_a_cleanup_waits_for_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first Ctrl-C arriving while a cleanup runs (a topology of the run closed in the
    normal course): the cleanup ends, then the run is interrupted."""
    ip = FakeIp(signal.SIGINT)
    with interruptible():
        scratch = scratch_of(ip, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            scratch.close()
    assert ip.namespaces == []


def test_the_shield_hands_a_held_signal_on_to_the_handler_before() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), cleanup_shield():  # pytest's SIGINT: the default
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("after the signal")
    assert steps == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    # Ignored before, ignored after.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with cleanup_shield():
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_held_during_a_failing_cleanup_is_not_lost() -> None:
    """A cleanup that fails (a probe server's stop raising) is recorded and the run moves on:
    the ^C that came during it must still interrupt the run."""
    with pytest.raises(KeyboardInterrupt) as caught, cleanup_shield():
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError("stopping the probe server failed")
    assert isinstance(caught.value.__context__, OSError)


def test_the_interrupt_that_started_a_cleanup_is_not_delivered_twice() -> None:
    with pytest.raises(KeyboardInterrupt) as caught, cleanup_shield():
        os.kill(os.getpid(), signal.SIGINT)  # a second ^C, held ...
        raise KeyboardInterrupt("the first")  # ... while the first propagates
    assert str(caught.value) == "the first"
