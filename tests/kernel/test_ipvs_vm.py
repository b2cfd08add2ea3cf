"""The IPVS kernel tests, run for real: this machine's kernel has no IPVS, so this test boots
Debian's kernel under qemu (``scripts/ipvs-vm.sh``: one boot, ~4 s, this machine's files
visible) and runs every ``ipvs``-marked test inside it, failing if any fails or none ran.

The VM's kernel and initrd are built once (``minikproxy.benchmark.ipvsvm.ensure_vm``, shared with
``minikproxy bench``) into ``$MINIKPROXY_IPVS_VM`` (default
``/var/cache/minikproxy/ipvs-vm``; the build apt-downloads the kernel package). Emulation makes
Python 9-20x slower inside, hence the generous timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minikproxy.benchmark.ipvsvm import VM_DIR, ensure_vm, vm_argv
from minikproxy.testing.ipvsload import kernel_has_ipvs

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VM_TIMEOUT = 1200


@pytest.mark.skipif(kernel_has_ipvs(), reason="this kernel has IPVS: the ipvs tests run directly")
@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_ipvs_marked_tests_pass_in_an_ipvs_kernel() -> None:
    ensure_vm(VM_DIR)  # the bench's own VM handling (minikproxy.benchmark.ipvsvm)
    # Only the files holding ipvs tests: collecting the whole suite under emulation costs ~1 min.
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests" / "kernel").glob("test_ipvs_*.py")
        if p.name != Path(__file__).name
    )
    argv = vm_argv([
        "env", "MINIKPROXY_TIME_SCALE=10",
        sys.executable, "-m", "pytest", "-q", "-m", "ipvs", "-p", "no:cacheprovider",
        "-o", "addopts=-ra --strict-markers", *files,
    ], VM_DIR)  # fmt: skip
    env = {**os.environ, "IPVS_VM_TIMEOUT": str(VM_TIMEOUT)}
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    output = run.stdout + run.stderr
    print(output)
    assert run.returncode == 0, f"IPVS tests failed in the VM (status {run.returncode}):\n{output}"
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) > 0, output
    assert " skipped" not in output.splitlines()[-1], "ipvs tests skipped inside the VM"
