"""The native cost of the netlink part of one IPVS endpoint change, measured piece by piece on
this machine, whose kernel has no IPVS (and whose VM is emulated, 10-20x slower).

A partial sync of one changed endpoint makes three kernel calls (bench/bench_ipvs_kernel.py
counts them in the IPVS VM): a get of the virtual server, a dump of its real servers (10 here)
and one write. Their native cost is: a pyroute2 request/answer round trip per call, as the
applier makes them (on its netlink worker thread), plus decoding the dump's answer. Both are
measured here natively:

- ``test_round_trip[read|write]``: one pyroute2 round trip through the same hop to a worker
  thread switched into a network namespace, as ``NetlinkIpvsKernel`` makes it; with ipset
  (netfilter netlink) standing in for IPVS (generic netlink), which this kernel lacks: the
  same pyroute2 request machinery, a different kernel handler (IPVS's own handling of a get,
  a 10-entry dump or a weight change is a hash lookup: microseconds).
- ``test_decode_real_server_dump``: pyroute2 decoding ten IPVS real-server messages as the
  kernel sends them (every attribute, both statistics blocks), and reading what the applier
  reads from each.

Add: one read + one dump (round trip + decode) + one write, to ``bench_ipvs.py``'s
end-to-end change with an in-memory kernel; that is the native estimate the README gives.

Run (root): .venv/bin/python -m pytest bench/bench_ipvs_netlink_parts.py --benchmark-only
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs

from minikproxy.dataplane.nsenter import enter_netns

REAL_SERVERS = 10
SET = "mkb-bench"


class NetnsWorker:
    """One thread in a fresh network namespace that owns a pyroute2 IPSet socket: the shape of
    ``NetlinkIpvsKernel`` (every call hops to its worker thread)."""

    def __init__(self) -> None:
        self.netns = f"mkpb-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.call(self._open)

    def _open(self) -> None:
        from pyroute2 import IPSet

        enter_netns(self.netns)
        self.ipset = IPSet()
        self.ipset.create(SET, stype="hash:ip")
        for k in range(REAL_SERVERS):
            self.ipset.add(SET, f"10.0.0.{k + 1}")

    def call(self, fn: Callable[[], Any]) -> Any:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self.call(self.ipset.close)
        self._pool.shutdown()
        subprocess.run(["ip", "netns", "del", self.netns], check=False)


@pytest.fixture(scope="module")
def worker() -> Iterator[NetnsWorker]:
    w = NetnsWorker()
    try:
        yield w
    finally:
        w.close()


@pytest.mark.parametrize("kind", ["read", "write"])
def test_round_trip(benchmark: Any, worker: NetnsWorker, kind: str) -> None:
    """A read (a 10-entry set listed) or a write (an entry added back), each one request
    and its answer through the worker thread."""
    if kind == "read":
        rows = benchmark(worker.call, lambda: list(worker.ipset.list(SET)))
        assert rows
    else:
        benchmark(worker.call, lambda: worker.ipset.add(SET, "10.0.0.1", exclusive=False))


def _real_server_message(k: int) -> bytes:
    stats = {"attrs": [(name, 1) for name, _ in ipvs.ipvsstats.stats.nla_map[1:]]}
    stats64 = {"attrs": [(name, 1) for name, _ in ipvs.ipvsstats.stats64.nla_map[1:]]}
    msg = ipvs.ipvsmsg()
    msg["cmd"] = ipvs.IPVS_CMD_NEW_DEST
    msg["version"] = ipvs.GENL_VERSION
    msg["attrs"] = [("IPVS_CMD_ATTR_DEST", {"attrs": [
        ("IPVS_DEST_ATTR_ADDR", f"10.244.0.{k + 1}"), ("IPVS_DEST_ATTR_PORT", 8080),
        ("IPVS_DEST_ATTR_FWD_METHOD", 0), ("IPVS_DEST_ATTR_WEIGHT", 1),
        ("IPVS_DEST_ATTR_U_THRESH", 0), ("IPVS_DEST_ATTR_L_THRESH", 0),
        ("IPVS_DEST_ATTR_ACTIVE_CONNS", 0), ("IPVS_DEST_ATTR_INACT_CONNS", 0),
        ("IPVS_DEST_ATTR_PERSIST_CONNS", 0), ("IPVS_DEST_ATTR_STATS", stats),
        ("IPVS_DEST_ATTR_ADDR_FAMILY", 2), ("IPVS_DEST_ATTR_STATS64", stats64),
    ]})]  # fmt: skip
    msg.encode()
    return bytes(msg.data)


def test_decode_real_server_dump(benchmark: Any) -> None:
    """Ten real-server messages decoded, with the fields ``NetlinkIpvsKernel.dests`` reads."""
    blobs = [_real_server_message(k) for k in range(REAL_SERVERS)]

    def decode() -> list[tuple[str, int, int]]:
        out = []
        for blob in blobs:
            msg = ipvs.ipvsmsg(blob)
            msg.decode()
            nla = msg.get_attr("IPVS_CMD_ATTR_DEST")
            out.append((
                str(nla.get_attr("IPVS_DEST_ATTR_ADDR")),
                int(nla.get_attr("IPVS_DEST_ATTR_PORT")),
                int(nla.get_attr("IPVS_DEST_ATTR_WEIGHT")),
            ))  # fmt: skip
        return out

    rows = benchmark(decode)
    assert rows[3] == ("10.244.0.4", 8080, 1)
