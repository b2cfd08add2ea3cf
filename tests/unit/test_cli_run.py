"""``minikproxy run``: dry-run as a real unprivileged process against the fake API server,
signals, start-up log lines, exit codes, and how the node name is chosen.

The dry-run process runs as ``nobody`` (``setpriv``) when the tests run as root, so it proves
that ``--dry-run`` needs no privilege at all. The interpreter of this virtualenv may live where
``nobody`` cannot reach (e.g. under ``/root``); then a system Python of the same version runs
the package with this environment's ``site-packages`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

import minikproxy
from minikproxy.cli import main
from minikproxy.config import ProxyConfig
from minikproxy.controller import node_name_from
from minikproxy.testing.apiserver import FakeApiServer
from tests.unit.api_objects import endpoint_slice, service

NOBODY = 65534
SRC = Path(minikproxy.__file__).resolve().parents[1]
NODE = "node-1"

NODE_OBJ = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": NODE},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.5.1"}]},
}
# --- running minikproxy unprivileged ----------------------------------------------------------


def _python_env() -> dict[str, str]:
    paths = sysconfig.get_paths()
    pythonpath = os.pathsep.join(dict.fromkeys([str(SRC), paths["purelib"], paths["platlib"]]))
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONPATH": pythonpath,
        "PYTHONUNBUFFERED": "1",
    }


def _drop_privileges() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop root for these tests"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@functools.lru_cache(maxsize=1)
def unprivileged_python() -> tuple[str, ...]:
    """The command prefix running this package's Python as an unprivileged user."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(f"python{version}"), shutil.which("python3")]
    candidates += [f"/usr/bin/python{version}", "/usr/bin/python3"]
    check = f"import sys, minikproxy, kubernetes; assert sys.version.startswith('{version}.')"
    for python in dict.fromkeys(c for c in candidates if c):
        argv = [*_drop_privileges(), python]
        try:
            proc = subprocess.run(
                [*argv, "-c", check], env=_python_env(), capture_output=True, timeout=30
            )
        except OSError:
            continue
        if proc.returncode == 0:
            return tuple(argv)
    pytest.fail(f"no Python {version} runnable by uid {NOBODY} can import minikproxy")


