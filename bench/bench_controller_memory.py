"""The controller's memory at 10k Services x 10 endpoints after its first sync into a node
network namespace, per mode: VmRSS and VmHWM of a fresh process that runs only the controller
(the fake API server runs in a process of its own). Needs root. Run:

    .venv/bin/python -m pytest bench/bench_controller_memory.py --benchmark-only -s
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from minikproxy.testing.netns import Topology

SERVICES = 10000

API_SERVER = """
import sys
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.synthetic import synthetic_node, synthetic_service, synthetic_slice
with FakeApiServer() as api:
    api.create(synthetic_node())
    for i in range({services}):
        api.create(synthetic_service(i))
        api.create(synthetic_slice(i, 10))
    api.write_kubeconfig({kubeconfig!r})
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
"""

CONTROLLER = """
import time
from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.dataplane.execer import RealExecer
from minikproxy.sources.kubeclient import load_api_client
config = ProxyConfig(mode={mode!r}, hostname_override="node-0", node_ips=("10.10.1.1",),
                     min_sync_period=0.0, sync_period=600.0)
controller = Controller(config, "node-0", load_api_client({kubeconfig!r}),
                        execer=RealExecer({netns!r}), families=["IPv4"])
start = time.perf_counter()
controller.start()
while controller.proxier.last_sync is None or not controller.proxier.last_sync.ok:
    time.sleep(0.05)
    assert time.perf_counter() - start < 900, "no first sync"
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
print(int(status["VmRSS"].split()[0]) // 1024, int(status["VmHWM"].split()[0]) // 1024)
controller.stop()
"""


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_controller_rss_after_first_sync(benchmark: Any, mode: str, tmp_path: Path) -> None:
    kubeconfig = str(tmp_path / "kubeconfig")
    api = subprocess.Popen(
        [sys.executable, "-c", API_SERVER.format(services=SERVICES, kubeconfig=kubeconfig)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert api.stdout is not None and api.stdout.readline().strip() == "ready"
        with Topology() as topo:
            script = CONTROLLER.format(
                mode=mode, kubeconfig=kubeconfig, netns=topo.namespaces["node"]
            )
            figures: list[tuple[int, int]] = []

            def run() -> None:
                out = subprocess.run(
                    [sys.executable, "-c", script], check=True, capture_output=True, text=True
                )
                rss, hwm = out.stdout.split()
                figures.append((int(rss), int(hwm)))

            benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        if api.stdin is not None:
            api.stdin.close()
        api.wait(30)
    rss, hwm = figures[-1]
    benchmark.extra_info.update(rss_mb=rss, peak_rss_mb=hwm)
    print(f"\n{mode}: controller RSS after the first sync {rss} MB, peak {hwm} MB")
