"""RealExecer: process groups killed on timeout and on close, never left behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from minikproxy.dataplane.execer import ExecCancelledError, ExecTimeoutError, RealExecer

pytestmark = pytest.mark.timeout(30)

# A tool that starts a helper (as iptables-restore may: modprobe, a lock holder) and hangs.
HANGING_TOOL = """#!/bin/sh
/bin/sleep 600 &
echo $! > "$1.helper"
echo $$ > "$1.pid"
wait
"""


def dead(pid: int) -> bool:
    """Whether ``pid`` is gone (or a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_file(path: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.01)
    return int(path.read_text())


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    path = tmp_path / "hanging-tool"
    path.write_text(HANGING_TOOL)
    path.chmod(0o755)
    return path


def test_output_and_status(tmp_path: Path) -> None:
    result = RealExecer().run(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"in\n")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"in\n", b"err\n")


def test_timeout_kills_the_whole_process_group(tool: Path, tmp_path: Path) -> None:
    marker = tmp_path / "run"
    with pytest.raises(ExecTimeoutError, match=r"did not finish within 0\.3s"):
        RealExecer().run([str(tool), str(marker)], timeout=0.3)
    assert wait_dead(wait_file(tmp_path / "run.pid"))
    assert wait_dead(wait_file(tmp_path / "run.helper")), "the tool's helper outlived it"


def test_the_default_timeout_applies_when_none_is_given(tool: Path, tmp_path: Path) -> None:
    with pytest.raises(ExecTimeoutError):
        RealExecer(timeout=0.3).run([str(tool), str(tmp_path / "run")])


def test_close_kills_commands_in_flight_and_refuses_new_ones(tool: Path, tmp_path: Path) -> None:
    execer = RealExecer()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            execer.run([str(tool), str(tmp_path / "run")])
        except BaseException as err:
            errors.append(err)

    caller = threading.Thread(target=call)
    caller.start()
    pid = wait_file(tmp_path / "run.pid")
    helper = wait_file(tmp_path / "run.helper")
    execer.close()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ExecCancelledError), errors
    assert wait_dead(pid) and wait_dead(helper)
    with pytest.raises(ExecCancelledError):
        execer.run(["true"])
    assert execer.closed


def test_the_command_is_out_of_reach_of_our_terminal_signals(tmp_path: Path) -> None:
    result = RealExecer().run(["sh", "-c", "ps -o sid= -p $$"])
    assert int(result.stdout) != os.getsid(0), "not in a session of its own"
