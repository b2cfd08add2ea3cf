"""Kernel parameters under ``/proc/sys``, read and written through an :class:`Execer`.

Through the execer (``cat`` and ``tee``, both in coreutils, which every Debian system has), not
``sysctl`` (procps, absent from slim images) nor an in-process write: kernel tests run the
controller in the test's process but point its execer at a network namespace, and the
``net.*`` parameters are per namespace.
"""

from __future__ import annotations

from minikproxy.dataplane.execer import Execer, ExecTimeoutError

_TIMEOUT = 5.0


class SysctlError(RuntimeError):
    """A parameter could not be read or written; the message says why."""


def _path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def _error(name: str, what: str, err: OSError | ExecTimeoutError | bytes) -> SysctlError:
    detail = err.decode(errors="replace").strip() if isinstance(err, bytes) else str(err)
    return SysctlError(f"cannot {what} {name}: {detail}")


def get_sysctl(execer: Execer, name: str) -> str:
    """The value of ``name`` (``net.ipv4.conf.all.route_localnet``), stripped."""
    try:
        result = execer.run(["cat", _path(name)], timeout=_TIMEOUT)
    except (OSError, ExecTimeoutError) as err:
        raise _error(name, "read", err) from None
    if result.returncode != 0:
        raise _error(name, "read", result.stderr)
    return result.stdout.decode(errors="replace").strip()


def ensure_sysctl(execer: Execer, name: str, value: str) -> bool:
    """Set ``name`` to ``value`` unless it already has it (kube-proxy's ``ensureSysctl``).

    Return True if it was written. Raise :class:`SysctlError` when it cannot be read or
    written (a container without a writable ``/proc/sys`` gets ``Read-only file system``).
    """
    if get_sysctl(execer, name) == value:
        return False
    try:
        result = execer.run(["tee", _path(name)], stdin=value.encode() + b"\n", timeout=_TIMEOUT)
    except (OSError, ExecTimeoutError) as err:
        raise _error(name, "set", err) from None
    if result.returncode != 0:
        raise _error(name, "set", result.stderr)
    return True


__all__ = ["SysctlError", "ensure_sysctl", "get_sysctl"]
