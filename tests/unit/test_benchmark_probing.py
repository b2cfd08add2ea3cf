"""The update-latency probe (:func:`minikproxy.benchmark.probing.wait_answering`) against
local listeners on 127.0.0.1: its resolution is the probe interval, not the probe timeout,
even where the state before drops SYNs."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from minikproxy.benchmark import probing
from minikproxy.benchmark.probing import wait_answering

#: Long against the 1 ms interval, so the old blocking probe's artefact (up to a whole
#: timeout) cannot pass for scheduling noise on a busy machine.
PROBE_TIMEOUT = 0.1


@contextmanager
def dropping_listener() -> Iterator[tuple[socket.socket, int]]:
    """A listener whose accept queue is full (backlog 0 and one connection never accepted):
    the kernel drops further SYNs, as nftables mode drops traffic to an unallocated
    ClusterIP, until someone accepts."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)
    try:
        yield server, port
    finally:
        filler.close()
        server.close()


def accept_from(
    server: socket.socket, delay: float, stop: threading.Event
) -> tuple[list[float], threading.Thread]:
    """After ``delay``, accept every connection until ``stop`` (join the thread returned);
    the list returned gets the ``perf_counter()`` at which accepting began."""
    switched: list[float] = []

    def serve() -> None:
        time.sleep(delay)
        server.settimeout(0.001)
        switched.append(time.perf_counter())
        while not stop.is_set():
            with suppress(TimeoutError):
                server.accept()[0].close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return switched, thread


def test_a_dropped_probe_does_not_round_the_latency_up_to_its_timeout() -> None:
    with dropping_listener() as (server, port):
        with pytest.raises(TimeoutError):  # dropped, not refused: nothing answers
            wait_answering("127.0.0.1", port, True, 0.05, probe_timeout=PROBE_TIMEOUT)
        stop = threading.Event()
        # Two and a half probe timeouts: a probe loop that waited a whole timeout for each
        # dropped probe would be in the middle of one when the listener starts answering.
        switched, thread = accept_from(server, 2.5 * PROBE_TIMEOUT, stop)
        try:
            seen = wait_answering("127.0.0.1", port, True, 5, probe_timeout=PROBE_TIMEOUT)
        finally:
            stop.set()
            thread.join()
    late = seen - switched[0]
    assert -0.002 < late < 0.03, f"seen {late * 1000:.1f} ms after it answered"


def test_refused_then_answering_and_answering_then_refused() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    switched: list[float] = []

    def listen_later() -> None:
        time.sleep(0.05)
        switched.append(time.perf_counter())
        server.listen(64)

    threading.Thread(target=listen_later).start()
    seen = wait_answering("127.0.0.1", port, True, 5, probe_timeout=PROBE_TIMEOUT)
    server.settimeout(0)
    with suppress(BlockingIOError):
        while True:
            server.accept()[0].close()
    assert -0.002 < seen - switched[0] < 0.03

    def close_later() -> None:
        time.sleep(0.05)
        switched.append(time.perf_counter())
        server.close()

    threading.Thread(target=close_later).start()
    seen = wait_answering("127.0.0.1", port, False, 5, probe_timeout=PROBE_TIMEOUT)
    assert -0.002 < seen - switched[1] < 0.03


def test_probes_in_flight_are_bounded_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[socket.socket] = []
    most = 0
    real_open = probing._open_probe

    def counting_open(vip: str, port: int, source_port: int) -> probing._Probe:
        nonlocal most
        probe = real_open(vip, port, source_port)
        if probe.sock is not None:
            opened.append(probe.sock)
        most = max(most, sum(s.fileno() != -1 for s in opened))
        return probe

    monkeypatch.setattr(probing, "_open_probe", counting_open)
    with dropping_listener() as (_, port), pytest.raises(TimeoutError):
        wait_answering("127.0.0.1", port, True, 0.3, probe_timeout=0.05, max_in_flight=4)
    assert len(opened) > 4  # it went on probing as the old probes expired
    assert most == 4
    assert all(s.fileno() == -1 for s in opened)


def test_answers_that_came_while_the_prober_was_paused_count_as_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probing thread can be paused (the GIL, a busy machine) past a probe's timeout
    while its handshake is done: that probe was answered, not dropped, or an endpoint or a
    Service removed looks gone before it is."""
    real_open = probing._open_probe
    opened = 0

    def pausing_open(vip: str, port: int, source_port: int) -> probing._Probe:
        nonlocal opened
        probe = real_open(vip, port, source_port)
        opened += 1
        if opened == 5:
            time.sleep(3 * 0.01)
        return probe

    monkeypatch.setattr(probing, "_open_probe", pausing_open)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    try:
        with pytest.raises(TimeoutError):  # it answers throughout: never seen refusing
            wait_answering("127.0.0.1", server.getsockname()[1], False, 0.3, probe_timeout=0.01)
    finally:
        server.close()


def test_a_local_failure_is_raised_not_taken_for_a_refusal() -> None:
    """A connect the kernel refuses locally (here EACCES: broadcast without SO_BROADCAST)
    says nothing about the target: it used to count as "not answering"."""
    with pytest.raises(OSError) as caught:
        wait_answering("255.255.255.255", 80, False, 1)
    assert not isinstance(caught.value, TimeoutError)
