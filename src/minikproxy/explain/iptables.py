"""Evaluate iptables-restore rules (what ``render`` prints, or ``iptables-save``) on a flow.

Only what kube-proxy-shaped rules use is understood (addresses, interfaces, protocol and
port, ``addrtype``, ``conntrack``, ``mark``, ``statistic``, ``recent``, ``comment``; with an
:class:`IpsetLookup` the ``set`` match of IPVS mode, and its ``ipvs`` and ``physdev``
matches; the targets DNAT, MARK, MASQUERADE, REJECT, DROP, ACCEPT, RETURN and jumps); any
other match or
target is an :class:`ExplainError` naming the rule, never silently ignored. Both spellings
work: the compiler's (``-m tcp -p tcp``) and ``iptables-save``'s (``-d 10.0.0.1/32 -p tcp -m
tcp``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from minikproxy.compile.iptables import IptablesRuleset, jump_rules
from minikproxy.explain.engine import ExplainError, Flow, Outcome
from minikproxy.explain.result import Step

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')
_DST = re.compile(r"(?:^| )(! )?-d (\S+)")
_BASE: dict[str, tuple[tuple[int, str, str], ...]] = {
    "prerouting": ((-100, "nat", "PREROUTING"),),
    "input": ((0, "filter", "INPUT"),),
    "forward": ((0, "filter", "FORWARD"),),
    "output": ((-100, "nat", "OUTPUT"), (0, "filter", "OUTPUT")),
    "postrouting": ((100, "nat", "POSTROUTING"),),
}
_INDEX_MIN = 64
"""Chains longer than this are indexed by destination address (KUBE-SERVICES at scale)."""


@lru_cache(maxsize=65536)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def _host(text: str) -> str | None:
    """The single address ``text`` names (``10.0.0.1`` or ``10.0.0.1/32``), else None.

    Addresses are compared as written: the compiler and ``iptables-save`` both write
    canonical ones (this runs for every rule of KUBE-SERVICES: ~10^4 at scale).
    """
    if text.endswith(("/32", "/128")):
        text = text.rpartition("/")[0]
    return None if "/" in text else text


@lru_cache(maxsize=65536)
def _in(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in _network(cidr)


class IpsetLookup(Protocol):
    """The ipsets a ``-m set`` match reads (IPVS mode)."""

    def match(self, name: str, dirs: str, flow: Flow) -> str | None:
        """The entry of set ``name`` the flow matches with directions ``dirs`` (``dst,dst``),
        or None; ExplainError for an unknown set."""


@dataclass
class Rule:
    """One parsed ``-A`` rule: its matches (each a predicate on the flow) and its target;
    ``lookups`` say which set entry a matching flow hit (for the path)."""

    text: str
    matches: list[Callable[[Flow], bool]] = field(default_factory=list)
    lookups: list[Callable[[Flow], str]] = field(default_factory=list)
    target: str = ""
    target_args: dict[str, str] = field(default_factory=dict)
    probability: float | None = None
    recent: tuple[str, str, str] | None = None  # (name, rcheck|set, seconds)


def parse_rule(text: str, ipsets: IpsetLookup | None = None) -> Rule:
    """Parse one ``-A CHAIN ...`` line; ExplainError for anything not understood (a ``set``
    match without ``ipsets`` included)."""
    tokens = [t[1:-1] if t.startswith('"') else t for t in _TOKEN.findall(text)]
    if len(tokens) < 2 or tokens[0] != "-A":
        raise ExplainError(f"not a rule: {text!r}")
    rule = Rule(text)
    i = 2
    negate = False
    module = ""
    recent_mode = recent_name = recent_seconds = ""

    def need(n: int) -> list[str]:
        if i + n >= len(tokens):
            raise ExplainError(f"{tokens[i]} needs a value in rule {text!r}")
        return tokens[i + 1 : i + 1 + n]

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        neg = negate
        negate = False
        if tok in ("-s", "-d"):
            (value,) = need(1)
            rule.matches.append(_addr_match("src" if tok == "-s" else "dst", value, neg))
            i += 2
        elif tok in ("-p", "--protocol"):
            (value,) = need(1)
            proto = value.lower()
            rule.matches.append(_not(_proto_is(proto), neg))
            i += 2
        elif tok in ("-i", "--in-interface"):
            (value,) = need(1)
            rule.matches.append(_iface_match(value, neg))
            i += 2
        elif tok == "-m":
            (module,) = need(1)
            if module not in _MODULES:
                raise ExplainError(f"unknown match -m {module} in rule {text!r}")
            i += 2
        elif tok == "--comment":
            i += 2
        elif tok == "--dport":
            (value,) = need(1)
            port = int(value)
            rule.matches.append(_not(_dport_is(port), neg))
            i += 2
        elif tok in ("--dst-type", "--src-type"):
            (value,) = need(1)
            if value != "LOCAL":
                raise ExplainError(f"addrtype {value} not understood in rule {text!r}")
            if tok == "--dst-type":
                rule.matches.append(_not(lambda f: f.dst_local, neg))
            else:
                rule.matches.append(_not(lambda f: f.src_local, neg))
            i += 2
        elif tok == "--ctstate":
            (value,) = need(1)
            states = frozenset(value.split(","))
            rule.matches.append(_not(_ctstate_in(states), neg))
            i += 2
        elif tok == "--mark" and module == "mark":
            (value,) = need(1)
            mark, _, mask = value.partition("/")
            m, k = int(mark, 16), int(mask or "0xffffffff", 16)
            rule.matches.append(_not(_mark_is(m, k), neg))
            i += 2
        elif tok == "--mode":
            if need(1)[0] != "random":
                raise ExplainError(f"statistic mode not understood in rule {text!r}")
            i += 2
        elif tok == "--probability":
            rule.probability = float(need(1)[0])
            i += 2
        elif tok in ("--rcheck", "--set", "--update"):
            recent_mode = tok[2:]
            i += 1
        elif tok == "--name":
            recent_name = need(1)[0]
            i += 2
        elif tok == "--seconds":
            recent_seconds = need(1)[0]
            i += 2
        elif tok in ("--reap", "--rsource"):
            i += 1
        elif tok == "--mask" and module == "recent":
            i += 2
        elif tok == "--match-set" and module == "set":
            name, dirs = need(2)
            if ipsets is None:
                raise ExplainError(f"no ipsets to match {name} in rule {text!r}")
            rule.matches.append(_set_match(ipsets, name, dirs, neg))
            rule.lookups.append(_set_lookup(ipsets, name, dirs, neg))
            i += 3
        elif tok == "--physdev-is-in":
            # A routed packet did not come in through a bridge port (no br_netfilter here).
            rule.matches.append(_not(lambda f: False, neg))
            i += 1
        elif tok in ("--vaddr", "--vproto", "--vport") and module == "ipvs":
            (value,) = need(1)
            rule.matches.append(_not(_ipvs_match(tok, value), neg))
            i += 2
        elif tok in ("-j", "--jump"):
            rule.target = need(1)[0]
            i += 2
            rule.target_args = _target_args(tokens[i:], text)
            break
        else:
            raise ExplainError(f"unknown option {tok} in rule {text!r}")
    if recent_mode:
        rule.recent = (recent_name, recent_mode, recent_seconds)
    return rule


_MODULES = frozenset(
    {
        "comment", "tcp", "udp", "sctp", "addrtype", "conntrack", "mark", "statistic", "recent",
        "set", "physdev", "ipvs",
    }
)  # fmt: skip


def _set_match(ipsets: IpsetLookup, name: str, dirs: str, neg: bool) -> Callable[[Flow], bool]:
    return _not(lambda f: ipsets.match(name, dirs, f) is not None, neg)


def _set_lookup(ipsets: IpsetLookup, name: str, dirs: str, neg: bool) -> Callable[[Flow], str]:
    def describe(flow: Flow) -> str:
        entry = ipsets.match(name, dirs, flow)
        if entry is None:
            return f"{name} ({dirs}): no entry" + (" (negated: matches)" if neg else "")
        return f"{name} ({dirs}): {entry}"

    return describe


def _ipvs_match(option: str, value: str) -> Callable[[Flow], bool]:
    """``-m ipvs``: the packet belongs to an IPVS connection of that virtual service (IPVS
    is the only DNAT in IPVS mode: ``dnat_to`` set, the original destination its VIP)."""
    if option == "--vaddr":
        return lambda f: bool(f.dnat_to) and _in(f.orig_dst, value)
    if option == "--vport":
        port = int(value)
        return lambda f: bool(f.dnat_to) and f.orig_dport == port
    proto = {"6": "tcp", "17": "udp", "132": "sctp"}.get(value, value.lower())  # iptables-save
    return lambda f: bool(f.dnat_to) and f.proto == proto


def _target_args(tokens: Sequence[str], text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("--random-fully", "--random"):
            args[tok] = ""
            i += 1
        elif tok in ("--to-destination", "--or-mark", "--xor-mark", "--set-xmark", "--reject-with"):
            if i + 1 >= len(tokens):
                raise ExplainError(f"{tok} needs a value in rule {text!r}")
            args[tok] = tokens[i + 1]
            i += 2
        else:
            raise ExplainError(f"unknown target option {tok} in rule {text!r}")
    return args


def _proto_is(proto: str) -> Callable[[Flow], bool]:
    return lambda f: f.proto == proto


def _dport_is(port: int) -> Callable[[Flow], bool]:
    return lambda f: f.dport == port


def _ctstate_in(states: frozenset[str]) -> Callable[[Flow], bool]:
    return lambda f: bool(_ct_states(f) & states)


def _mark_is(mark: int, mask: int) -> Callable[[Flow], bool]:
    return lambda f: f.mark & mask == mark


def _not(pred: Callable[[Flow], bool], neg: bool) -> Callable[[Flow], bool]:
    return (lambda f: not pred(f)) if neg else pred


def _addr_match(which: str, value: str, neg: bool) -> Callable[[Flow], bool]:
    host = _host(value)
    if host is not None:
        if which == "src":
            return _not(lambda f: f.src == host, neg)
        return _not(lambda f: f.dst == host, neg)
    if which == "src":
        return _not(lambda f: _in(f.src, value), neg)
    return _not(lambda f: _in(f.dst, value), neg)


def _iface_match(value: str, neg: bool) -> Callable[[Flow], bool]:
    if value.endswith("+"):
        prefix = value[:-1]
        return _not(lambda f: f.iif is not None and f.iif.startswith(prefix), neg)
    return _not(lambda f: f.iif == value, neg)


def _ct_states(flow: Flow) -> frozenset[str]:
    return frozenset({"NEW", "DNAT"}) if flow.dnat_to else frozenset({"NEW"})


class IptablesRules:
    """The rules of one family, by table and chain (parsed on first use).

    Build with :meth:`from_text` (restore input or ``iptables-save`` output) or
    :meth:`from_ruleset` (the lines of a compiled ruleset, exactly those ``render`` prints,
    without joining 400k lines at 10k Services).
    """

    mode = "iptables"

    def __init__(
        self, lines: Callable[[str, str], list[str]], ipsets: IpsetLookup | None = None
    ) -> None:
        self._lines = lines
        self._ipsets = ipsets
        self._chains: dict[tuple[str, str], list[Rule | None]] = {}
        self._raw: dict[tuple[str, str], list[str]] = {}
        self._index: dict[tuple[str, str], tuple[dict[str, list[int]], list[int]]] = {}

    @classmethod
    def from_text(cls, text: str, ipsets: IpsetLookup | None = None) -> IptablesRules:
        """Rules from restore text (one family; ``*table`` sections, ``-A`` lines);
        ``ipsets`` for the ``set`` matches of IPVS mode."""
        chains: dict[tuple[str, str], list[str]] = {}
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith("-A "):
                chain = line.split(" ", 2)[1]
                chains.setdefault((table, chain), []).append(line)
        return cls(lambda t, c: chains.get((t, c), []), ipsets)

    @classmethod
    def from_ruleset(cls, ruleset: IptablesRuleset) -> IptablesRules:
        """Rules from a compiled ruleset: the lines its :meth:`~IptablesRuleset.render` prints."""
        owner: dict[str, str] = {}
        for rules in ruleset.services.values():
            for chain in rules.chains:
                owner[chain] = rules.rules
        builtin: dict[tuple[str, str], list[str]] = {}
        for jump in reversed(jump_rules(ruleset.options)):
            builtin.setdefault((jump.table, jump.source), []).append(
                f"-A {jump.source} {jump.args()}"
            )

        def lines(table: str, chain: str) -> list[str]:
            if (table, chain) in builtin:
                return builtin[(table, chain)]
            text = ruleset.top_level.get((table, chain))
            if text is None and table == "nat":
                text = owner.get(chain)
            if not text:
                return []
            prefix = f"-A {chain} "
            return [line for line in text.splitlines() if line.startswith(prefix)]

        return cls(lines)

    # --- the engine's interface -------------------------------------------------------------

    def base_chains(self, hook: str) -> Sequence[tuple[int, str, str]]:
        """The built-in chains of ``hook`` (nat before filter on OUTPUT)."""
        return _BASE[hook]

    def run_base(self, hook: str, table: str, chain: str, flow: Flow) -> list[tuple[Outcome, Flow]]:
        """Run a built-in chain (policy ACCEPT: falling off its end continues)."""
        return [(o, f) for o, f in self._run(hook, table, chain, flow, 0)]

    # --- evaluation ----------------------------------------------------------------------------

    def _rules(self, table: str, chain: str) -> list[str]:
        key = (table, chain)
        raw = self._raw.get(key)
        if raw is None:
            raw = self._raw[key] = self._lines(table, chain)
            self._chains[key] = [None] * len(raw)
        return raw

    def _rule(self, table: str, chain: str, i: int) -> Rule:
        parsed = self._chains[(table, chain)]
        rule = parsed[i]
        if rule is None:
            rule = parsed[i] = parse_rule(self._raw[(table, chain)][i], self._ipsets)
        return rule

    def _candidates(self, table: str, chain: str, flow: Flow) -> Iterable[int]:
        raw = self._rules(table, chain)
        if len(raw) < _INDEX_MIN:
            return range(len(raw))
        key = (table, chain)
        index = self._index.get(key)
        if index is None:
            by_dst: dict[str, list[int]] = {}
            other: list[int] = []
            for i, line in enumerate(raw):
                m = _DST.search(line)
                host = _host(m.group(2)) if m and not m.group(1) else None
                if host is None:
                    other.append(i)
                else:
                    by_dst.setdefault(host, []).append(i)
            index = self._index[key] = (by_dst, other)
        by_dst, other = index
        return sorted(by_dst.get(flow.dst, []) + other)

    def _run(
        self, hook: str, table: str, chain: str, flow: Flow, depth: int
    ) -> list[tuple[Outcome, Flow]]:
        if depth > 32:
            raise ExplainError(f"jumps nested too deep at {table}/{chain}")
        candidates = list(self._candidates(table, chain, flow))
        results: list[tuple[Outcome, Flow]] = []
        pending: list[tuple[Flow, int]] = [(flow, 0)]
        while pending:
            cur, pos = pending.pop()
            ended = False
            while pos < len(candidates):
                rule = self._rule(table, chain, candidates[pos])
                pos += 1
                if not all(m(cur) for m in rule.matches):
                    continue
                if rule.recent is not None and rule.recent[1] == "rcheck":
                    # A client with no entry yet (explain follows a new client) skips it.
                    cur.affinity = (
                        f"ClientIP (iptables recent, {rule.recent[2]} s): a client seen "
                        "before sticks to the endpoint it got first"
                    )
                    continue
                if rule.probability is not None and rule.probability < 1.0:
                    pending.append((cur.fork(1.0 - rule.probability), pos))
                    cur = cur.fork(rule.probability)
                if self._apply(hook, table, chain, rule, cur, depth, results) is not None:
                    ended = True
                    break
            if not ended:
                results.append(("continue", cur))
        return results

    def _apply(
        self,
        hook: str,
        table: str,
        chain: str,
        rule: Rule,
        flow: Flow,
        depth: int,
        results: list[tuple[Outcome, Flow]],
    ) -> str | None:
        """Apply a matched rule; None = go on with the next rule, else the chain ended
        (its outcomes appended to ``results``)."""
        target = rule.target
        if flow.trace:
            lookup = "; ".join(d(flow) for d in rule.lookups)
            flow.path.append(Step(hook, table, chain, _short(rule.text, chain), flow.prob, lookup))
        if not target:
            return None
        if target == "MARK":
            args = rule.target_args
            if "--or-mark" in args:
                flow.mark |= int(args["--or-mark"], 16)
            elif "--xor-mark" in args:
                flow.mark ^= int(args["--xor-mark"], 16)
            elif "--set-xmark" in args:
                value, _, mask = args["--set-xmark"].partition("/")
                flow.mark = (flow.mark & ~int(mask or "0xffffffff", 16)) ^ int(value, 16)
            else:
                raise ExplainError(f"MARK without a mark in rule {rule.text!r}")
            return None
        if target == "RETURN":
            results.append(("continue", flow))
            return "return"
        if target == "ACCEPT":
            results.append(("accept", flow))
            return "accept"
        if target == "DROP":
            results.append(("drop", flow))
            return "drop"
        if target == "REJECT":
            results.append(("reject", flow))
            return "reject"
        if target == "DNAT":
            if table != "nat":
                raise ExplainError(f"DNAT outside the nat table: {rule.text!r}")
            dest = rule.target_args.get("--to-destination", "")
            host, _, port = dest.rpartition(":")
            if not host or not port.isdigit():
                raise ExplainError(f"DNAT destination not understood: {rule.text!r}")
            flow.dnat_to = dest
            flow.dst = host.strip("[]")
            flow.dport = int(port)
            results.append(("dnat", flow))
            return "dnat"
        if target == "MASQUERADE":
            flow.masquerade = True
            flow.masq_rules.append(f"{table}/{chain}: {_short(rule.text, chain)}")
            results.append(("masquerade", flow))
            return "masquerade"
        # A jump to a user chain.
        if target == "KUBE-MARK-MASQ":
            flow.masq_rules.append(f"{table}/{chain}: {_short(rule.text, chain)}")
        sub = self._run(hook, table, target, flow, depth + 1)
        # Flows that fell off the end of the called chain go on here; the others ended.
        cont = [f for o, f in sub if o == "continue"]
        results.extend((o, f) for o, f in sub if o != "continue")
        if not cont:
            return "ended"
        first, *others = cont
        if others:
            raise ExplainError(f"a random choice inside {target} returned to {chain}")
        if first is not flow:
            _copy_into(flow, first)
        return None


def _copy_into(dst: Flow, src: Flow) -> None:
    for name in Flow.__slots__:
        setattr(dst, name, getattr(src, name))


def _short(text: str, chain: str) -> str:
    return text[len(f"-A {chain} ") :] if text.startswith(f"-A {chain} ") else text
