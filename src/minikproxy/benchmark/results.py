"""Benchmark records and ``results.json``: ``{"header": {...}, "records": [...]}``.

A record is one figure of one mode at one cluster size: ``{"mode", "size", "endpoints",
"metric", "unit", "median", "min", "max", "p95", "rounds"}``. The header names the machine
(cores, memory, kernel, iptables and nft versions, CPU model, load average), minikproxy's
version, the date, the run's settings and what was skipped, with why.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minikproxy import __version__
from minikproxy.benchmark.stats import summarize

RECORD_KEYS = (
    "mode",
    "size",
    "endpoints",
    "metric",
    "unit",
    "median",
    "min",
    "max",
    "p95",
    "rounds",
)


@dataclass(frozen=True)
class Record:
    """One figure: a summary of ``rounds`` samples of ``metric`` (in ``unit``)."""

    mode: str
    size: int
    endpoints: int
    metric: str
    unit: str
    median: float
    min: float
    max: float
    p95: float
    rounds: int

    @classmethod
    def of(
        cls, mode: str, size: int, endpoints: int, metric: str, unit: str, values: Sequence[float]
    ) -> Record:
        """Summarize ``values`` (already in ``unit``) into a record."""
        s = summarize(values)
        return cls(mode, size, endpoints, metric, unit, s.median, s.min, s.max, s.p95, s.rounds)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (the keys of :data:`RECORD_KEYS`, in that order)."""
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    """Something not measured, and why."""

    mode: str
    what: str
    reason: str


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_mib() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0


def machine_info() -> dict[str, Any]:
    """The machine the run is on (read once, at the start)."""
    return {
        "cores": os.cpu_count(),
        "memory_mib": _memory_mib(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "iptables": _first_line(["iptables", "--version"]),
        "nft": _first_line(["nft", "--version"]),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def now_utc() -> str:
    """The current time, UTC, ISO 8601 (seconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def make_header(
    settings: dict[str, Any],
    skipped: Iterable[Skipped],
    *,
    machine: dict[str, Any] | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """The results header: machine, version, date (UTC, ISO 8601), settings, skipped.
    ``machine`` and ``date`` are best read when the run starts (default: now)."""
    return {
        "minikproxy_version": __version__,
        "date": date or now_utc(),
        "machine": machine or machine_info(),
        "settings": settings,
        "skipped": [asdict(s) for s in skipped],
    }


def write_results(path: Path, header: dict[str, Any], records: Iterable[Record]) -> None:
    """Write ``results.json``."""
    body = {"header": header, "records": [r.to_json() for r in records]}
    path.write_text(json.dumps(body, indent=1) + "\n")


def read_results(path: Path) -> tuple[dict[str, Any], list[Record]]:
    """Read a ``results.json``; raise ValueError naming the record and key when malformed."""
    body = json.loads(path.read_text())
    if not isinstance(body, dict) or "header" not in body or "records" not in body:
        raise ValueError(f"{path}: expected an object with 'header' and 'records'")
    records = []
    for index, item in enumerate(body["records"]):
        if not isinstance(item, dict) or set(item) != set(RECORD_KEYS):
            raise ValueError(f"{path}: record {index} must have exactly the keys {RECORD_KEYS}")
        records.append(Record(**item))
    return body["header"], records
