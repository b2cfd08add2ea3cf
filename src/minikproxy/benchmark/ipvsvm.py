"""IPVS measured inside the IPVS VM, for a machine whose kernel has no IPVS.

``minikproxy bench`` re-runs itself inside the VM (``scripts/ipvs-vm.sh``: Debian's kernel
under qemu, this machine's files visible) with the internal flag ``--ipvs-vm-part DIR``:
``DIR`` (shared writable with the guest) holds the settings going in and ``results.json``
coming out. The guest measures what needs an IPVS kernel (first load and the ``ipvsadm -R``
baseline, the real controller, the data path) and, for the data path, iptables mode in the
same guest as the reference; the host then merges those records into its own, their modes
marked ``(VM)``: emulation makes their times comparable only with each other.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from minikproxy.benchmark.results import Record, Skipped, read_results, write_results
from minikproxy.benchmark.shield import stop_process_group

#: Appended to the mode of every record measured in the VM.
VM_SUFFIX = " (VM)"
#: The VM's kernel and initrd (built once by ``scripts/bootstrap.sh`` or :func:`ensure_vm`).
VM_DIR = Path(os.environ.get("MINIKPROXY_IPVS_VM", "/var/cache/minikproxy/ipvs-vm"))
#: Guest memory (MiB): the controller, the benchmark and the overlay's writes share it.
VM_MEMORY_MIB = 2048
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.json"


class VmError(RuntimeError):
    """The VM could not be built or booted, or its run failed; carries its output's end."""


def script() -> Path:
    """``scripts/ipvs-vm.sh`` of this source checkout."""
    path = Path(__file__).resolve().parents[3] / "scripts" / "ipvs-vm.sh"
    if not path.exists():
        raise VmError(f"{path} not found: the IPVS VM needs minikproxy's source checkout")
    return path


def ensure_vm(vm_dir: Path = VM_DIR) -> None:
    """Build the VM's kernel and initrd into ``vm_dir`` unless they are there."""
    if (vm_dir / "vmlinux").exists() and (vm_dir / "initrd.gz").exists():
        return
    vm_dir.parent.mkdir(parents=True, exist_ok=True)
    build = subprocess.run(
        ["bash", str(script()), "build", str(vm_dir)], capture_output=True, text=True, check=False
    )
    if build.returncode != 0:
        raise VmError(f"building the IPVS VM failed:\n{build.stdout}\n{build.stderr}")


def vm_argv(command: Sequence[str], vm_dir: Path = VM_DIR) -> list[str]:
    """The command line running ``command`` in the VM (in the current directory)."""
    return ["bash", str(script()), "run", str(vm_dir), "--", *command]


_PROGRESS = re.compile(
    r"^\[\s*\d+ s(?:, ~\d+ s left)?(?:, (?P<done>[\d.]+)% done)?\] (?P<step>.+)$"
)


@dataclass(frozen=True)
class GuestProgress:
    """A progress line of the VM's run: its step, and the share of the guest's plan done."""

    step: str
    done: float | None  # 0..1; None when the line does not say


def progress_text(line: str) -> GuestProgress | None:
    """What a progress line of the VM's run announces (None: not a progress line)."""
    match = _PROGRESS.match(line.strip())
    if match is None:
        return None
    done = match.group("done")
    return GuestProgress(match.group("step"), None if done is None else float(done) / 100)


def mark(mode: str) -> str:
    """The mode name of a record measured in the VM."""
    return mode + VM_SUFFIX


def is_vm(mode: str) -> bool:
    """Whether records of ``mode`` were measured in the VM."""
    return mode.endswith(VM_SUFFIX)


@dataclass
class VmOutcome:
    """The VM's records and skips (modes marked), and what the results header says of it."""

    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)


