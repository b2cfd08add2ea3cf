"""iptables, driven the way kube-proxy drives it.

Rules are written with one ``iptables-restore --noflush --counters`` per sync (atomic per
table: a failed restore leaves the kernel's previous rules of that table untouched), and the
few jump rules in built-in chains are ensured with single ``iptables -C`` / ``-I`` calls.

The binaries are backend-specific (``iptables-nft-restore``, ``ip6tables-legacy-save``...), so
the backend the node already uses is picked once with :func:`detect_backend` and never mixed:
rules of both backends take effect, but neither backend lists the other's.

All commands go through an :class:`~minikproxy.dataplane.execer.Execer`; nothing here calls
:mod:`subprocess` directly.
"""

from __future__ import annotations

import itertools
import logging
import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from minikproxy.dataplane.execer import Execer, ExecError, ExecResult
from minikproxy.model.names import IPFamily

logger = logging.getLogger(__name__)

IptablesBackend = Literal["nft", "legacy"]

#: iptables exits with this status when a rule or chain "does not exist" (-C, -N, -X...).
EXIT_NOT_FOUND = 1

#: Chains whose presence in the mangle table names the backend the node's kubelet uses (the
#: first check of kubernetes-sigs/iptables-wrappers).
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")

#: ``--random-fully`` for MASQUERADE arrived in iptables 1.6.2 (kube-proxy's check).
RANDOM_FULLY_MIN_VERSION = (1, 6, 2)

_DETECT_TIMEOUT = 5.0
_BACKENDS: tuple[IptablesBackend, ...] = ("nft", "legacy")
_FAMILIES: tuple[IPFamily, ...] = ("IPv4", "IPv6")
_VERSION_RE = re.compile(rb"v(\d+)\.(\d+)\.(\d+)")
# iptables-restore reports a failing line in several ways depending on backend and error:
#   "Error occurred at line: 12"              (parse errors, both backends)
#   "iptables-restore: line 12 failed"        (legacy commit errors; nft: "line 12 failed: ...")
#   "COMMIT expected at line 12", "line 1 table name 'x' invalid", "line 2: CHAIN_DEL failed"
_LINE_RES = (
    re.compile(r"Error occurred at line: (\d+)"),
    re.compile(r"\bline (\d+) failed"),
    re.compile(r"\bline:? (\d+)\b"),
)
# iptables-nft reports a jump to a missing chain at the table's COMMIT line, naming the chain.
_MISSING_CHAIN_RE = re.compile(r"Chain '([^']+)' does not exist")
_JUMP_OPTIONS = frozenset({"-j", "--jump", "-g", "--goto"})


