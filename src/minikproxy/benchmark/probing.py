"""TCP probes from the client namespace: connect latency, connection rate, and waiting for a
ClusterIP to start or stop answering (how update latency sees a rule reach the kernel)."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from minikproxy.dataplane.nsenter import NetnsThread

_T = TypeVar("_T")
_IP_RECVERR = 11
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends a RST: no TIME_WAIT on the client


class ProbeError(RuntimeError):
    """A connection that should have been answered was not."""


#: Seconds :meth:`Prober.wait_answering` waits for one probe's handshake (scaled in the
#: emulated IPVS VM, where a handshake's p99 passes 10 ms).
PROBE_TIMEOUT = 0.01 * float(os.environ.get("MINIKPROXY_TIME_SCALE", "1"))
#: Source ports :meth:`Prober.wait_answering` cycles through.
SOURCE_PORTS = range(20000, 60000)


def _attempt(vip: str, port: int, timeout: float, source_port: int = 0) -> float | None:
    """Connect once (from ``source_port`` if not 0); the handshake's duration in seconds, or
    None if not answered."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        # ICMP unreachable fails the connect at once instead of after SYN retries.
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.settimeout(timeout)
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
        TimeoutError.

        A probe is unanswered after :data:`PROBE_TIMEOUT` (a dropped SYN, as nftables mode
        drops traffic to unallocated ClusterIPs): where the old or new state drops packets,
        the resolution is that timeout rather than the probe interval."""

        def run() -> float:
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline and not self._stop.is_set():
                sent = time.perf_counter()
                # A fresh source port each time: the kernel may otherwise reuse the tuple of a
                # probe that went unanswered, whose conntrack entry (SYN_SENT, not NATed)
                # turns the new SYN INVALID, and kube-proxy's rules drop INVALID packets.
                took = _attempt(vip, port, PROBE_TIMEOUT, self._source_port())
                if (took is not None) == answering:
                    return sent
                time.sleep(interval)
            state = "answering" if answering else "refusing"
            raise TimeoutError(f"{vip}:{port} was not {state} after {timeout:.0f} s")

        result = self._call(run)
        assert isinstance(result, float)
        return result
