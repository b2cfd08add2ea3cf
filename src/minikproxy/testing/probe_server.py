"""A tiny echo-who-I-am server for real-traffic tests (standard library only).

Run it inside a network namespace::

    ip netns exec NS python3 -m minikproxy.testing.probe_server \\
        --tcp 10.10.2.3:8080 --udp 10.10.2.3:8080 --tcp '[fd00:10:2::3]:8080'

or by path (``python3 -S /path/to/probe_server.py ...``; it imports nothing from the package).
Every accepted TCP connection and every UDP datagram is answered with one line of JSON::

    {"proto": "tcp", "server": "10.10.2.3:8080", "peer": "10.10.1.2:41234"}

``server`` is the local address that answered and ``peer`` the source address the server saw, so
a test can tell which backend a (DNATed) connection landed on and whether it was masqueraded.
IPv6 addresses are written in brackets: ``[fd00:10:2::3]:8080``.

Once every socket is bound and listening, the server writes ``READY`` on stdout and flushes it;
it then stays silent on stdout. SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

READY_LINE = "READY"
_UDP_BUFSIZE = 65535


def format_endpoint(host: str, port: int) -> str:
    """Return ``host:port``, bracketing IPv6 hosts (``[fd00::1]:80``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6host]:port`` into ``(host, port)``.

    Raises ValueError on malformed input.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected ADDR:PORT or [ADDR]:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be bracketed: {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def reply_line(proto: str, local: tuple[str, int], peer: tuple[str, int]) -> bytes:
    """Build the JSON reply line for one connection or datagram."""
    body = {
        "proto": proto,
        "server": format_endpoint(local[0], local[1]),
        "peer": format_endpoint(peer[0], peer[1]),
    }
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_listener(proto: str, host: str, port: int) -> socket.socket:
    """Bind (and for TCP, listen on) a non-blocking socket at ``host:port``."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(_family(host), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if proto == "tcp":
            sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _answer_tcp(listener: socket.socket) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    with conn:
        conn.setblocking(True)
        conn.settimeout(1.0)
        try:
            local = conn.getsockname()
            peer = conn.getpeername()  # ENOTCONN if the client already reset the connection
            conn.sendall(reply_line("tcp", (local[0], local[1]), (peer[0], peer[1])))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            return  # the client went away; nothing to report


def _answer_udp(sock: socket.socket) -> None:
    try:
        _, peer = sock.recvfrom(_UDP_BUFSIZE)
    except (BlockingIOError, InterruptedError, ConnectionRefusedError):
        return
    local = sock.getsockname()
    try:
        sock.sendto(reply_line("udp", (local[0], local[1]), (peer[0], peer[1])), peer)
    except OSError:
        return


class _Stop(Exception):
    """Raised by the signal handler to leave the serve loop."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def serve(listeners: Sequence[tuple[str, socket.socket]]) -> None:
    """Answer on every ``(proto, socket)`` until SIGTERM or SIGINT."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    selector = selectors.DefaultSelector()
    for proto, sock in listeners:
        selector.register(sock, selectors.EVENT_READ, (proto, sock))
    print(READY_LINE, flush=True)
    try:
        while True:
            for key, _ in selector.select():
                proto, sock = key.data
                if proto == "tcp":
                    _answer_tcp(sock)
                else:
                    _answer_udp(sock)
    except _Stop:
        pass
    finally:
        selector.close()
        for _, sock in listeners:
            sock.close()


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="probe_server", description="Answer each TCP connection / UDP datagram with JSON."
    )
    parser.add_argument("--tcp", action="append", default=[], metavar="ADDR:PORT")
    parser.add_argument("--udp", action="append", default=[], metavar="ADDR:PORT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bind every requested listener, print READY, serve until signalled."""
    args = build_parser().parse_args(argv)
    if not args.tcp and not args.udp:
        print("probe_server: give at least one --tcp or --udp", file=sys.stderr)
        return 2
    listeners: list[tuple[str, socket.socket]] = []
    try:
        for proto, specs in (("tcp", args.tcp), ("udp", args.udp)):
            for spec in specs:
                host, port = parse_endpoint(spec)
                listeners.append((proto, open_listener(proto, host, port)))
    except (OSError, ValueError) as exc:
        print(f"probe_server: {exc}", file=sys.stderr)
        for _, sock in listeners:
            sock.close()
        return 1
    serve(listeners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