class IptablesError(RuntimeError):
    """An iptables command failed.

    ``returncode`` and ``stderr`` are the tool's. For restore failures ``line`` is the 1-based
    line of the restore input that failed and ``line_text`` its text, or None when the tool did
    not say. ``reported_line`` is the line number as the tool printed it: they differ only when
    iptables-nft blamed a table's ``COMMIT`` for a jump to a missing chain and ``line`` was
    mapped back to the first rule of that table jumping there.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        line: int | None = None,
        line_text: str | None = None,
        reported_line: int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.line = line
        self.line_text = line_text
        self.reported_line = reported_line if reported_line is not None else line
        details = [message]
        if line is not None:
            details.append(f"at line {line}: {line_text!r}")
        if stderr.strip():
            details.append(f"stderr: {stderr.strip()}")
        super().__init__("; ".join(details))


def _parse_reported_line(stderr: str) -> int | None:
    for pattern in _LINE_RES:
        match = pattern.search(stderr)
        if match:
            return int(match.group(1))
    return None


def locate_restore_error(data: bytes, stderr: str) -> tuple[int | None, str | None, int | None]:
    """Find the restore input line an ``iptables-restore`` error message refers to.

    Returns ``(line, line_text, reported_line)``: the 1-based line number (blank and comment
    lines count, as they do for iptables-restore), its text, and the number the tool printed.
    When iptables-nft blames a ``COMMIT`` for "Chain 'X' does not exist", ``line`` is moved to
    the first rule of that table jumping to X. All three are None if no line was reported;
    ``line_text`` is None if the number is outside ``data``.
    """
    reported = _parse_reported_line(stderr)
    if reported is None:
        return None, None, None
    lines = data.decode("utf-8", errors="replace").split("\n")
    if not 1 <= reported <= len(lines):
        return reported, None, reported
    line = reported
    missing = _MISSING_CHAIN_RE.search(stderr)
    if missing and lines[reported - 1].strip() == "COMMIT":
        culprit = _first_jump_to(lines, reported, missing.group(1))
        if culprit is not None:
            line = culprit
    return line, lines[line - 1], reported


def _first_jump_to(lines: Sequence[str], commit_line: int, chain: str) -> int | None:
    start = commit_line - 1
    while start > 0 and not lines[start - 1].startswith("*"):
        start -= 1
    for index in range(start, commit_line - 1):
        try:
            tokens = shlex.split(lines[index])
        except ValueError:
            continue
        for option, value in itertools.pairwise(tokens):
            if option in _JUMP_OPTIONS and value == chain:
                return index + 1
    return None


def binary_name(family: IPFamily, backend: IptablesBackend, tool: str = "") -> str:
    """The backend-specific binary, e.g. ``ip6tables-legacy-restore`` (``tool`` "" -> iptables)."""
    base = "ip6tables" if family == "IPv6" else "iptables"
    return f"{base}-{backend}-{tool}" if tool else f"{base}-{backend}"


def parse_chains(save_output: bytes) -> set[str]:
    """The chain names declared (``:NAME POLICY [p:b]`` lines) in ``iptables-save`` output."""
    chains: set[str] = set()
    for raw in save_output.splitlines():
        if raw.startswith(b":"):
            name = raw[1:].split(maxsplit=1)
            if name:
                chains.add(name[0].decode("utf-8", errors="replace"))
    return chains


def _save_score(execer: Execer, argv: Sequence[str]) -> int:
    """Rules plus KUBE-* chain declarations in one save output; 0 if the tool is unusable.

    Raise :class:`BackendDeniedError` if the tool exists but may not read the rules: an empty
    count would then be a guess, not a fact.
    """
    try:
        result = execer.run(argv, timeout=_DETECT_TIMEOUT)
    except (OSError, ExecError) as exc:
        logger.debug("backend detection: %s unusable: %s", argv[0], exc)
        return 0
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        if "Permission denied" in stderr:
            raise BackendDeniedError(f"{argv[0]}: {stderr}")
        logger.debug("backend detection: %s failed: %s", argv[0], stderr)
        return 0
    return sum(
        1
        for line in result.stdout.splitlines()
        if line.startswith(b"-") or line.startswith(b":KUBE-")
    )


def _has_hint_chain(execer: Execer, backend: IptablesBackend) -> bool:
    argv = [binary_name("IPv4", backend, "save"), "-t", "mangle"]
    try:
        result = execer.run(argv, timeout=_DETECT_TIMEOUT)
    except (OSError, ExecError):
        return False
    return result.returncode == 0 and bool(parse_chains(result.stdout) & set(HINT_CHAINS))


def detect_backend(execer: Execer) -> IptablesBackend:
    """Pick the iptables backend the node already uses, as kubernetes-sigs/iptables-wrappers do.

    1. If the IPv4 mangle table of one backend holds a ``KUBE-IPTABLES-HINT`` or
       ``KUBE-KUBELET-CANARY`` chain (created by the kubelet), that backend wins (nft checked
       first).
    2. Otherwise count, per backend, the rules (``-A`` lines) and ``KUBE-*`` chain declarations
       in ``iptables-<backend>-save`` plus ``ip6tables-<backend>-save``: the backend already
       holding more wins. Ties (including an empty node) go to nft, the modern default.

    A backend whose tools are missing, fail or hang (5 s) counts as empty. One whose rules
    cannot be read (legacy iptables without CAP_NET_RAW: ``Permission denied``) does not: it
    is reported with a warning, and if nf_tables holds nothing either, so that the choice
    would be a blind guess (the node may keep all its rules in legacy iptables),
    :class:`BackendDetectionError` is raised.
    """
    for backend in _BACKENDS:
        if _has_hint_chain(execer, backend):
            logger.info("iptables backend %s: found a kubelet hint chain", backend)
            return backend
    scores: dict[IptablesBackend, int] = {}
    denied: dict[IptablesBackend, str] = {}
    for backend in _BACKENDS:
        try:
            scores[backend] = sum(
                _save_score(execer, [binary_name(f, backend, "save")]) for f in _FAMILIES
            )
        except BackendDeniedError as err:
            denied[backend] = str(err)
    if denied:
        readable = [b for b in _BACKENDS if b not in denied]
        detail = "; ".join(denied.values())
        if not readable or not any(scores.values()):
            raise BackendDetectionError(
                f"cannot detect the iptables backend: {detail} (legacy iptables needs the "
                "NET_RAW capability), and the other backend holds no rules, so this node's "
                "rules may all be in the unreadable one; add NET_RAW or pass "
                "--iptables-backend nft|legacy"
            )
        logger.warning(
            "iptables backend %s: it holds rules, but %s (legacy iptables needs the NET_RAW "
            "capability); if this node uses the other backend, pass --iptables-backend",
            readable[0],
            detail,
        )
        return readable[0]
    chosen: IptablesBackend = "legacy" if scores["legacy"] > scores["nft"] else "nft"
    logger.info("iptables backend %s (rules: nft=%d legacy=%d)", chosen, *scores.values())
    return chosen


class BackendDetectionError(RuntimeError):
    """The iptables backend cannot be detected; the message says why and what to do."""


class BackendDeniedError(RuntimeError):
    """An iptables backend's rules could not be read (permission denied)."""