def merge(header: dict[str, Any], records: Sequence[Record], seconds: float) -> VmOutcome:
    """The VM's ``results.json`` (``header``, ``records``) as the host reports it: every mode
    marked :data:`VM_SUFFIX`, and the VM's machine, settings and duration for the header."""
    skipped = [Skipped(mark(s["mode"]), s["what"], s["reason"]) for s in header.get("skipped", [])]
    return VmOutcome(
        records=[replace(r, mode=mark(r.mode)) for r in records],
        skipped=skipped,
        header={
            "machine": header.get("machine", {}),
            "settings": header.get("settings", {}),
            "date": header.get("date"),
            "seconds": round(seconds, 1),
        },
    )


def run_vm_part(
    settings: dict[str, Any],
    timeout: float,
    show: Callable[[str], None] = lambda line: None,
    vm_dir: Path = VM_DIR,
) -> VmOutcome:
    """Boot the VM once, run ``minikproxy bench --ipvs-vm-part`` there with ``settings``
    (:func:`~minikproxy.cli_bench.settings_as_json`'s form), and return its merged outcome.
    ``show`` gets each line the guest prints. Interrupted (KeyboardInterrupt), the VM is
    stopped; every namespace it made dies with it."""
    ensure_vm(vm_dir)
    with tempfile.TemporaryDirectory(prefix="mkpb-ipvsvm-") as tmp:
        shared = Path(tmp)
        (shared / SETTINGS_FILE).write_text(json.dumps(settings))
        # The guest gets PATH and little else from the environment: pass what matters.
        guest_env = ["MINIKPROXY_TIME_SCALE=10"]
        if os.environ.get("PYTHONPATH"):
            guest_env.append(f"PYTHONPATH={os.environ['PYTHONPATH']}")
        command = ["env", *guest_env, sys.executable, "-m", "minikproxy", "bench",
                   "--ipvs-vm-part", str(shared)]  # fmt: skip
        env = {
            **os.environ,
            "IPVS_VM_RW": str(shared),
            "IPVS_VM_TIMEOUT": str(int(timeout)),
            "IPVS_VM_MEM": os.environ.get("IPVS_VM_MEM", str(VM_MEMORY_MIB)),
        }
        start = time.monotonic()
        tail: list[str] = []
        proc = subprocess.Popen(
            vm_argv(command, vm_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", env=env, start_new_session=True,
        )  # fmt: skip
        try:
            for line in _lines_of(proc):
                tail = [*tail[-19:], line]
                if line:
                    show(line)
            proc.wait()
        finally:
            _stop(proc)
        seconds = time.monotonic() - start
        results = shared / RESULTS_FILE
        if proc.returncode != 0 or not results.exists():
            output = "\n".join(tail)
            raise VmError(f"the IPVS VM's run exited {proc.returncode}:\n{output}")
        header, records = read_results(results)
    return merge(header, records, seconds)


def _lines_of(proc: subprocess.Popen[str]) -> Iterator[str]:
    """``proc``'s output lines, read in a thread: the guest may stay silent for many minutes,
    and a ^C the kernel hands another thread is seen only when the main thread runs Python
    code, so it waits for lines a little at a time."""
    lines: queue.Queue[str | BaseException | None] = queue.Queue()

    def pump() -> None:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line.rstrip())
        except BaseException as exc:  # handed to the reader, which raises it
            lines.put(exc)
        finally:
            lines.put(None)

    threading.Thread(target=pump, name="ipvs-vm-output", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            return
        if isinstance(line, BaseException):
            raise VmError(f"reading the IPVS VM's output failed: {line!r}") from line
        yield line


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the VM script and qemu (SIGTERM, so the script removes its run directory)."""
    stop_process_group(proc, 15)


def write_vm_results(directory: Path, header: dict[str, Any], records: Sequence[Record]) -> None:
    """Inside the VM: write the part's ``results.json`` into the shared ``directory``."""
    write_results(directory / RESULTS_FILE, header, records)


def read_vm_settings(directory: Path) -> dict[str, Any]:
    """Inside the VM: the settings the host wrote."""
    body: dict[str, Any] = json.loads((directory / SETTINGS_FILE).read_text())
    return body
