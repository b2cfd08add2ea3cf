"""The real controller (``minikproxy run`` in the node namespace, ``--min-sync-period 0``)
fed by the fake API server: RSS and duration of its first sync, and update latency.

The fake API server runs in this process but listens inside the node namespace, so the
controller reaches it on 127.0.0.1 as a node's kube-proxy reaches its API server. Update
latency is measured from just before the object changes on the API server to the first
probe from the client namespace that sees the new behaviour (the rule is then in the
kernel): a connection answered once an endpoint or Service is added, not answered once it is
removed. A probe starts every millisecond without waiting for the ones before it, and the
latency ends at the send time of the earliest probe that saw the new state: the resolution
is that millisecond even where the state before or after drops packets (a dropped probe
only takes its 10 ms timeout longer to count as unanswered).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minikproxy.benchmark.adapters import ModeAdapter
from minikproxy.benchmark.cluster import (
    CLUSTER_CIDR,
    FLIP_ENDPOINT_VIP,
    FLIP_SERVICE_VIP,
    NAMESPACE,
    NODE,
    PORT,
    SERVICE_CIDR,
    backend_addresses,
    bench_service,
    bench_slice,
)
from minikproxy.benchmark.probing import Prober
from minikproxy.benchmark.shield import stop_process_group
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.testing.apiserver import FakeApiServer

METRICS_PORT = 10249
UPDATE_KINDS = ("endpoint_added", "endpoint_removed", "service_deleted", "service_added")


class ControllerError(RuntimeError):
    """The controller exited or did not sync; carries the end of its log."""


@dataclass
class LiveResults:
    """What one controller run measured (seconds, MiB)."""

    first_sync: float
    startup: float
    rss_mib: float
    updates: dict[str, list[float]] = field(default_factory=dict)


def _metric(netns: str, name: str) -> float | None:
    """One sample of the controller's /metrics, read from inside its namespace."""

    def fetch() -> bytes:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            body: bytes = response.read()
            return body

    try:
        text = run_in_netns(netns, fetch).decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ControllerError(f"process {pid} has no VmRSS")


@contextmanager
def api_server(node_netns: str, objects: list[dict[str, Any]]) -> Iterator[FakeApiServer]:
    """A fake API server holding ``objects``, listening in ``node_netns``."""
    api = FakeApiServer()
    for obj in objects:
        api.create(obj)
    run_in_netns(node_netns, api.start)
    try:
        yield api
    finally:
        api.stop()


