"""/healthz probe latency while many idle connections are open (issue: the health server could
be starved by never-finished requests).

Run: .venv/bin/python -m pytest bench/bench_healthz.py --benchmark-only
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from minikproxy.healthz import HealthzServer, ProxierHealth
from minikproxy.model.names import IPV4


@pytest.fixture(params=[0, 500, 2000], ids=lambda n: f"idle{n}")
def loaded_server(request: pytest.FixtureRequest) -> Iterator[HealthzServer]:
    health = ProxierHealth()
    health.updated(IPV4)
    server = HealthzServer("127.0.0.1:0", health)
    server.start()
    idle = [
        socket.create_connection(("127.0.0.1", server.port), timeout=30)
        for _ in range(request.param)
    ]
    try:
        yield server
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_probe_latency_with_idle_connections(  # type: ignore[no-untyped-def]
    benchmark, loaded_server: HealthzServer
) -> None:
    """One /healthz GET (new connection each) with N idle connections held open."""
    server = loaded_server
    url = f"http://127.0.0.1:{server.port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def probe() -> int:
        with opener.open(url, timeout=30) as resp:
            return int(resp.status)

    assert benchmark(probe) == 200
    benchmark.extra_info["threads"] = threading.active_count()
    benchmark.extra_info["open_connections"] = server.open_connections
