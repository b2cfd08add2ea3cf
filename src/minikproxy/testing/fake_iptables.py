"""An in-memory :class:`~minikproxy.dataplane.iptables.IptablesRunner` that keeps the kernel's
rules, for unit tests of code that applies iptables rules.

Like kube-proxy's ``pkg/util/iptables/testing`` fake (with ``parse.go``), it parses what it is
given into tables, chains and rules instead of storing bytes, and fails where iptables would:

* unknown tables, commands or options outside a table, a missing ``COMMIT``;
* ``-A``/``-I``/``-D``/``-F`` on a chain that does not exist, ``-N`` of an existing one;
* a jump (``-j``/``-g``) to a chain that is not defined at that line (the legacy backend checks
  each line as it comes, the stricter of the two backends), to a built-in chain, or to a NAT
  target (DNAT, SNAT, MASQUERADE, REDIRECT) outside the nat table;
* ``-X`` of a built-in, missing, non-empty or still referenced chain;
* a policy on a user-defined chain, chain names over 28 characters.

``--noflush`` semantics are those of iptables-restore: a ``:CHAIN`` line creates a user chain
or flushes it if it exists (built-in chains are not flushed, only their policy is set unless it
is ``-``); without ``--noflush`` each table named in the input is emptied first.

A restore is all-or-nothing per call: on any failure the state is left exactly as it was. (The
real ``iptables-restore`` is atomic per table: tables committed before the failing one stay
applied. Callers that force a full resync after any failure, as kube-proxy does, behave the
same either way.)

Rules keep the text they were given (after the chain name), so :meth:`FakeIptables.dump` of
compiler output reads like that output; rules given as argv tokens are joined with
iptables-save-like double quotes.
"""

from __future__ import annotations

import itertools
import re
import shlex
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minikproxy.dataplane.iptables import IptablesError, IptablesRunner
from minikproxy.model.names import IPFamily

#: The built-in chains of each table, in iptables-save order.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
TABLE_ORDER: tuple[str, ...] = tuple(BUILTIN_CHAINS)
#: Verdicts every table accepts as a jump target.
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
#: Target extensions the fake knows, with the tables they are restricted to (None: any).
EXTENSION_TARGETS: dict[str, frozenset[str] | None] = {
    "DNAT": frozenset({"nat"}),
    "SNAT": frozenset({"nat"}),
    "MASQUERADE": frozenset({"nat"}),
    "REDIRECT": frozenset({"nat"}),
    "NETMAP": frozenset({"nat"}),
    "CT": frozenset({"raw"}),
    "NOTRACK": frozenset({"raw"}),
    "TPROXY": frozenset({"mangle"}),
    "REJECT": None,
    "MARK": None,
    "CONNMARK": None,
    "LOG": None,
    "NFLOG": None,
    "NFQUEUE": None,
    "TCPMSS": None,
    "CLASSIFY": None,
    "DSCP": None,
    "TRACE": None,
}
#: Longest chain name the kernel accepts (XT_EXTENSION_MAXNAMELEN - 1).
MAX_CHAIN_NAME = 28

_JUMP_OPTIONS = frozenset({"-j", "--jump", "-g", "--goto"})
_COUNTERS_RE = re.compile(r"^\[\d+:\d+\]\s+")
_NEEDS_QUOTES_RE = re.compile(r"[\s\"'\\]")
_EXIT_SEMANTIC = 1  # iptables' exit status for commit-time failures ("line N failed")
_EXIT_PARSE = 2  # and for input it could not parse ("Error occurred at line: N")


