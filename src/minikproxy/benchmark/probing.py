"""TCP probes from the client namespace: connect latency, connection rate, and waiting for a
ClusterIP to start or stop answering (how update latency sees a rule reach the kernel)."""

from __future__ import annotations

import errno
import itertools
import math
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from minikproxy.dataplane.nsenter import NetnsThread

_T = TypeVar("_T")
_IP_RECVERR = 11
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends a RST: no TIME_WAIT on the client


class ProbeError(RuntimeError):
    """A connection that should have been answered was not."""


#: Seconds :func:`wait_answering` waits for one probe's handshake (scaled in the
#: emulated IPVS VM, where a handshake's p99 passes 10 ms).
PROBE_TIMEOUT = 0.01 * float(os.environ.get("MINIKPROXY_TIME_SCALE", "1"))
#: Probes :func:`wait_answering` keeps in flight at most (one a millisecond, each up to
#: :data:`PROBE_TIMEOUT`: about 11 natively).
MAX_IN_FLIGHT = 64
#: Connect errors that are the target's (or the path's) answer, coming back after the SYN
#: went out: a RST, an ICMP unreachable. Any other error is a local failure and is raised
#: (an immediate one too, but a RST from a local listener).
_REFUSALS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
#: Source ports :meth:`Prober.wait_answering` cycles through.
SOURCE_PORTS = range(20000, 60000)


