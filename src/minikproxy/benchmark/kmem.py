"""Kernel memory a ruleset takes, where the kernel says: the legacy x_tables backend reports
each table's rule blob size (``IPT_SO_GET_INFO``, what ``iptables-legacy-save`` reads
first). nf_tables has no such figure (its objects are spread over generic slab caches that
every namespace on the machine shares), so it is not measured there."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct

from minikproxy.dataplane.nsenter import run_in_netns

_SOL_IP = 0
_IPT_SO_GET_INFO = 64
# struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
_GETINFO = struct.Struct("=32sI5I5III")
LEGACY_TABLES = ("filter", "nat", "mangle", "raw")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def table_info(fd: int, table: str) -> tuple[int, int] | None:
    """(rules, blob bytes) of legacy table ``table`` seen through raw socket ``fd``, or None
    when the table does not exist there."""
    buf = ctypes.create_string_buffer(_GETINFO.pack(table.encode(), 0, *[0] * 10, 0, 0))
    length = ctypes.c_uint32(_GETINFO.size)
    if _libc().getsockopt(fd, _SOL_IP, _IPT_SO_GET_INFO, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        if err == 2:  # ENOENT: no such table (its module loaded or not)
            return None
        raise OSError(err, f"IPT_SO_GET_INFO {table}: {os.strerror(err)}")
    fields = _GETINFO.unpack(buf.raw[: _GETINFO.size])
    return fields[-2], fields[-1]


def legacy_table_bytes(netns: str) -> int:
    """The summed rule blob size of the legacy tables in ``netns`` (bytes)."""

    def read() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            total = 0
            for table in LEGACY_TABLES:
                info = table_info(sock.fileno(), table)
                if info is not None:
                    total += info[1]
            return total

    return run_in_netns(netns, read)