def quote_arg(arg: str) -> str:
    """Render one argv token as iptables-save does: double quotes when it needs them."""
    if arg and not _NEEDS_QUOTES_RE.search(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Rule:
    """One rule of a chain: ``spec`` is its text after ``-A CHAIN``, ``args`` the same split
    into argv tokens (quotes removed)."""

    chain: str
    spec: str
    args: tuple[str, ...]

    @classmethod
    def from_args(cls, chain: str, args: Sequence[str]) -> Rule:
        """A rule from argv tokens (as given to ``iptables -A CHAIN ...``)."""
        return cls(chain, " ".join(quote_arg(a) for a in args), tuple(args))

    @classmethod
    def from_spec(cls, chain: str, spec: str) -> Rule:
        """A rule from restore text after the chain name; ValueError on unbalanced quotes."""
        return cls(chain, spec.strip(), tuple(shlex.split(spec)))

    def _jump(self) -> tuple[str, str] | None:
        found = None
        for option, value in itertools.pairwise(self.args):
            if option in _JUMP_OPTIONS:
                found = (option, value)
        return found

    @property
    def target(self) -> str | None:
        """The ``-j``/``-g`` target (the last one given), or None."""
        jump = self._jump()
        return jump[1] if jump else None

    @property
    def is_goto(self) -> bool:
        """True if the target is reached with ``-g`` (goto) rather than ``-j``."""
        jump = self._jump()
        return jump is not None and jump[0] in ("-g", "--goto")

    @property
    def comment(self) -> str | None:
        """The ``-m comment --comment`` text, or None."""
        for option, value in itertools.pairwise(self.args):
            if option == "--comment":
                return value
        return None

    def __str__(self) -> str:
        return f"-A {self.chain} {self.spec}" if self.spec else f"-A {self.chain}"


@dataclass
class _Chain:
    policy: str | None  # None for user-defined chains
    rules: list[Rule] = field(default_factory=list)

    def copy(self) -> _Chain:
        return _Chain(self.policy, list(self.rules))


_Table = dict[str, _Chain]


def _fresh_table(table: str) -> _Table:
    return {name: _Chain("ACCEPT") for name in BUILTIN_CHAINS[table]}


class _Failure(Exception):
    def __init__(self, message: str, line: int | None, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.code = code


class FakeIptables:
    """An in-memory iptables of one IP family (see the module docstring for its rules).

    ``restore_count`` counts :meth:`restore` calls (failed ones included) and ``last_restore``
    holds the input of the latest one. :meth:`fail_next_restore` makes the next restore fail.
    """

    def __init__(self, family: IPFamily = "IPv4", *, random_fully: bool = True) -> None:
        self._family: IPFamily = family
        self.random_fully = random_fully
        self._tables: dict[str, _Table] = {}
        self._lock = threading.Lock()
        self._fail_next: tuple[int | str | None] | None = None
        self.restore_count = 0
        self.last_restore: bytes | None = None

    @property
    def family(self) -> IPFamily:
        """The IP family this fake stands for."""
        return self._family

    # ---- test hooks and inspection -------------------------------------------------------

    def fail_next_restore(self, at: int | str | None = None) -> None:
        """Make the next :meth:`restore` fail without changing anything.

        ``at`` is the 1-based input line to blame, or text: the first line containing it. With
        None (or a line that is not in the input) the last non-blank line is blamed, as
        iptables-nft blames a table's COMMIT.
        """
        with self._lock:
            self._fail_next = (at,)

    def dump(self) -> str:
        """Every table in iptables-save form, tables in a fixed order, built-in chains first,
        then user chains sorted by name; rules keep their order within each chain."""
        with self._lock:
            return "".join(self._render(t) for t in TABLE_ORDER if t in self._tables)

    def load(self, text: str) -> None:
        """Replace the tables named in ``text`` (restore input, e.g. a :meth:`dump`) with its
        contents; not counted as a restore. Raises IptablesError if it does not parse."""
        with self._lock:
            self._apply(text.encode(), noflush=False, injected=None)

    def chains(self, table: str) -> list[str]:
        """The chains of ``table`` (built-in first, then user chains sorted); [] if the table
        was never used."""
        with self._lock:
            chains = self._tables.get(table, {})
            return [*_builtin_names(table, chains), *_user_names(chains)]

    def rules(self, table: str, chain: str) -> list[Rule]:
        """The rules of ``chain`` in order; KeyError if it does not exist."""
        with self._lock:
            try:
                return list(self._tables[table][chain].rules)
            except KeyError:
                raise KeyError(f"no chain {chain} in table {table}") from None

    def policy(self, table: str, chain: str) -> str | None:
        """The policy of a built-in chain (None for user chains); KeyError if missing."""
        with self._lock:
            return self._tables[table][chain].policy

    # ---- IptablesRunner ------------------------------------------------------------------

    def restore(self, data: bytes, *, noflush: bool = True, counters: bool = True) -> None:
        """Apply restore input all-or-nothing (``counters`` only allows ``[p:b]`` prefixes)."""
        del counters  # counters are accepted and ignored: the fake counts no packets
        with self._lock:
            self.restore_count += 1
            self.last_restore = data
            injected, self._fail_next = self._fail_next, None
            self._apply(data, noflush=noflush, injected=injected)

    def save(self, table: str) -> bytes:
        """One table in iptables-save form (an unknown table raises IptablesError)."""
        with self._lock:
            return self._render(table, self._table(table)).encode()

    def ensure_chain(self, table: str, chain: str) -> bool:
        """Create a user chain unless it exists; True if created."""
        with self._lock:
            chains = self._table(table)
            if chain in chains:
                return False
            self._command(lambda: _check_chain_name(chain))
            chains[chain] = _Chain(None)
            return True

    def ensure_rule_prepended(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """Insert the rule first in ``chain`` unless an identical rule is there; True if
        inserted. The chain and any jump target must exist."""
        with self._lock:
            chains = self._table(table)
            target = self._existing_chain(chains, chain)
            rule = Rule.from_args(chain, args)
            if rule in target.rules:
                return False
            self._command(lambda: _check_target(table, chains, rule))
            target.rules.insert(0, rule)
            return True

    def delete_rule(self, table: str, chain: str, args: Sequence[str]) -> bool:
        """Delete the first identical rule, if any (a missing chain is not an error)."""
        with self._lock:
            chains = self._table(table)
            rule = Rule.from_args(chain, args)
            if chain in chains and rule in chains[chain].rules:
                chains[chain].rules.remove(rule)
                return True
            return False

    def flush_chain(self, table: str, chain: str) -> None:
        """Empty ``chain``; IptablesError if it does not exist."""
        with self._lock:
            self._existing_chain(self._table(table), chain).rules.clear()

    def delete_chain(self, table: str, chain: str) -> None:
        """Delete an empty, unreferenced user chain (missing chains are fine)."""
        with self._lock:
            chains = self._table(table)
            if chain in chains:
                self._command(lambda: _delete_chain(chains, chain))

    def chain_exists(self, table: str, chain: str) -> bool:
        """True if ``chain`` exists in ``table``."""
        with self._lock:
            return chain in self._tables.get(table, {})

    def list_chains(self, table: str) -> set[str]:
        """Every chain of ``table`` (built-in ones included, as iptables-save lists them)."""
        with self._lock:
            return set(self._table(table))

    def has_random_fully(self) -> bool:
        """The ``random_fully`` given to the constructor."""
        return self.random_fully

    # ---- internals -----------------------------------------------------------------------

    def _table(self, table: str) -> _Table:
        if table not in BUILTIN_CHAINS:
            raise IptablesError(
                f"table {table!r} does not exist", returncode=3, stderr="Table does not exist"
            )
        return self._tables.setdefault(table, _fresh_table(table))

    def _existing_chain(self, chains: _Table, chain: str) -> _Chain:
        if chain not in chains:
            raise IptablesError(
                f"chain {chain} does not exist",
                returncode=_EXIT_SEMANTIC,
                stderr="iptables: No chain/target/match by that name.",
            )
        return chains[chain]

    @staticmethod
    def _command(check: Callable[[], None]) -> None:
        try:
            check()
        except _Failure as failure:
            raise IptablesError(
                failure.message, returncode=failure.code, stderr=f"iptables: {failure.message}"
            ) from None

    def _render(self, table: str, chains: _Table | None = None) -> str:
        chains = self._tables[table] if chains is None else chains
        names = [*_builtin_names(table, chains), *_user_names(chains)]
        out = [f"*{table}\n"]
        out += [f":{name} {chains[name].policy or '-'} [0:0]\n" for name in names]
        out += [f"{rule}\n" for name in names for rule in chains[name].rules]
        out.append("COMMIT\n")
        return "".join(out)

    def _apply(
        self, data: bytes, *, noflush: bool, injected: tuple[int | str | None] | None
    ) -> None:
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        try:
            if injected is not None:
                raise _Failure("injected failure", _injected_line(lines, injected[0]), 1)
            staged = _Restore(self._tables, noflush).run(lines)
        except _Failure as failure:
            line_text = lines[failure.line - 1] if failure.line is not None else None
            where = f"line {failure.line}" if failure.line is not None else "end of input"
            raise IptablesError(
                f"fake iptables-restore failed: {failure.message}",
                argv=["iptables-restore"],
                returncode=failure.code,
                stderr=f"iptables-restore: {failure.message}\nError occurred at {where}\n",
                line=failure.line,
                line_text=line_text,
            ) from None
        self._tables.update(staged)


def _builtin_names(table: str, chains: _Table) -> list[str]:
    return [name for name in BUILTIN_CHAINS.get(table, ()) if name in chains]


def _user_names(chains: _Table) -> list[str]:
    return sorted(name for name, chain in chains.items() if chain.policy is None)


def _injected_line(lines: Sequence[str], at: int | str | None) -> int | None:
    if isinstance(at, int) and 1 <= at <= len(lines):
        return at
    if isinstance(at, str):
        for number, line in enumerate(lines, 1):
            if at in line:
                return number
    for number in range(len(lines), 0, -1):
        if lines[number - 1].strip():
            return number
    return None


def _check_chain_name(name: str) -> None:
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise _Failure(f"invalid chain name {name!r}", None, _EXIT_PARSE)
    if len(name) > MAX_CHAIN_NAME:
        raise _Failure(f"chain name {name!r} longer than {MAX_CHAIN_NAME}", None, _EXIT_PARSE)
    if name in STANDARD_TARGETS or name in EXTENSION_TARGETS:
        raise _Failure(f"chain name {name!r} is a target name", None, _EXIT_PARSE)


def _check_target(table: str, chains: _Table, rule: Rule) -> None:
    target = rule.target
    if target is None or target in STANDARD_TARGETS:
        return
    if target in chains:
        if chains[target].policy is not None:
            raise _Failure(f"cannot jump to built-in chain {target}", None, _EXIT_PARSE)
        return
    if target in EXTENSION_TARGETS:
        allowed = EXTENSION_TARGETS[target]
        if allowed is not None and table not in allowed:
            raise _Failure(f"target {target} is not valid in table {table}", None, _EXIT_PARSE)
        return
    raise _Failure(f"Chain '{target}' does not exist", None, _EXIT_PARSE)


def _delete_chain(chains: _Table, name: str) -> None:
    chain = chains[name]
    if chain.policy is not None:
        raise _Failure(f"cannot delete built-in chain {name}", None, _EXIT_SEMANTIC)
    if chain.rules:
        raise _Failure(f"cannot delete chain {name}: not empty", None, _EXIT_SEMANTIC)
    users = [r for c in chains.values() for r in c.rules if r.target == name]
    if users:
        raise _Failure(f"cannot delete chain {name}: referenced by {users[0]}", None, 1)
    del chains[name]


class _Restore:
    """One restore call: applies lines to copies of the tables it touches."""

    def __init__(self, tables: dict[str, _Table], noflush: bool) -> None:
        self.tables = tables
        self.noflush = noflush
        self.staged: dict[str, _Table] = {}
        self.table: str | None = None
        self.line = 0

    def run(self, lines: Sequence[str]) -> dict[str, _Table]:
        for self.line, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                self._line(line)
            except _Failure as failure:
                failure.line = failure.line or self.line
                raise
        if self.table is not None:
            raise _Failure(f"COMMIT expected at line {self.line}", self.line, _EXIT_PARSE)
        return self.staged

    def _fail(self, message: str, code: int = _EXIT_PARSE) -> _Failure:
        return _Failure(message, self.line, code)

    def _line(self, line: str) -> None:
        if self.table is None:
            if not line.startswith("*"):
                raise self._fail("no table specified")
            self._start_table(line[1:].strip())
        elif line == "COMMIT":
            self.table = None
        elif line.startswith("*"):
            raise self._fail(f"COMMIT expected before line {self.line}")
        elif line.startswith(":"):
            self._declare(line[1:].split())
        else:
            self._command(_COUNTERS_RE.sub("", line))

    def _chains(self) -> _Table:
        assert self.table is not None
        return self.staged[self.table]

    def _start_table(self, name: str) -> None:
        if name not in BUILTIN_CHAINS:
            raise self._fail(f"table name '{name}' invalid")
        self.table = name
        if name not in self.staged:
            current = self.tables.get(name) or _fresh_table(name)
            self.staged[name] = {chain: c.copy() for chain, c in current.items()}
        if not self.noflush:
            chains = self.staged[name]
            for chain in list(chains):
                if chains[chain].policy is None:
                    del chains[chain]
                else:
                    chains[chain].rules.clear()

    def _declare(self, fields: Sequence[str]) -> None:
        if not fields:
            raise self._fail("empty chain declaration")
        name, policy = fields[0], fields[1] if len(fields) > 1 else "-"
        chains = self._chains()
        existing = chains.get(name)
        if existing is not None and existing.policy is not None:  # built-in: never flushed
            if policy != "-":
                existing.policy = self._checked_policy(policy)
            return
        if policy != "-":
            raise self._fail(f"Can't set policy `{policy}' on `{name}': user-defined chain")
        if existing is not None:
            existing.rules.clear()
        else:
            _check_chain_name(name)
            chains[name] = _Chain(None)

    def _checked_policy(self, policy: str) -> str:
        if policy not in ("ACCEPT", "DROP"):
            raise self._fail(f"bad policy {policy!r}")
        return policy

    def _command(self, line: str) -> None:
        fields = line.split(None, 2)
        op = fields[0]
        chain = fields[1] if len(fields) > 1 else None
        rest = fields[2] if len(fields) > 2 else ""
        handler = {
            "-A": self._append,
            "--append": self._append,
            "-I": self._insert,
            "--insert": self._insert,
            "-D": self._delete,
            "--delete": self._delete,
            "-N": self._new,
            "--new-chain": self._new,
            "-X": self._delete_chain,
            "--delete-chain": self._delete_chain,
            "-F": self._flush,
            "--flush": self._flush,
            "-P": self._policy,
            "--policy": self._policy,
            "-Z": self._zero,
            "--zero": self._zero,
        }.get(op)
        if handler is None:
            raise self._fail(f"unknown command {op!r}")
        handler(chain, rest)

    def _need_chain(self, chain: str | None) -> _Chain:
        if chain is None:
            raise self._fail("option requires a chain name")
        chains = self._chains()
        if chain not in chains:
            raise self._fail(f"chain {chain} does not exist: No chain/target/match by that name")
        return chains[chain]

    def _rule(self, chain: str, spec: str) -> Rule:
        try:
            rule = Rule.from_spec(chain, spec)
        except ValueError as exc:
            raise self._fail(f"bad quoting: {exc}") from None
        assert self.table is not None
        _check_target(self.table, self._chains(), rule)
        return rule

    def _append(self, chain: str | None, rest: str) -> None:
        target = self._need_chain(chain)
        assert chain is not None
        target.rules.append(self._rule(chain, rest))

    def _insert(self, chain: str | None, rest: str) -> None:
        target = self._need_chain(chain)
        assert chain is not None
        position = 1
        head, _, tail = rest.partition(" ")
        if head.isdigit():
            position, rest = int(head), tail
        if not 1 <= position <= len(target.rules) + 1:
            raise self._fail(f"Index of insertion too big: {position}", _EXIT_SEMANTIC)
        target.rules.insert(position - 1, self._rule(chain, rest))

    def _delete(self, chain: str | None, rest: str) -> None:
        target = self._need_chain(chain)
        assert chain is not None
        if rest.strip().isdigit():
            index = int(rest)
            if not 1 <= index <= len(target.rules):
                raise self._fail(f"Index of deletion too big: {index}", _EXIT_SEMANTIC)
            del target.rules[index - 1]
            return
        rule = self._rule(chain, rest)
        for index, existing in enumerate(target.rules):
            if existing.args == rule.args:
                del target.rules[index]
                return
        raise self._fail("Bad rule (does a matching rule exist in that chain?)", _EXIT_SEMANTIC)

    def _new(self, chain: str | None, rest: str) -> None:
        if chain is None:
            raise self._fail("-N requires a chain name")
        if chain in self._chains():
            raise self._fail(f"Chain already exists: {chain}", _EXIT_SEMANTIC)
        _check_chain_name(chain)
        self._chains()[chain] = _Chain(None)

    def _delete_chain(self, chain: str | None, rest: str) -> None:
        self._need_chain(chain)
        assert chain is not None
        try:
            _delete_chain(self._chains(), chain)
        except _Failure as failure:
            raise self._fail(failure.message, failure.code) from None

    def _flush(self, chain: str | None, rest: str) -> None:
        if chain is None:
            for existing in self._chains().values():
                existing.rules.clear()
        else:
            self._need_chain(chain).rules.clear()

    def _policy(self, chain: str | None, rest: str) -> None:
        target = self._need_chain(chain)
        if target.policy is None:
            raise self._fail(f"cannot set a policy on user-defined chain {chain}")
        target.policy = self._checked_policy(rest.strip())

    def _zero(self, chain: str | None, rest: str) -> None:
        if chain is not None:
            self._need_chain(chain)


def rule_lines(rules: Iterable[Rule]) -> list[str]:
    """``str()`` of each rule: handy for comparing a chain with expected ``-A`` lines."""
    return [str(rule) for rule in rules]


__all__ = [
    "BUILTIN_CHAINS",
    "EXTENSION_TARGETS",
    "MAX_CHAIN_NAME",
    "STANDARD_TARGETS",
    "TABLE_ORDER",
    "FakeIptables",
    "Rule",
    "quote_arg",
    "rule_lines",
]

if TYPE_CHECKING:
    _: IptablesRunner = FakeIptables()
