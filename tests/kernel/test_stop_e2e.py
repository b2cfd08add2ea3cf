"""``minikproxy run`` (a real process, as root) stops promptly on SIGTERM while an
``iptables-restore`` hangs (or, during start-up, the IPv6 probe's ``ip6tables-save``), and
leaves no child behind.

The kernel is never touched: every tool ``run`` may start is a fake on a PATH of its own
(the tool named by ``$MKP_HANG`` hangs after starting a helper; the rest succeed quietly).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from minikproxy.testing.apiserver import FakeApiServer
from tests.unit.test_execer import dead, wait_dead, wait_file

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

NODE = "node-1"
FAKE_TOOL = """#!/bin/sh
case "$(/usr/bin/basename "$0")" in
  $MKP_HANG)
    /bin/sleep 600 &
    echo $! > "$MKP_FAKE_DIR/helper.pid"
    echo $$ > "$MKP_FAKE_DIR/hung.pid"
    exec /bin/sleep 600 ;;
esac
for arg in "$@"; do [ "$arg" = "-C" ] && exit 1; done
exit 0
"""
TOOLS = [
    f"{base}{suffix}"
    for base in ("iptables", "ip6tables")
    for suffix in ("", "-save", "-restore", "-nft", "-nft-save", "-nft-restore", "-legacy",
                   "-legacy-save", "-legacy-restore")
] + ["sysctl", "conntrack", "ip", "nft", "modprobe", "ipset"]  # fmt: skip


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "fake-tool"
    script.write_text(FAKE_TOOL)
    script.chmod(0o755)
    for name in TOOLS:
        (bin_dir / name).symlink_to(script)
    return bin_dir


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Iterator[Path]:
    with FakeApiServer() as api:
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        yield api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.mark.parametrize(
    ("hang", "killed"),
    [
        ("*-restore", "killing ['iptables-nft-restore'"),  # in a sync
        ("ip6tables-nft-save", "killing ['ip6tables-nft-save'"),  # the start-up IPv6 probe
    ],
)
def test_sigterm_kills_a_hung_tool_and_exits_promptly(
    fake_bin: Path, kubeconfig: Path, tmp_path: Path, hang: str, killed: str
) -> None:
    env = {
        "MKP_HANG": hang,
        "PATH": str(fake_bin),
        "MKP_FAKE_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "HOME": str(tmp_path),
    }
    argv = [
        sys.executable, "-m", "minikproxy", "run",
        "--kubeconfig", str(kubeconfig),
        "--hostname-override", NODE,
        "--iptables-backend", "nft",
        "--iptables-localhost-nodeports", "false",
        "--metrics-bind-address", "127.0.0.1:0",
        "--healthz-bind-address", "127.0.0.1:0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr").open("wb"), start_new_session=True,
    )  # fmt: skip
    try:
        restore = wait_file(tmp_path / "hung.pid", timeout=30)
        helper = wait_file(tmp_path / "helper.pid")
        assert not dead(restore)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        # Before the fix: 10 s per stuck thread in turn, and the restore left running.
        assert proc.wait(timeout=30) == 0
        took = time.monotonic() - started
        assert wait_dead(restore, timeout=1.0), f"{hang} outlived the controller"
        assert wait_dead(helper, timeout=1.0), "the restore's helper outlived the controller"
        assert took < 8.0, f"took {took:.1f}s to stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for name in ("hung.pid", "helper.pid"):
            path = tmp_path / name
            if path.exists() and path.read_text().strip():
                pid = int(path.read_text())
                if not dead(pid):
                    os.kill(pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr, stderr
    assert killed in stderr, stderr