@pytest.fixture(scope="module")
def world_readable_dir() -> Iterator[Path]:
    """A directory the unprivileged process can read (tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="mkp-cli-run-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Proxy:
    """A ``minikproxy run`` process, with its output read line by line in the background."""

    def __init__(self, args: Sequence[str]) -> None:
        argv = [*unprivileged_python(), "-m", "minikproxy", "run", *args]
        self.proc = subprocess.Popen(
            argv,
            env=_python_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a terminal's ^C never reaches it; only our signals do
        )
        self.stdout: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.seen: list[str] = []  # stdout lines consumed so far
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.proc.stdout, self.stdout.put), (self.proc.stderr, None))
        ]
        for pump in self._pumps:
            pump.start()

    def _pump(self, stream: IO[str], sink: Callable[[str], None] | None) -> None:
        for line in stream:
            if sink is not None:
                sink(line.rstrip("\n"))
            else:
                self.stderr.append(line.rstrip("\n"))

    def read_until(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> list[str]:
        """Consume stdout lines until one satisfies ``predicate``; return the lines read."""
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching line within {timeout}s; stdout so far: {self.seen + lines}\n"
                    f"stderr: {self.stderr}"
                )
            try:
                line = self.stdout.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.stdout.empty():
                    raise AssertionError(
                        f"minikproxy exited with {self.proc.returncode}; stderr: {self.stderr}"
                    ) from None
                continue
            lines.append(line)
            if predicate(line):
                self.seen += lines
                return lines

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and for its output to be read to the end."""
        code = self.proc.wait(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        return code

    def stop(self, signum: int, timeout: float = 30.0) -> int:
        """Send ``signum`` and return the exit code (fail if it does not exit in time)."""
        self.proc.send_signal(signum)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"minikproxy ignored {signal.Signals(signum).name}") from None

    def close(self) -> None:
        """Kill the process if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_messages(self) -> list[str]:
        """The stderr lines with the timestamp and level stripped (``logger: message``)."""
        return [line.split(" INFO ", 1)[-1] for line in self.stderr if " INFO " in line]


@pytest.fixture
def api(world_readable_dir: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    """A fake API server holding the Node, a Service and its EndpointSlice, and a kubeconfig
    for it that an unprivileged user can read."""
    with FakeApiServer() as server:
        server.create(NODE_OBJ)
        server.create(service("web", "10.96.0.10"))
        server.create(endpoint_slice("web", "10.244.1.5"))
        kubeconfig = server.write_kubeconfig(world_readable_dir / f"kubeconfig-{server.url[-5:]}")
        kubeconfig.chmod(0o644)
        yield server, kubeconfig


def dry_run_args(kubeconfig: Path, *extra: str) -> list[str]:
    """The flags of a dry run with ephemeral metrics and health ports."""
    return [
        "--dry-run",
        "--kubeconfig", str(kubeconfig),
        "--hostname-override", NODE,
        "--metrics-bind-address", "127.0.0.1:0",
        "--healthz-bind-address", "127.0.0.1:0",
        "--cluster-cidr", "10.244.0.0/16",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def start_proxy() -> Iterator[Callable[[Sequence[str]], Proxy]]:
    """Start ``minikproxy run`` processes; any still running at the end are killed."""
    started: list[Proxy] = []

    def start(args: Sequence[str]) -> Proxy:
        proxy = Proxy(args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


# --- dry run ------------------------------------------------------------------------------------


def test_dry_run_prints_the_initial_sync_then_diffs_and_stops_on_sigterm(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    server, kubeconfig = api
    proxy = start_proxy(dry_run_args(kubeconfig))

    initial = proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{proxy.proc.pid}").st_uid == NOBODY, "not running unprivileged"
    assert initial[-1].startswith("# IPv4: initial sync: 1 service ports,"), initial
    summary = proxy.read_until(lambda line: line.startswith("+ default/web:p (tcp)"))
    assert summary[-1].startswith("+ default/web:p (tcp): ") and "1 endpoints" in summary[-1]
    assert "KUBE-SVC-" in summary[-1]

    server.update(endpoint_slice("web", "10.244.2.9"))
    header = proxy.read_until(lambda line: "default/web:p (tcp) changed" in line)
    assert header[-1].startswith("# IPv4: default/web:p (tcp) changed: +"), header
    n_added, n_removed = (int(n[1:]) for n in header[-1].rsplit(": ", 1)[1].split())
    diff = [proxy.read_until(lambda line: True)[0] for _ in range(n_added + n_removed)]
    removed = [line for line in diff if line.startswith("- ")]
    added = [line for line in diff if line.startswith("+ ")]
    assert removed and all("10.244.2.9" not in line for line in removed), diff
    assert added and all("10.244.1.5" not in line for line in added), diff
    assert any("--to-destination 10.244.1.5:8080" in line for line in removed), diff
    assert any("--to-destination 10.244.2.9:8080" in line for line in added), diff
    assert (len(added), len(removed)) == (n_added, n_removed)

    assert proxy.stop(signal.SIGTERM) == 0
    messages = proxy.log_messages()
    assert "minikproxy: received SIGTERM: stopping, leaving the rules in place" in messages
    startup = [m for m in messages if m.startswith("minikproxy: ")][:4]
    assert startup == [
        "minikproxy: Using iptables proxier (dry-run: the kernel is never touched)",
        "minikproxy: Node name 'node-1'; families IPv4, IPv6",
        "minikproxy: Node IPs: from the Node object's addresses",
        "minikproxy: Cluster CIDR '10.244.0.0/16'; local traffic detection: ClusterCIDR",
    ], proxy.stderr
    assert not [line for line in proxy.stderr if " ERROR " in line or "Traceback" in line]


def test_nftables_dry_run_prints_element_changes(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    """In nftables mode (flat layout) the dry run prints each port's added and removed
    elements; it waits for the Node (NodePorts on its primary IP by default)."""
    server, kubeconfig = api
    proxy = start_proxy(dry_run_args(kubeconfig, "--proxy-mode", "nftables"))
    initial = proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    assert initial[-1].startswith("# IPv4: initial sync: 1 service ports, table ip minikproxy")
    proxy.read_until(lambda line: line.startswith("+ default/web:p (tcp): "))

    server.update(endpoint_slice("web", "10.244.2.9"))
    header = proxy.read_until(lambda line: "default/web:p (tcp) changed" in line)
    assert header[-1] == "# IPv4: default/web:p (tcp) changed: +2 -2", header
    diff = [proxy.read_until(lambda line: True)[0] for _ in range(4)]
    assert diff == [
        "- element cluster-endpoints-tcp { 10.96.0.10 . 80 . 0 : 10.244.1.5 . 8080 }",
        "- element hairpin { 10.244.1.5 . 10.244.1.5 }",
        "+ element cluster-endpoints-tcp { 10.96.0.10 . 80 . 0 : 10.244.2.9 . 8080 }",
        "+ element hairpin { 10.244.2.9 . 10.244.2.9 }",
    ]
    assert proxy.stop(signal.SIGTERM) == 0
    messages = proxy.log_messages()
    assert "minikproxy: Using nftables proxier (dry-run: the kernel is never touched)" in messages
    assert not [line for line in proxy.stderr if " ERROR " in line or "Traceback" in line]


def test_run_takes_the_nftables_layout(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    _, kubeconfig = api
    args = ("--proxy-mode", "nftables", "--nftables-layout", "kube-proxy")
    proxy = start_proxy(dry_run_args(kubeconfig, *args))
    initial = proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    assert initial[-1].startswith("# IPv4: initial sync: 1 service ports, table ip kube-proxy")
    assert proxy.stop(signal.SIGTERM) == 0


def _signal_thread(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to one thread of ``pid`` (tgkill), not to the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_taken_by_another_thread_still_stops_it(
    api: tuple[FakeApiServer, Path],
    start_proxy: Callable[[Sequence[str]], Proxy],
    signum: signal.Signals,
) -> None:
    """The kernel hands a process's signal to any of its threads, and Python runs the handler
    only when the main thread next runs Python code: a main thread blocked for good in
    ``stop.wait()`` ignored such a SIGTERM, until the kubelet's SIGKILL (seen in the image
    test, about 1 stop in 40)."""
    _, kubeconfig = api
    proxy = start_proxy(dry_run_args(kubeconfig))
    proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    pid = proxy.proc.pid
    others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    assert others, "the controller runs threads besides the main one"
    _signal_thread(pid, others[0], signum)
    assert proxy.wait(20) == 0
    name = signal.Signals(signum).name
    assert f"minikproxy: received {name}: stopping, leaving the rules in place" in (
        proxy.log_messages()
    )


def test_sigint_stops_cleanly_and_explicit_node_ips_are_logged(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    _, kubeconfig = api
    proxy = start_proxy(dry_run_args(kubeconfig, "--node-ip", "192.168.5.1"))
    proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    assert proxy.stop(signal.SIGINT) == 0
    messages = proxy.log_messages()
    assert "minikproxy: received SIGINT: stopping, leaving the rules in place" in messages
    assert "minikproxy: Node IPs: 192.168.5.1" in messages
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in proxy.stderr)


def test_kubeadms_complete_configuration_runs(
    api: tuple[FakeApiServer, Path],
    start_proxy: Callable[[Sequence[str]], Proxy],
    world_readable_dir: Path,
) -> None:
    """kubeadm's KubeProxyConfiguration (syncPeriod: 0s and minSyncPeriod: 0s among its zero
    values) used to crash `run` with a traceback; zero means kube-proxy's default."""
    _, kubeconfig = api
    config = world_readable_dir / "kubeadm-config.yaml"
    shutil.copy(Path(__file__).parents[1] / "data" / "kubeadm-kube-proxy-config.yaml", config)
    config.chmod(0o644)
    proxy = start_proxy(dry_run_args(kubeconfig, "--config", str(config)))
    proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    assert proxy.stop(signal.SIGTERM) == 0
    assert not [line for line in proxy.stderr if " ERROR " in line or "Traceback" in line]