def _probe_socket(source_port: int, timeout: float | None) -> socket.socket:
    """A TCP socket for one probe: bound to ``source_port`` (0: the kernel's choice), failing
    at once on ICMP unreachable instead of after SYN retries, closed with a RST (no
    TIME_WAIT); ``timeout`` None makes it non-blocking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        if timeout is None:
            sock.setblocking(False)
        else:
            sock.settimeout(timeout)
    except OSError:
        sock.close()
        raise
    return sock


def _attempt(vip: str, port: int, timeout: float, source_port: int = 0) -> float | None:
    """Connect once (from ``source_port`` if not 0); the handshake's duration in seconds, or
    None if not answered."""
    sock = _probe_socket(source_port, timeout)
    try:
        start = time.perf_counter()
        try:
            sock.connect((vip, port))
        except OSError:
            return None
        return time.perf_counter() - start
    finally:
        sock.close()


def connect_time(vip: str, port: int, timeout: float = 1.0) -> float:
    """One new connection (the kernel's choice of source port, reset on close): its
    handshake's seconds. Raises ProbeError when it is not answered. Call it inside the
    client namespace (:meth:`Prober.run`)."""
    took = _attempt(vip, port, timeout)
    if took is None:
        raise ProbeError(f"{vip}:{port} did not answer a connection")
    return took


class Prober:
    """Runs probes on one thread inside the client namespace; close it when done.

    Connect latency and rate use the kernel's choice of source port, as a client would;
    :meth:`wait_answering` uses a new source port for every probe (see there).
    """

    def __init__(self, client_netns: str) -> None:
        self._thread = NetnsThread(client_netns)
        self._stop = threading.Event()
        self._ports = itertools.cycle(SOURCE_PORTS)

    def _source_port(self) -> int:
        return next(self._ports)

    def close(self) -> None:
        """Stop probing (a probe loop in progress ends at its next probe) and the thread."""
        self._stop.set()
        self._thread.close()

    def _call(self, fn: Callable[[], object]) -> object:
        return self._thread.call(fn)

    def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the probing thread, inside the client namespace (a measurement of the
        caller's own, made of :func:`connect_time` calls, say)."""
        return self._thread.call(fn)

    def connect_latencies(
        self, vip: str, port: int, count: int, timeout: float = 1.0
    ) -> list[float]:
        """``count`` new connections one after the other: each handshake's seconds. Raises
        ProbeError when one is not answered."""

        def run() -> list[float]:
            samples = []
            for _ in range(count):
                if self._stop.is_set():
                    break
                samples.append(connect_time(vip, port, timeout))
            return samples

        result = self._call(run)
        assert isinstance(result, list)
        return result

    def connection_rate(self, vip: str, port: int, seconds: float) -> tuple[float, int]:
        """New connections per second opened (and reset) one after another for ``seconds``,
        and how many went unanswered within a second (they count as attempts, not as
        connections: a client would have waited that long too)."""

        def run() -> tuple[float, int]:
            done = failed = 0
            start = time.perf_counter()
            deadline = start + seconds
            while (now := time.perf_counter()) < deadline and not self._stop.is_set():
                if _attempt(vip, port, 1.0) is None:
                    failed += 1
                else:
                    done += 1
            return done / (now - start), failed

        result = self._call(run)
        assert isinstance(result, tuple)
        return result

    def wait_answering(
        self, vip: str, port: int, answering: bool, timeout: float, interval: float = 0.001
    ) -> float:
        """Probe until ``vip:port`` answers (``answering``) or stops answering; return the
        ``time.perf_counter()`` at which the first probe that saw it was sent. Raises
        TimeoutError. See :func:`wait_answering`."""
        ports = self._source_port

        def run() -> float:
            return wait_answering(
                vip, port, answering, timeout, interval=interval, stop=self._stop, ports=ports
            )

        result = self._call(run)
        assert isinstance(result, float)
        return result


@dataclass
class _Probe:
    """One connection attempt in flight: its socket, when its SYN went out, and its outcome
    (None while pending)."""

    sock: socket.socket | None
    sent: float
    answered: bool | None = None


def _open_probe(vip: str, port: int, source_port: int) -> _Probe:
    """Start a non-blocking connect from ``source_port`` (0: the kernel's choice)."""
    sock = _probe_socket(source_port, None)
    sent = time.perf_counter()
    err = sock.connect_ex((vip, port))
    if err == errno.EINPROGRESS:
        return _Probe(sock, sent)
    sock.close()
    if err not in (0, errno.ECONNREFUSED):  # a local failure (no route...), not an answer
        raise OSError(err, f"connect to {vip}:{port}: {os.strerror(err)}")
    return _Probe(None, sent, err == 0)


def wait_answering(
    vip: str,
    port: int,
    answering: bool,
    timeout: float,
    *,
    interval: float = 0.001,
    probe_timeout: float | None = None,
    max_in_flight: int = MAX_IN_FLIGHT,
    stop: threading.Event | None = None,
    ports: Callable[[], int] | None = None,
) -> float:
    """Probe ``vip:port`` until it answers (``answering``) or stops answering; return the
    ``time.perf_counter()`` at which the earliest probe that saw the new state was sent.
    Raises TimeoutError after ``timeout`` seconds.

    A probe is a non-blocking connect: answered once its handshake completes, unanswered when
    refused (RST, ICMP) or after ``probe_timeout`` (default :data:`PROBE_TIMEOUT`: a dropped
    SYN, as nftables mode drops traffic to unallocated ClusterIPs). A new probe starts every
    ``interval`` without waiting for the ones before, at most ``max_in_flight`` at once, each
    from its own source port (``ports()``; the kernel's choice if None) and with its own send
    time, so the resolution is ``interval`` even where the state before or after drops
    packets: only the answer takes up to ``probe_timeout`` longer to come. The result is
    decided in send order: a probe counts once every probe sent before it has shown the old
    state.

    A new source port for every probe: the kernel may otherwise reuse the tuple of a probe
    that went unanswered, whose conntrack entry (SYN_SENT, not NATed) turns the new SYN
    INVALID, and kube-proxy's rules drop INVALID packets."""
    limit = PROBE_TIMEOUT if probe_timeout is None else probe_timeout
    poller = select.poll()
    pending: deque[_Probe] = deque()
    by_fd: dict[int, _Probe] = {}
    seen = False  # a probe showed the new state: send no more, wait for the older ones

    def finish(probe: _Probe, answered: bool) -> None:
        nonlocal seen
        probe.answered = answered
        seen = seen or answered == answering
        if probe.sock is not None:
            by_fd.pop(probe.sock.fileno(), None)
            poller.unregister(probe.sock)
            probe.sock.close()
            probe.sock = None

    def collect(wait_ms: int) -> None:
        """Finish the probes whose handshake ended (answered, or refused by the target)."""
        for fd, _ in poller.poll(wait_ms):
            probe = by_fd[fd]
            assert probe.sock is not None
            err = probe.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0 and err not in _REFUSALS:
                raise OSError(err, f"connect to {vip}:{port}: {os.strerror(err)}")
            finish(probe, err == 0)

    try:
        start = time.perf_counter()
        deadline = start + timeout
        next_send = start
        while True:
            now = time.perf_counter()
            # Handshakes that ended count before any expiry: this thread may have been
            # paused (the GIL) past a probe's limit while its answer was already in.
            collect(0)
            # Expire probes whose SYN went unanswered for ``limit``.
            for probe in pending:
                if probe.answered is None and now - probe.sent >= limit:
                    finish(probe, False)
            while pending and pending[0].answered is not None:
                probe = pending.popleft()
                if probe.answered == answering:
                    return probe.sent
            if not pending and (now >= deadline or (stop is not None and stop.is_set())):
                break
            if (not seen and now >= next_send and now < deadline
                    and len(pending) < max_in_flight
                    and not (stop is not None and stop.is_set())):  # fmt: skip
                try:
                    probe = _open_probe(vip, port, ports() if ports else 0)
                except OSError as err:
                    if err.errno != errno.EADDRINUSE:
                        raise
                    next_send = now + interval  # the source port is still taken: the next one
                    continue
                pending.append(probe)
                if probe.sock is not None:
                    by_fd[probe.sock.fileno()] = probe
                    poller.register(probe.sock, select.POLLOUT)
                elif probe.answered == answering:
                    seen = True
                next_send = max(next_send + interval, now)
                continue
            waits = [p.sent + limit for p in pending if p.answered is None]
            if not seen and now < deadline and len(pending) < max_in_flight:
                waits.append(next_send)  # (at the cap, the next send waits for a probe's end)
            wake = min(waits, default=now + interval)
            collect(max(0, math.ceil((wake - now) * 1000)))
    finally:
        for probe in pending:
            if probe.sock is not None:
                probe.sock.close()
    state = "answering" if answering else "refusing"
    raise TimeoutError(f"{vip}:{port} was not {state} after {timeout:.0f} s")