@contextmanager
def controller(
    adapter: ModeAdapter,
    node_netns: str,
    kubeconfig: Path,
    log: Path,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """``minikproxy run`` in ``node_netns`` in this mode, plus ``extra_flags`` (its own
    session: stopped here, with SIGTERM then SIGKILL, not by a terminal's Ctrl-C)."""
    argv = [
        "nsenter", f"--net=/run/netns/{node_netns}", "--",
        sys.executable, "-m", "minikproxy", "run",
        "--kubeconfig", str(kubeconfig), "--hostname-override", NODE,
        "--cluster-cidr", CLUSTER_CIDR, "--min-sync-period", "0", "--sync-period", "1h",
        "--metrics-bind-address", f"127.0.0.1:{METRICS_PORT}",
        "--healthz-bind-address", "127.0.0.1:10256",
        *adapter.run_flags, *extra_flags,
    ]  # fmt: skip
    if adapter.name.startswith("nftables"):
        argv += ["--service-cidr", SERVICE_CIDR]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_process_group(proc, 20)  # up to 20 s: a second interrupt meanwhile waits


def _log_tail(log: Path) -> str:
    with suppress(OSError):
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    return ""


def wait_first_sync(proc: subprocess.Popen[bytes], netns: str, log: Path, timeout: float) -> float:
    """Wait for the controller's first successful sync; return its duration (the
    controller's own ``sync_proxy_rules_duration_seconds``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ControllerError(f"minikproxy run exited {proc.returncode}: {_log_tail(log)}")
        # The histogram's count, not the last-sync timestamp: the proxier sets the
        # timestamp before the conntrack reconcile and only then observes the duration.
        if _metric(netns, "kubeproxy_sync_proxy_rules_duration_seconds_count"):
            took = _metric(netns, "kubeproxy_sync_proxy_rules_duration_seconds_sum")
            if took is not None:
                return took
        time.sleep(0.05)
    raise ControllerError(f"no first sync within {timeout:.0f} s: {_log_tail(log)}")


@dataclass
class LiveController:
    """A running controller (``minikproxy run``) after its first sync, and its API server."""

    api: FakeApiServer
    proc: subprocess.Popen[bytes]
    log: Path
    first_sync: float  # the controller's own first-sync duration
    startup: float  # from its start to the end of its first sync
    rss_mib: float  # after its first sync

    def check_running(self) -> None:
        """Raise ControllerError if the controller has exited."""
        if self.proc.poll() is not None:
            raise ControllerError(
                f"minikproxy run exited {self.proc.returncode}: {_log_tail(self.log)}"
            )


@contextmanager
def live_controller(
    adapter: ModeAdapter,
    node_netns: str,
    objects: list[dict[str, Any]],
    workdir: Path,
    *,
    sync_timeout: float,
    extra_flags: tuple[str, ...] = (),
) -> Iterator[LiveController]:
    """A fake API server holding ``objects`` and the controller in ``adapter``'s mode (plus
    ``extra_flags``) in ``node_netns``, after its first sync; both stopped on leaving."""
    kubeconfig = workdir / f"kubeconfig-{adapter.name}"
    log = workdir / f"controller-{adapter.name}.log"
    with api_server(node_netns, objects) as api:
        api.write_kubeconfig(kubeconfig)
        start = time.monotonic()
        with controller(adapter, node_netns, kubeconfig, log, extra_flags) as proc:
            first = wait_first_sync(proc, node_netns, log, sync_timeout)
            startup = time.monotonic() - start
            yield LiveController(api, proc, log, first, startup, rss_mib(proc.pid))


def timed_update(
    prober: Prober, change: Callable[[], object], vip: str, answering: bool, timeout: float
) -> float:
    """Make ``change`` (on the API server); seconds from just before it to the sending of the
    first probe that sees ``vip`` answering (or no longer answering)."""
    start = time.perf_counter()
    change()
    return prober.wait_answering(vip, PORT, answering, timeout) - start


def set_flip_endpoint(
    api: FakeApiServer, prober: Prober, addresses: tuple[str, ...], answering: bool, timeout: float
) -> float:
    """``flip-endpoint``'s EndpointSlice set to ``addresses``, timed by :func:`timed_update`
    until its ClusterIP is ``answering`` (or not)."""

    def change() -> None:
        api.update(bench_slice("flip-endpoint", addresses))

    return timed_update(prober, change, FLIP_ENDPOINT_VIP, answering, timeout)


def set_flip_service(api: FakeApiServer, prober: Prober, present: bool, timeout: float) -> float:
    """``flip-service`` created (``present``: its EndpointSlice always exists) or deleted,
    timed by :func:`timed_update` until its ClusterIP answers (or stops answering)."""

    def change() -> None:
        if present:
            api.create(bench_service("flip-service", FLIP_SERVICE_VIP))
        else:
            api.delete("services", NAMESPACE, "flip-service")

    return timed_update(prober, change, FLIP_SERVICE_VIP, present, timeout)


def measure_updates(
    api: FakeApiServer,
    prober: Prober,
    rounds: int,
    endpoints: int,
    timeout: float,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """``rounds`` of each kind of update, in turn; seconds from the API change to the
    probe that saw it."""
    answer = backend_addresses(endpoints)[:1]
    results: dict[str, list[float]] = {kind: [] for kind in UPDATE_KINDS}
    for _ in range(rounds):
        results["endpoint_added"].append(set_flip_endpoint(api, prober, answer, True, timeout))
        results["endpoint_removed"].append(set_flip_endpoint(api, prober, (), False, timeout))
        results["service_deleted"].append(set_flip_service(api, prober, False, timeout))
        results["service_added"].append(set_flip_service(api, prober, True, timeout))
        progress()
    return results


def run_live(
    adapter: ModeAdapter,
    node_netns: str,
    prober: Prober,
    objects: list[dict[str, Any]],
    workdir: Path,
    *,
    rounds: int,
    endpoints: int,
    sync_timeout: float,
    progress: Callable[[], None] = lambda: None,
) -> LiveResults:
    """Start the controller against ``objects``; measure its first sync, RSS and updates."""
    with live_controller(adapter, node_netns, objects, workdir, sync_timeout=sync_timeout) as live:
        updates = measure_updates(live.api, prober, rounds, endpoints, sync_timeout, progress)
        live.check_running()
    return LiveResults(live.first_sync, live.startup, live.rss_mib, updates)