def test_no_cluster_cidr_means_no_local_traffic_detection(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    _, kubeconfig = api
    args = [a for a in dry_run_args(kubeconfig) if a not in ("--cluster-cidr", "10.244.0.0/16")]
    proxy = start_proxy(args)
    proxy.read_until(lambda line: line.startswith("# IPv4: initial sync"))
    assert proxy.stop(signal.SIGTERM) == 0
    messages = proxy.log_messages()
    assert "minikproxy: Cluster CIDR ''; local traffic detection: none (no --cluster-cidr)" in (
        messages
    )


def test_without_dry_run_a_non_root_user_is_refused(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    _, kubeconfig = api
    args = [a for a in dry_run_args(kubeconfig) if a != "--dry-run"]
    proxy = start_proxy(args)
    assert proxy.wait(30) == 1
    errors = [line for line in proxy.stderr if " ERROR " in line]
    assert len(errors) == 1, proxy.stderr
    assert errors[0].endswith(
        "minikproxy: minikproxy run needs root (NET_ADMIN) to program iptables; use --dry-run"
    )
    assert proxy.stdout.empty()
    assert not api[0].request_log, "refused before contacting the API server"


def test_a_port_already_taken_is_one_line_not_a_traceback(
    api: tuple[FakeApiServer, Path], start_proxy: Callable[[Sequence[str]], Proxy]
) -> None:
    _, kubeconfig = api
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = start_proxy(dry_run_args(kubeconfig, "--healthz-bind-address", f"127.0.0.1:{port}"))
        assert proxy.wait(30) == 1
    errors = [line for line in proxy.stderr if " ERROR " in line]
    assert len(errors) == 1 and "cannot start: " in errors[0], proxy.stderr
    assert not any("Traceback" in line for line in proxy.stderr), proxy.stderr


# --- bad flags and configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--sync-period", "soon"],
        ["--proxy-mode", "userspace"],
        ["--iptables-backend", "xdp"],
        ["--masquerade-all", "perhaps"],
        ["--service-cidr", "10.96.0.0"],  # no prefix length: not a CIDR for kube-proxy
        ["--service-cidr", "10.96.0.0/12,10.97.0.0/16"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--dry-run", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flags[0] in err, err


def test_bad_flag_exits_2_in_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "minikproxy", "run", "--sync-period", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--sync-period" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--iptables-masquerade-bit", "40"], "--iptables-masquerade-bit: must be in 0..31"),
        (["--config", "/nonexistent/kube-proxy.yaml"], "/nonexistent/kube-proxy.yaml: cannot read"),
        (
            ["--kubeconfig", "/nonexistent/kubeconfig"],
            "kubeconfig /nonexistent/kubeconfig: no such",
        ),
    ],
)
def test_bad_configuration_exits_2(
    flags: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="minikproxy")
    assert main(["run", "--dry-run", "--hostname-override", NODE, *flags]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors


def test_bad_configuration_file_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nmode: userspace\n")
    assert main(["run", "--dry-run", "--config", str(config)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unsupported proxy mode 'userspace'" in errors[0], errors


# --- the node name ------------------------------------------------------------------------------


def test_node_name_prefers_hostname_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "from-env")
    monkeypatch.setattr("socket.gethostname", lambda: "from-hostname")
    config = ProxyConfig().with_overrides(hostname_override=" Worker-7 ")
    assert node_name_from(config) == "worker-7"


def test_node_name_falls_back_to_the_node_name_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "Kind-Worker\n")
    monkeypatch.setattr("socket.gethostname", lambda: "from-hostname")
    assert node_name_from(ProxyConfig()) == "kind-worker"


def test_node_name_falls_back_to_the_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    monkeypatch.setattr("socket.gethostname", lambda: "Host-A")
    assert node_name_from(ProxyConfig()) == "host-a"
    monkeypatch.setenv("NODE_NAME", "")  # empty counts as unset
    assert node_name_from(ProxyConfig()) == "host-a"