class IptablesRunner(Protocol):
    """iptables for one IP family: bulk restore plus the few single-rule operations kube-proxy
    needs. ``table``/``chain`` are names like ``"nat"``/``"KUBE-SERVICES"``; rule ``args`` are
    argv-style tokens after the chain (``["-m", "comment", "--comment", "x y", "-j", "X"]``).
    Failures raise :class:`IptablesError`."""

    @property
    def family(self) -> IPFamily:
        """The IP family this runner manages."""
        ...

    def restore(self, data: bytes, *, noflush: bool = True, counters: bool = True) -> None:
        """Apply ``iptables-restore`` input (one or more ``*table ... COMMIT`` blocks)."""
        ...

    def save(self, table: str) -> bytes:
        """``iptables-save`` output of one table."""
        ...

    def ensure_chain(self, table: str, chain: str) -> bool:
        """Create ``chain`` unless it exists; True if it was created."""
        ...

    def ensure_rule_prepended(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """Insert the rule at the top of ``chain`` unless present; True if it was inserted."""
        ...

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """Delete the rule if present (absent rule or chain is not an error); True if deleted."""
        ...

    def flush_chain(self, table: str, chain: str) -> None:
        """Remove every rule of ``chain`` (which must exist)."""
        ...

    def delete_chain(self, table: str, chain: str) -> None:
        """Delete an empty, unreferenced ``chain`` (absent chain is not an error)."""
        ...

    def chain_exists(self, table: str, chain: str) -> bool:
        """Tell whether ``chain`` exists in ``table``."""
        ...

    def list_chains(self, table: str) -> set[str]:
        """Every chain (built-in and user) of ``table``."""
        ...

    def has_random_fully(self) -> bool:
        """Tell whether MASQUERADE ``--random-fully`` is supported."""
        ...


class RealIptables:
    """:class:`IptablesRunner` running the real ``ip[6]tables-<backend>[-restore|-save]``.

    Every command passes ``-w WAIT_SECONDS`` (restore too: iptables >= 1.6.2 accepts it; the
    legacy backend needs it to wait for the xtables lock, nft ignores it). kube-proxy also
    passes ``-W`` (wait interval), which iptables 1.8.9 reports as deprecated, so it is not
    used. ``timeout`` bounds each command as a whole (None: no bound).
    """

    def __init__(
        self,
        execer: Execer,
        family: IPFamily = "IPv4",
        backend: IptablesBackend = "nft",
        *,
        wait_seconds: int = 5,
        timeout: float | None = None,
    ) -> None:
        self.execer = execer
        self._family: IPFamily = family
        self.backend: IptablesBackend = backend
        self.wait_seconds = wait_seconds
        self.timeout = timeout
        self._random_fully: bool | None = None

    @property
    def family(self) -> IPFamily:
        """The IP family this runner manages."""
        return self._family

    def _binary(self, tool: str = "") -> str:
        return binary_name(self._family, self.backend, tool)

    def _wait(self) -> list[str]:
        return ["-w", str(self.wait_seconds)]

    def _run(self, argv: Sequence[str], stdin: bytes | None = None) -> ExecResult:
        try:
            return self.execer.run(argv, stdin=stdin, timeout=self.timeout)
        except (OSError, ExecError) as exc:
            raise IptablesError(f"cannot run {argv[0]}: {exc}", argv=argv) from exc

    def _command(self, table: str, op: str, chain: str, args: Sequence[str] = ()) -> list[str]:
        return [self._binary(), *self._wait(), "-t", table, op, chain, *args]

    def _check(self, argv: Sequence[str], result: ExecResult) -> None:
        if result.returncode != 0:
            raise _command_error(argv, result)

    def restore(self, data: bytes, *, noflush: bool = True, counters: bool = True) -> None:
        """Feed ``data`` to ``ip[6]tables-<backend>-restore -w N [--noflush] [--counters]``.

        On failure raises :class:`IptablesError` with the failing input line (number and text)
        when the tool names one. Tables whose ``COMMIT`` came before the failing line are
        already applied; the failing table is left exactly as it was.
        """
        argv = [self._binary("restore"), *self._wait()]
        if noflush:
            argv.append("--noflush")
        if counters:
            argv.append("--counters")
        result = self._run(argv, data)
        if result.returncode == 0:
            return
        stderr = result.stderr.decode("utf-8", errors="replace")
        line, line_text, reported = locate_restore_error(data, stderr)
        raise IptablesError(
            f"{argv[0]} exited {result.returncode}",
            argv=argv,
            returncode=result.returncode,
            stderr=stderr,
            line=line,
            line_text=line_text,
            reported_line=reported,
        )

    def save(self, table: str) -> bytes:
        """Return ``ip[6]tables-<backend>-save -t TABLE`` output."""
        argv = [self._binary("save"), "-t", table]
        result = self._run(argv)
        self._check(argv, result)
        return result.stdout

    def ensure_chain(self, table: str, chain: str) -> bool:
        """``-N`` the chain; an existing chain is fine (returns False)."""
        argv = self._command(table, "-N", chain)
        result = self._run(argv)
        if result.returncode == 0:
            return True
        if result.returncode == EXIT_NOT_FOUND and self.chain_exists(table, chain):
            return False
        raise _command_error(argv, result)

    def _probe(self, argv: Sequence[str]) -> bool:
        """Run a query: exit 0 is yes, iptables' "not found" exit is no, anything else raises."""
        result = self._run(argv)
        if result.returncode == 0:
            return True
        if result.returncode == EXIT_NOT_FOUND:
            return False
        raise _command_error(argv, result)

    def _rule_exists(self, table: str, chain: str, args: Sequence[str]) -> bool:
        return self._probe(self._command(table, "-C", chain, args))

    def ensure_rule_prepended(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """``-C`` the rule, then ``-I`` it at position 1 if missing."""
        if self._rule_exists(table, chain, args):
            return False
        argv = self._command(table, "-I", chain, args)
        self._check(argv, self._run(argv))
        return True

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """``-C`` the rule, then ``-D`` it if present; True if it was deleted."""
        if not self._rule_exists(table, chain, args):
            return False
        argv = self._command(table, "-D", chain, args)
        self._check(argv, self._run(argv))
        return True

    def flush_chain(self, table: str, chain: str) -> None:
        """``-F`` the chain."""
        argv = self._command(table, "-F", chain)
        self._check(argv, self._run(argv))

    def delete_chain(self, table: str, chain: str) -> None:
        """``-X`` the chain; a chain that does not exist is fine."""
        argv = self._command(table, "-X", chain)
        result = self._run(argv)
        if result.returncode == 0:
            return
        if result.returncode == EXIT_NOT_FOUND and not self.chain_exists(table, chain):
            return
        raise _command_error(argv, result)

    def chain_exists(self, table: str, chain: str) -> bool:
        """``-S CHAIN`` succeeds (as kube-proxy's ChainExists)."""
        return self._probe(self._command(table, "-S", chain))

    def list_chains(self, table: str) -> set[str]:
        """The chains declared in ``save(table)``."""
        return parse_chains(self.save(table))

    def has_random_fully(self) -> bool:
        """True when ``iptables --version`` is at least 1.6.2 (cached after the first call)."""
        if self._random_fully is None:
            argv = [self._binary(), "--version"]
            result = self._run(argv)
            self._check(argv, result)
            self._random_fully = random_fully_supported(result.stdout + result.stderr)
        return self._random_fully


if TYPE_CHECKING:  # RealIptables implements IptablesRunner (checked by mypy)

    def _conforms(execer: Execer) -> IptablesRunner:
        return RealIptables(execer)


def random_fully_supported(version_output: bytes) -> bool:
    """Tell from ``iptables --version`` output whether ``--random-fully`` is supported."""
    match = _VERSION_RE.search(version_output)
    if match is None:
        return False
    version = tuple(int(part) for part in match.groups())
    return version >= RANDOM_FULLY_MIN_VERSION


def _command_error(argv: Sequence[str], result: ExecResult) -> IptablesError:
    return IptablesError(
        f"{' '.join(argv)} exited {result.returncode}",
        argv=argv,
        returncode=result.returncode,
        stderr=result.stderr.decode("utf-8", errors="replace"),
    )


__all__ = [
    "EXIT_NOT_FOUND",
    "HINT_CHAINS",
    "RANDOM_FULLY_MIN_VERSION",
    "BackendDetectionError",
    "IptablesBackend",
    "IptablesError",
    "IptablesRunner",
    "RealIptables",
    "binary_name",
    "detect_backend",
    "locate_restore_error",
    "parse_chains",
    "random_fully_supported",
]
