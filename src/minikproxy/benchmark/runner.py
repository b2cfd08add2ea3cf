"""A whole benchmark run: every mode at every size, step by step, into records.

For each size a cluster is built once; for each mode then: compile, first loads into empty
namespaces, then a :class:`~minikproxy.testing.netns.Topology` in which the real controller
syncs the cluster and takes the update rounds, and whose rules (left by the controller, or
loaded directly when the controller cannot run this mode) carry the data-path probes; at
the sizes asked for, the iptables apply strategies (legacy backend). Every namespace is
named after :attr:`Settings.prefix` and deleted on the way out, interrupted or not.

IPVS: its compile is measured here like every mode's; its kernel parts (first load against
the stock tools' ``ipvsadm -R`` baseline, the controller, the data path) here too when this
kernel has IPVS, else in the IPVS VM (:mod:`.ipvsvm`, one boot for every size of
:attr:`Settings.vm_sizes`), with iptables mode's data path measured there as the reference.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from minikproxy.benchmark import ALL_MODES, DEFAULT_SIZES, ipvsvm, strategies
from minikproxy.benchmark.adapters import ADAPTERS, MISSING, IptablesNft, Ipvs, ModeAdapter
from minikproxy.benchmark.cluster import backend_addresses
from minikproxy.benchmark.live import ControllerError, run_live
from minikproxy.benchmark.measure import (
    Cluster,
    CompileResults,
    Scratch,
    build_cluster,
    datapath_topology,
    load_direct,
    measure_compile,
    measure_datapath,
    measure_load,
    measure_tool_baseline,
    scratch_namespaces,
)
from minikproxy.benchmark.probing import ProbeError, Prober
from minikproxy.benchmark.results import Record, Skipped
from minikproxy.benchmark.stats import percentile, summarize
from minikproxy.testing.ipvsload import kernel_has_ipvs
from minikproxy.testing.netns import Topology

_T = TypeVar("_T")

#: Sizes of IPVS in the VM by default: 1k took 19 min there on this project's loaded 2-core
#: machine (16-61 s per first load alone), so larger sizes are asked for with --ipvs-vm-sizes.
DEFAULT_VM_SIZES = (1000,)


@dataclass(frozen=True)
class Settings:
    """What one run measures, and how often."""

    modes: tuple[str, ...] = ALL_MODES
    sizes: tuple[int, ...] = DEFAULT_SIZES
    endpoints: int = 10
    rounds: int = 10  # compile rounds
    load_rounds: int = 3
    update_rounds: int = 20  # of each kind of update
    connections: int = 1000  # connect-latency samples
    rate_rounds: int = 5
    rate_seconds: float = 1.0
    strategy_sizes: tuple[int, ...] = (1000,)
    strategy_rounds: int = 3
    sync_timeout: float = 900.0
    #: Sizes IPVS's kernel parts run at in the IPVS VM (emulated: 10-20x slower).
    vm_sizes: tuple[int, ...] = DEFAULT_VM_SIZES
    #: This run is the VM's part of another (``--ipvs-vm-part``): IPVS's kernel parts only.
    vm_part: bool = False
    prefix: str = field(default_factory=lambda: f"mkpb{secrets.token_hex(3)}")

    @classmethod
    def quick(cls, **overrides: Any) -> Settings:
        """``--quick``: 1k Services only, few rounds (under 3 minutes)."""
        base: dict[str, Any] = dict(
            sizes=(1000,), rounds=3, load_rounds=2, update_rounds=5, connections=200,
            rate_rounds=2, rate_seconds=0.5, strategy_rounds=1, sync_timeout=120.0,
            vm_sizes=(),  # the IPVS VM's part alone takes minutes: see QUICK_WITHOUT_VM
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)


#: Step weights for the time-left estimate (per 1000 Services).
STEP_WEIGHT = {"compile": 1.0, "load": 2.0, "controller": 6.0, "datapath": 2.0, "strategies": 4.0}
#: Weight of IPVS's part in the VM, per 1000 Services: 1k took 19 min there, about what
#: 400 units of the host's steps take on the same machine.
VM_WEIGHT = 400.0
#: Seconds the VM may take per 1000 Services (and for booting), before it is stopped.
VM_SECONDS_PER_1000 = 3600.0
VM_BOOT_SECONDS = 300.0


#: Why ``--quick`` leaves the IPVS VM out (measured on this project's 2-core machine).
QUICK_WITHOUT_VM = (
    "not in --quick (1000 Services in under 3 minutes): the IPVS VM's part took 80 s at 50 "
    "Services on a quiet machine and 19 min at 1000 under load (emulation: each tool "
    "process and controller sync is 10-50x slower); --ipvs-vm-sizes adds it, and the "
    "ipvs-marked test tests/kernel/test_ipvs_bench.py runs it at 5 Services in CI's IPVS VM"
)


def ipvs_in_vm(settings: Settings) -> bool:
    """Whether IPVS's kernel parts belong in the IPVS VM (this kernel has none): then only
    its compile runs here."""
    return "ipvs" in settings.modes and not settings.vm_part and not kernel_has_ipvs()


class Progress:
    """Where the run is: the caller shows it (``update(description, advance)``)."""

    def __init__(self, total: float, show: Callable[[str, float], None]) -> None:
        self.total = total
        self._show = show

    def step(self, text: str, weight: float = 0.0) -> None:
        """Announce ``text`` and count ``weight`` units of work done."""
        self._show(text, weight)


def plan_weight(settings: Settings) -> float:
    """Total work units of a run (for the time-left estimate)."""
    total = 0.0
    vm = ipvs_in_vm(settings)
    for size in settings.sizes:
        for mode in settings.modes:
            if mode not in ADAPTERS:
                continue
            if mode == "ipvs" and vm:
                total += size / 1000 * STEP_WEIGHT["compile"]
                continue
            total += size / 1000 * sum(w for step, w in STEP_WEIGHT.items() if step != "strategies")
            if mode == "iptables-legacy" and size in settings.strategy_sizes:
                total += size / 1000 * STEP_WEIGHT["strategies"]
    if vm:
        total += sum(settings.vm_sizes) / 1000 * VM_WEIGHT
    return total


@dataclass
class Outcome:
    """Records and what was skipped."""

    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: Added to the results header (``ipvs_vm``: the VM's machine, settings, duration).
    header: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs :class:`Settings` and collects an :class:`Outcome` (also partly, if interrupted)."""

    def __init__(self, settings: Settings, progress: Progress, workdir: Path) -> None:
        self.settings = settings
        self.progress = progress
        self.workdir = workdir
        self.outcome = Outcome()
        self._topologies = 0

    def _add(self, mode: str, size: int, metric: str, unit: str, values: list[float]) -> None:
        if values:
            self.outcome.records.append(
                Record.of(mode, size, self.settings.endpoints, metric, unit, values)
            )

    def _skip(self, mode: str, what: str, reason: str) -> None:
        self.outcome.skipped.append(Skipped(mode, what, " ".join(reason.split())))

    def run(self) -> Outcome:
        """Measure everything; return what was measured."""
        s = self.settings
        if s.vm_part:
            return self._run_vm_part()
        for mode in s.modes:
            if mode not in ADAPTERS:
                self._skip(mode, "everything", MISSING.get(mode, "no such mode"))
        vm = ipvs_in_vm(s)
        with scratch_namespaces(s.prefix) as scratch:
            for size in s.sizes:
                self.progress.step(f"{size} Services: building the cluster")
                cluster = build_cluster(size, s.endpoints)
                for mode in s.modes:
                    if mode == "ipvs" and vm:
                        self._compile(Ipvs(), cluster)  # pure: here, comparable with the others
                        self.progress.step(f"ipvs @ {size}: compiled", size / 1000)
                    elif mode in ADAPTERS:
                        self._run_mode(ADAPTERS[mode](), cluster, scratch)
        if vm and s.vm_sizes:
            self._ipvs_in_vm()
        elif vm:
            self._skip(ipvsvm.mark("ipvs"), "first load, baseline, controller, data path",
                       QUICK_WITHOUT_VM)  # fmt: skip
        return self.outcome

    def _run_vm_part(self) -> Outcome:
        """Inside the IPVS VM: IPVS's kernel parts at each size, and iptables mode's data path
        as the reference."""
        s = self.settings
        with scratch_namespaces(s.prefix) as scratch:
            for size in s.sizes:
                self.progress.step(f"{size} Services: building the cluster")
                cluster = build_cluster(size, s.endpoints)
                self._run_mode(Ipvs(), cluster, scratch, compile=False)
                self.progress.step(f"iptables @ {size}: data path (the VM's reference)")
                reference = partial(self._reference_datapath, IptablesNft(), cluster)
                self._guarded("iptables", size, "data path", reference)
        return self.outcome

    def _ipvs_in_vm(self) -> None:
        """IPVS's kernel parts in the IPVS VM, merged into this run's outcome."""
        from minikproxy.cli_bench import settings_as_json

        s = self.settings
        vm_settings = {**settings_as_json(s), "sizes": list(s.vm_sizes), "vm_part": True,
                       "modes": ["ipvs", "iptables"]}  # fmt: skip
        timeout = VM_BOOT_SECONDS + sum(s.vm_sizes) / 1000 * VM_SECONDS_PER_1000
        sizes = ", ".join(str(x) for x in s.vm_sizes)
        self.progress.step(f"ipvs in the IPVS VM ({sizes} Services): booting")
        weight = sum(s.vm_sizes) / 1000 * VM_WEIGHT
        counted = [0.0]  # of weight, advanced as the guest reports its share done

        def show(line: str) -> None:
            guest = ipvsvm.progress_text(line)
            if guest is None:
                return
            advance = 0.0
            if guest.done is not None and guest.done * weight > counted[0]:
                advance = guest.done * weight - counted[0]
                counted[0] += advance
            self.progress.step(f"ipvs in the VM: {guest.step}", advance)

        try:
            vm = ipvsvm.run_vm_part(vm_settings, timeout, show)
        except ipvsvm.VmError as exc:
            self._skip(ipvsvm.mark("ipvs"), "everything in the IPVS VM", str(exc)[-1500:])
            return
        finally:
            self.progress.step("ipvs in the VM: done", weight - counted[0])
        self.outcome.records += vm.records
        self.outcome.skipped += vm.skipped
        self.outcome.header["ipvs_vm"] = vm.header

    def _compile(self, adapter: ModeAdapter, cluster: Cluster) -> CompileResults | None:
        s, mode, size = self.settings, adapter.name, cluster.size
        self.progress.step(f"{mode} @ {size}: compile")
        compiled = self._guarded(mode, size, "compile",
                                 lambda: measure_compile(adapter, cluster, s.rounds))  # fmt: skip
        if compiled is not None:
            self._add(mode, size, "compile_full", "ms", [x * 1e3 for x in compiled.full])
            self._add(mode, size, "compile_one_change", "ms",
                      [x * 1e3 for x in compiled.incremental])  # fmt: skip
            assert compiled.size is not None
            for metric, value in asdict(compiled.size).items():
                unit_name = "bytes" if metric == "bytes" else "count"
                self._add(mode, size, f"ruleset_{metric}", unit_name, [float(value)])
        return compiled

    def _run_mode(
        self, adapter: ModeAdapter, cluster: Cluster, scratch: Scratch, *, compile: bool = True
    ) -> None:
        s, mode, size = self.settings, adapter.name, cluster.size
        unit = size / 1000
        reason = adapter.unavailable()
        if reason is not None:
            self._skip(mode, "everything", reason)
            return
        where = f"{mode} @ {size}"
        compiled = self._compile(adapter, cluster) if compile else None
        self.progress.step(
            f"{where}: first load into empty namespaces", unit * STEP_WEIGHT["compile"]
        )
        loads = self._guarded(
            mode, size, "first load", lambda: measure_load(adapter, cluster, scratch, s.load_rounds)
        )
        if loads is not None:
            self._add(mode, size, "load_total", "s", loads.total)
            self._add(mode, size, "load_ours", "s", loads.ours)
            self._add(mode, size, "load_kernel", "s", loads.kernel)
            self._add(mode, size, "kernel_table_bytes", "bytes", loads.kernel_bytes)
        if isinstance(adapter, Ipvs):
            self.progress.step(f"{where}: the stock tools' load (ipvsadm -R baseline)")
            text = compiled.text if compiled is not None else self._render(adapter, cluster)
            base = self._guarded(
                mode, size, "ipvsadm -R baseline",
                lambda: measure_tool_baseline(text, scratch, s.load_rounds),
            )  # fmt: skip
            if base:
                self._add(mode, size, "load_baseline_tools", "s", base)
                if loads is not None:
                    ratio = summarize(loads.total).median / summarize(base).median
                    self._add(mode, size, "load_vs_baseline", "x", [ratio])
        self.progress.step(
            f"{where}: controller first sync and updates", unit * STEP_WEIGHT["load"]
        )
        self._guarded(mode, size, "topology", lambda: self._in_topology(adapter, cluster))
        self.progress.step(f"{where}: done", unit * STEP_WEIGHT["datapath"])
        if mode == "iptables-legacy" and size in s.strategy_sizes and compiled is not None:
            self.progress.step(f"{where}: iptables-restore vs python-iptables")
            text = compiled.text
            self._guarded(mode, size, "apply strategies",
                          lambda: self._strategies(mode, size, text, scratch))  # fmt: skip
            self.progress.step(f"{where}: done", unit * STEP_WEIGHT["strategies"])

    def _guarded(self, mode: str, size: int, what: str, fn: Callable[[], _T]) -> _T | None:
        """``fn()``, or None when it fails: one failed measurement (a tool timing out on a
        busy machine, say) is reported as skipped, and the run goes on."""
        try:
            return fn()
        except Exception as exc:
            self._skip(mode, f"{what} at {size}", f"{type(exc).__name__}: {exc}")
            return None

    def _in_topology(self, adapter: ModeAdapter, cluster: Cluster) -> None:
        """The controller's first sync and updates, then the data path, in one topology."""
        s, mode, size = self.settings, adapter.name, cluster.size
        self._topologies += 1
        backends = backend_addresses(s.endpoints)
        with self._topology(backends) as (topo, prober):
            try:
                live = run_live(
                    adapter, topo.namespaces["node"], prober, cluster.objects, self.workdir,
                    rounds=s.update_rounds, endpoints=s.endpoints, sync_timeout=s.sync_timeout,
                )  # fmt: skip
            except (ControllerError, TimeoutError) as exc:
                self._skip(mode, f"controller: first sync, RSS, update latency at {size}",
                           str(exc))  # fmt: skip
                live = None
            if live is not None:
                self._add(mode, size, "controller_first_sync", "s", [live.first_sync])
                self._add(mode, size, "controller_rss", "MiB", [live.rss_mib])
                for kind, values in live.updates.items():
                    self._add(mode, size, f"update_{kind}", "ms", [x * 1e3 for x in values])
            self.progress.step(f"{mode} @ {size}: data path",
                               size / 1000 * STEP_WEIGHT["controller"])  # fmt: skip
            if live is None:
                # The controller left nothing (or something partial): load the rules directly.
                topo.reset_rules()
                self._load_direct(adapter, topo, cluster)
            self._datapath(mode, size, prober)

    @staticmethod
    def _render(adapter: ModeAdapter, cluster: Cluster) -> str:
        mode = adapter.build()
        try:
            text: str = adapter.compile(mode, cluster.snapshot.state).render()
            return text
        finally:
            mode.close()

    @staticmethod
    def _load_direct(adapter: ModeAdapter, topo: Topology, cluster: Cluster) -> None:
        """The mode's full apply of the cluster into the topology's node."""
        load_direct(adapter, topo.namespaces["node"], cluster)

    def _reference_datapath(self, adapter: ModeAdapter, cluster: Cluster) -> None:
        """The data path of ``adapter``'s rules loaded directly (no controller)."""
        self._topologies += 1
        with self._topology(backend_addresses(self.settings.endpoints)) as (topo, prober):
            self._load_direct(adapter, topo, cluster)
            self._datapath(adapter.name, cluster.size, prober)

    def _topology(
        self, backends: tuple[str, ...]
    ) -> AbstractContextManager[tuple[Topology, Prober]]:
        return datapath_topology(backends, f"{self.settings.prefix}-t{self._topologies}")

    def _datapath(self, mode: str, size: int, prober: Prober) -> None:
        s = self.settings
        try:
            result = measure_datapath(prober, s.connections, s.rate_rounds, s.rate_seconds)
        except ProbeError as exc:
            self._skip(mode, f"data path at {size}", str(exc))
            return
        micros = [x * 1e6 for x in result.latencies]
        self._add(mode, size, "connect_latency", "us", micros)
        self._add(mode, size, "connect_latency_p99", "us", [percentile(micros, 99)])
        self._add(mode, size, "connections_per_second", "conn/s", result.rates)
        self._add(mode, size, "connections_unanswered", "count", result.unanswered)

    def _strategies(self, mode: str, size: int, payload: str, scratch: Scratch) -> None:
        reason = strategies.python_iptables_missing()
        if reason is not None:
            self._skip(mode, "apply strategies", reason)
            return
        restore: list[float] = []
        python: list[float] = []
        for _ in range(self.settings.strategy_rounds):
            for loader, into in ((strategies.restore_load, restore),
                                 (strategies.python_iptables_load, python)):  # fmt: skip
                netns = scratch.fresh()
                try:
                    into.append(loader(payload, netns))
                finally:
                    scratch.drop(netns)
        self._add(mode, size, "apply_iptables_restore", "s", restore)
        self._add(mode, size, "apply_python_iptables", "s", python)


def run_benchmark(
    settings: Settings, show: Callable[[str, float], None], workdir: Path | None = None
) -> Outcome:
    """Run ``settings``; ``show(description, advance)`` reports progress."""
    progress = Progress(plan_weight(settings), show)
    if workdir is not None:
        return Runner(settings, progress, workdir).run()
    with tempfile.TemporaryDirectory(prefix="mkpbench-") as tmp:
        return Runner(settings, progress, Path(tmp)).run()
