"""Evaluate an nftables table (``nft -f`` ``add`` commands, as ``render`` prints them for the
flat layout and kube-proxy's layout) on a flow: chains, set and map lookups, verdict maps.

Only the expressions and statements the compilers emit are understood; anything else is an
:class:`ExplainError` naming the rule. Dynamic sets and maps (ClientIP affinity) start empty:
explain follows a client the node has not seen yet.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from minikproxy.explain.engine import ExplainError, Flow, Outcome
from minikproxy.explain.result import Step

_TOKEN = re.compile(r'\{[^{}]*\}|"[^"]*"|\S+')
_CHAIN_HOOK = re.compile(r"type (\w+) hook (\w+) priority (-?\d+)")
_COMMENT = re.compile(r' comment "[^"]*"')

# Selectors the compilers use, longest first.
_SELECTORS: tuple[tuple[str, ...], ...] = (
    ("ct", "original", "ip", "daddr"),
    ("ct", "original", "ip6", "daddr"),
    ("ct", "original", "proto-dst"),
    ("fib", "saddr", "type"),
    ("fib", "daddr", "type"),
    ("ip", "daddr"),
    ("ip", "saddr"),
    ("ip6", "daddr"),
    ("ip6", "saddr"),
    ("meta", "l4proto"),
    ("meta", "mark"),
    ("th", "dport"),
    ("tcp", "dport"),
    ("udp", "dport"),
    ("sctp", "dport"),
    ("ct", "state"),
    ("ct", "status"),
    ("iifname",),
    ("mark",),
)


@lru_cache(maxsize=65536)
def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


def _component_matches(component: str, value: str) -> bool:
    if component == value:
        return True
    if "/" in component and value and value[0].isalnum() and ("." in value or ":" in value):
        try:
            return ipaddress.ip_address(value) in _network(component)
        except ValueError:
            return False
    if "-" in component and component.replace("-", "").isdigit() and value.isdigit():
        low, _, high = component.partition("-")
        return int(low) <= int(value) <= int(high)
    return False


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(part.strip().strip('"') for part in text.split(" . "))


@dataclass
class NftSet:
    """A set or map: elements by key (``data`` "" for sets); intervals scanned in order."""

    name: str
    is_map: bool
    exact: dict[tuple[str, ...], str] = field(default_factory=dict)
    ranged: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    def add(self, body: str) -> None:
        """Add one element body (``key`` or ``key : data``; a key comment is dropped)."""
        key, sep, data = body.partition(" : ")
        if self.is_map and not sep:
            raise ExplainError(f"map {self.name}: element without data: {body!r}")
        key = _COMMENT.sub("", key)
        parts = _split_key(key)
        if any("/" in p or ("-" in p and p.replace("-", "").isdigit()) for p in parts):
            self.ranged.append((parts, data.strip()))
        else:
            self.exact[parts] = data.strip()

    def lookup(self, key: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
        """The element matching ``key`` (its key and data), or None."""
        data = self.exact.get(key)
        if data is not None:
            return key, data
        for parts, value in self.ranged:
            if len(parts) == len(key) and all(map(_component_matches, parts, key)):
                return parts, value
        return None


class NftRule:
    """A rule's text, split into tokens on first use (interpreted at evaluation)."""

    __slots__ = ("_tokens", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._tokens: list[str] | None = None

    @property
    def tokens(self) -> list[str]:
        """The rule's words, with ``{ ... }`` groups and quoted strings as one token."""
        if self._tokens is None:
            self._tokens = _TOKEN.findall(self.text)
        return self._tokens


class NftRules:
    """One nftables table, parsed from ``add`` commands."""

    def __init__(self, family: str, table: str) -> None:
        self.family = family
        self.table = table
        self.label = f"{family} {table}"
        self.mode = "nftables" if table != "kube-proxy" else "nftables/kube-proxy"
        self.chains: dict[str, list[NftRule]] = {}
        self.hooks: dict[str, list[tuple[int, str, str]]] = {}
        self.sets: dict[str, NftSet] = {}

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def from_script(cls, text: str) -> NftRules:
        """Parse an ``nft -f`` script of ``add``/``delete`` commands for one table."""
        return cls.from_lines(text.splitlines())

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> NftRules:
        """Parse ``add`` commands (``delete table`` resets; other deletes are errors)."""
        rules: NftRules | None = None
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = line.split(" ", 5)
            verb, kind = words[0], words[1]
            if len(words) < 4:
                raise ExplainError(f"not understood: {line!r}")
            family, table = words[2], words[3]
            if rules is None or (rules.family, rules.table) != (family, table):
                if rules is not None and rules.chains:
                    raise ExplainError(f"a second table in the script: {line!r}")
                rules = cls(family, table)
            if verb == "delete" and kind == "table":
                rules = cls(family, table)
                continue
            if verb != "add":
                raise ExplainError(f"not understood: {line!r}")
            rest = words[4] if len(words) > 4 else ""
            tail = words[5] if len(words) > 5 else ""
            if kind == "table":
                continue
            if kind == "chain":
                rules.add_chain(rest, tail)
            elif kind in ("set", "map"):
                rules.sets.setdefault(rest, NftSet(rest, kind == "map"))
            elif kind == "rule":
                rules.add_rule(rest, tail)
            elif kind == "element":
                rules.add_elements(rest, tail)
            else:
                raise ExplainError(f"not understood: {line!r}")
        if rules is None:
            raise ExplainError("no nftables table in the input")
        return rules

    @classmethod
    def from_ruleset(cls, ruleset: object) -> NftRules:
        """The table a compiled ruleset renders (flat or kube-proxy layout), reading the
        flat layout's elements from the ruleset instead of re-splitting ~10^6 rendered ones."""
        from minikproxy.compile.nftables import NftablesRuleset

        if isinstance(ruleset, NftablesRuleset):
            prefix = ruleset.family_prefix
            rules = cls.from_lines([f"add table {prefix}", *ruleset.skeleton])
            for name, texts in ruleset.elements_by_set().items():
                target = rules.sets.get(name)
                if target is None:
                    raise ExplainError(f"elements for an undeclared set {name}")
                for text in texts:
                    target.add(text)
            return rules
        from minikproxy.compile.nftables_kubeproxy import KubeProxyNftRuleset

        if not isinstance(ruleset, KubeProxyNftRuleset):
            raise ExplainError(f"not an nftables ruleset: {type(ruleset).__name__}")
        rules = cls.from_lines(ruleset.base_lines())
        frags = [ruleset.services[name] for name in sorted(ruleset.services)]
        for frag in frags:  # every chain and set first: rules and elements refer to them
            for line in frag.sets:
                name = line.split(" ", 5)[4]
                rules.sets.setdefault(name, NftSet(name, is_map=False))
            for chain, _ in frag.chains:
                rules.add_chain(chain, "")
        for frag in frags:
            for chain, body in frag.chains:
                for text in body:
                    rules.add_rule(chain, text)
            for container, element in frag.elements:
                rules.sets[container].add(element)
        return rules

    def add_chain(self, name: str, spec: str) -> None:
        """Declare a chain (a base chain when ``spec`` names a hook)."""
        self.chains.setdefault(name, [])
        m = _CHAIN_HOOK.search(spec)
        if m:
            kind, hook, prio = m.group(1), m.group(2), int(m.group(3))
            self.hooks.setdefault(hook, []).append((prio, kind, name))
            self.hooks[hook].sort()

    def add_rule(self, chain: str, text: str) -> None:
        """Append a rule to ``chain``."""
        if chain not in self.chains:
            raise ExplainError(f"rule for an undeclared chain {chain}: {text!r}")
        self.chains[chain].append(NftRule(text))

    def add_elements(self, name: str, text: str) -> None:
        """``{ a, b : c, ... }`` into set ``name``."""
        target = self.sets.get(name)
        if target is None:
            raise ExplainError(f"elements for an undeclared set {name}")
        body = text.strip()
        if not (body.startswith("{") and body.endswith("}")):
            raise ExplainError(f"elements not understood: {text!r}")
        for element in _split_elements(body[1:-1]):
            target.add(element)

    # --- the engine's interface -------------------------------------------------------------

    def base_chains(self, hook: str) -> Sequence[tuple[int, str, str]]:
        """``(priority, type, chain)`` of the table's base chains on ``hook``."""
        return self.hooks.get(hook, [])

    def run_base(self, hook: str, table: str, chain: str, flow: Flow) -> list[tuple[Outcome, Flow]]:
        """Run a base chain (policy accept)."""
        return self._run(hook, chain, flow, 0)

    # --- evaluation ----------------------------------------------------------------------------

    def _run(self, hook: str, chain: str, flow: Flow, depth: int) -> list[tuple[Outcome, Flow]]:
        if depth > 32:
            raise ExplainError(f"jumps nested too deep at {chain}")
        rules = self.chains.get(chain)
        if rules is None:
            raise ExplainError(f"jump to an undeclared chain {chain}")
        results: list[tuple[Outcome, Flow]] = []
        pending: list[tuple[Flow, int]] = [(flow, 0)]
        while pending:
            cur, pos = pending.pop()
            ended = False
            while pos < len(rules):
                rule = rules[pos]
                pos += 1
                for action, target, out in self._eval(hook, chain, rule, cur):
                    if action == "next":
                        pending.append((out, pos))
                    elif action == "jump":
                        sub = self._run(hook, target, out, depth + 1)
                        for o, f in sub:
                            if o == "continue":
                                pending.append((f, pos))
                            else:
                                results.append((o, f))
                    elif action == "goto":
                        results.extend(self._run(hook, target, out, depth + 1))
                    else:
                        results.append((action, out))  # type: ignore[arg-type]
                ended = True
                break
            if not ended:
                results.append(("continue", cur))
        return results

    def _eval(
        self, hook: str, chain: str, rule: NftRule, flow: Flow
    ) -> list[tuple[str, str, Flow]]:
        try:
            return self._eval_rule(hook, chain, rule, flow)
        except _NoMatch:
            return [("next", "", flow)]

    def _eval_rule(
        self, hook: str, chain: str, rule: NftRule, flow: Flow
    ) -> list[tuple[str, str, Flow]]:
        """One rule on ``flow``: ``(action, target, flow)`` per branch; action is ``next``
        (no match or no verdict: go on), ``jump``/``goto`` (target), or an outcome."""
        toks = rule.tokens
        n = len(toks)
        i = 0
        lookups: list[str] = []

        def step(f: Flow) -> None:
            if not f.trace:
                return
            f.path.append(
                Step(
                    hook,
                    f"{self.family} {self.table}",
                    chain,
                    rule.text,
                    f.prob,
                    "; ".join(lookups),
                )
            )

        while i < n:
            t = toks[i]
            if t in ("jump", "goto"):
                step(flow)
                if toks[i + 1] == "mark-for-masquerade":
                    flow.masq_rules.append(f"{chain}: {rule.text}")
                return [(t, toks[i + 1], flow)]
            if t in ("return",):
                step(flow)
                return [("continue", "", flow)]
            if t in ("drop", "accept", "reject"):
                step(flow)
                return [(t, "", flow)]
            if t == "masquerade":
                step(flow)
                flow.masquerade = True
                flow.masq_rules.append(f"{chain}: {rule.text}")
                return [("masquerade", "", flow)]
            if t == "counter":
                i += 1
                continue
            if t == "comment":
                i += 2
                continue
            if t == "update":
                flow.affinity = flow.affinity or _AFFINITY
                i += 3
                continue
            if t == "dnat":
                return self._dnat(toks, i + 1, flow, rule, (hook, chain), lookups)
            if t == "numgen":
                if toks[i + 1 : i + 3] != ["random", "mod"] or toks[i + 4 : i + 5] != ["vmap"]:
                    raise ExplainError(f"numgen not understood in rule {rule.text!r}")
                count = int(toks[i + 3])
                choices = _literal_map(toks[i + 5])
                step(flow)
                out: list[tuple[str, str, Flow]] = []
                for k in range(count):
                    verdict = choices.get(str(k))
                    if verdict is None:
                        raise ExplainError(f"numgen value {k} missing in rule {rule.text!r}")
                    branch = flow.fork(1.0 / count)
                    out.extend(self._verdict(verdict, branch, rule))
                return out
            exprs, i = _parse_concat(toks, i, rule.text)
            if i >= n:
                raise ExplainError(f"expression without a test in rule {rule.text!r}")
            op = toks[i]
            if op == "set":
                i = self._mark_set(toks, i + 1, flow, rule)
                continue
            values = tuple(_value(e, flow) for e in exprs)
            if op == "vmap":
                rhs = toks[i + 1]
                if rhs.startswith("@"):
                    found = self._set(rhs[1:], rule).lookup(values)
                    if found is None:
                        return [("next", "", flow)]
                    lookups.append(f"@{rhs[1:]}: {' . '.join(found[0])} : {found[1]}")
                    step(flow)
                    return self._verdict(found[1], flow, rule)
                choices = _literal_map(rhs)
                verdict = choices.get(values[0]) if len(values) == 1 else None
                if verdict is None:
                    return [("next", "", flow)]
                step(flow)
                return self._verdict(verdict, flow, rule)
            if op in ("&", "and"):
                mask = int(toks[i + 1], 0)
                cmp, wanted = toks[i + 2], int(toks[i + 3], 0)
                masked = int(values[0], 0) & mask
                ok = masked == wanted if cmp == "==" else masked != wanted
                if not ok:
                    return [("next", "", flow)]
                i += 4
                continue
            negate = op == "!="
            if op in ("!=", "=="):
                i += 1
                op = toks[i]
            if op.startswith("@"):
                found = self._set(op[1:], rule).lookup(values)
                ok = found is not None
                if found is not None:
                    lookups.append(f"@{op[1:]}: {' . '.join(found[0])}")
                else:
                    lookups.append(f"@{op[1:]}: no element {' . '.join(values)}")
            elif op.startswith("{"):
                members = [m.strip().strip('"') for m in op[1:-1].split(",")]
                ok = len(values) == 1 and any(_component_matches(m, values[0]) for m in members)
            else:
                ok = len(values) == 1 and _scalar_matches(op.strip('"'), values[0])
            if ok == negate:
                return [("next", "", flow)]
            i += 1
        step(flow)
        return [("next", "", flow)]

    def _set(self, name: str, rule: NftRule) -> NftSet:
        found = self.sets.get(name)
        if found is None:
            raise ExplainError(f"lookup in an undeclared set @{name} in rule {rule.text!r}")
        return found

    def _verdict(self, verdict: str, flow: Flow, rule: NftRule) -> list[tuple[str, str, Flow]]:
        words = verdict.split()
        if words[0] in ("goto", "jump") and len(words) == 2:
            return [(words[0], words[1], flow)]
        if words[0] in ("drop", "accept", "reject"):
            return [(words[0], "", flow)]
        if words[0] == "return":
            return [("continue", "", flow)]
        raise ExplainError(f"verdict {verdict!r} not understood in rule {rule.text!r}")

    def _mark_set(self, toks: list[str], i: int, flow: Flow, rule: NftRule) -> int:
        # meta mark set meta mark | 0x4000  /  mark set mark or 0x4000 (and ^ / xor)
        if toks[i] == "meta":
            i += 1
        if toks[i] != "mark":
            raise ExplainError(f"mark expression not understood in rule {rule.text!r}")
        op, value = toks[i + 1], int(toks[i + 2], 0)
        if op in ("|", "or"):
            flow.mark |= value
        elif op in ("^", "xor"):
            flow.mark ^= value
        else:
            raise ExplainError(f"mark operation {op} not understood in rule {rule.text!r}")
        return i + 3

    def _dnat(
        self,
        toks: list[str],
        i: int,
        flow: Flow,
        rule: NftRule,
        where: tuple[str, str],
        lookups: list[str],
    ) -> list[tuple[str, str, Flow]]:
        """``dnat to ADDR`` or ``dnat ip to KEY map @endpoints`` (with ``numgen``: one branch
        per endpoint index); ``where`` is (hook, chain) for the path."""
        hook, chain = where
        if toks[i] in ("ip", "ip6"):
            i += 1
        if toks[i] != "to":
            raise ExplainError(f"dnat not understood in rule {rule.text!r}")
        i += 1
        if "map" not in toks[i:]:
            address = toks[i]
            host, _, port = address.rpartition(":")
            if not port.isdigit():
                raise ExplainError(f"dnat address not understood in rule {rule.text!r}")
            if flow.trace:
                lookup = "; ".join(lookups)
                flow.path.append(Step(hook, self.label, chain, rule.text, flow.prob, lookup))
            _set_dnat(flow, host.strip("[]"), int(port))
            return [("dnat", "", flow)]
        exprs, j = _parse_concat(toks, i, rule.text, numgen=True)
        if toks[j] != "map" or not toks[j + 1].startswith("@"):
            raise ExplainError(f"dnat map not understood in rule {rule.text!r}")
        table = self._set(toks[j + 1][1:], rule)
        flows: list[tuple[Flow, tuple[str, ...]]] = []
        numgen = next((e for e in exprs if e[0] == "numgen"), None)
        if numgen is None:
            flows.append((flow, tuple(_value(e, flow) for e in exprs)))
        else:
            count = int(numgen[3])
            for k in range(count):
                branch = flow.fork(1.0 / count)
                key = tuple(str(k) if e[0] == "numgen" else _value(e, branch) for e in exprs)
                flows.append((branch, key))
        out: list[tuple[str, str, Flow]] = []
        for branch, key in flows:
            found = table.lookup(key)
            if found is None:
                if numgen is not None:
                    raise ExplainError(
                        f"@{table.name} has no element {' . '.join(key)} (rule {rule.text!r})"
                    )
                # A dynamic map without this client (affinity): the rule does not apply.
                branch.affinity = branch.affinity or _AFFINITY
                out.append(("next", "", branch))
                continue
            data = _split_key(found[1])
            if len(data) != 2:
                raise ExplainError(f"dnat data {found[1]!r} not understood (@{table.name})")
            if branch.trace:
                lookup = "; ".join(
                    [*lookups, f"@{table.name}: {' . '.join(found[0])} : {found[1]}"]
                )
                branch.path.append(Step(hook, self.label, chain, rule.text, branch.prob, lookup))
            _set_dnat(branch, data[0], int(data[1]))
            out.append(("dnat", "", branch))
        return out


_AFFINITY = (
    "ClientIP (nftables affinity set): a client seen before sticks to the endpoint it got first"
)


def _set_dnat(flow: Flow, ip: str, port: int) -> None:
    flow.dnat_to = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    flow.dst = ip
    flow.dport = port


def _parse_concat(
    toks: list[str], i: int, text: str, *, numgen: bool = False
) -> tuple[list[tuple[str, ...]], int]:
    exprs: list[tuple[str, ...]] = []
    while True:
        if numgen and toks[i] == "numgen":
            if toks[i + 1] != "random" or toks[i + 2] != "mod":
                raise ExplainError(f"numgen not understood in rule {text!r}")
            exprs.append(("numgen", "random", "mod", toks[i + 3]))
            i += 4
        else:
            for sel in _SELECTORS:
                if tuple(toks[i : i + len(sel)]) == sel:
                    exprs.append(sel)
                    i += len(sel)
                    break
            else:
                raise ExplainError(f"expression {toks[i]!r} not understood in rule {text!r}")
        if i < len(toks) and toks[i] == ".":
            i += 1
            continue
        return exprs, i


def _value(expr: tuple[str, ...], flow: Flow) -> str:
    head = expr[0]
    if head in ("ip", "ip6"):
        return flow.dst if expr[1] == "daddr" else flow.src
    if expr == ("meta", "l4proto"):
        return flow.proto
    if expr[-1] == "dport":
        if head != "th" and head != flow.proto:
            raise _NoMatch  # a tcp/udp/sctp header field: the rule needs that protocol
        return str(flow.dport)
    if expr in (("meta", "mark"), ("mark",)):
        return hex(flow.mark)
    if expr == ("iifname",):
        return flow.iif or ""
    if expr == ("ct", "state"):
        return "new"
    if expr == ("ct", "status"):
        return "dnat" if flow.dnat_to else ""
    if expr == ("fib", "saddr", "type"):
        return "local" if flow.src_local else "unicast"
    if expr == ("fib", "daddr", "type"):
        return "local" if flow.dst_local else "unicast"
    if head == "ct" and expr[1] == "original":
        return str(flow.orig_dport) if expr[2] == "proto-dst" else flow.orig_dst
    raise ExplainError(f"expression {' '.join(expr)} has no value")


class _NoMatch(Exception):
    """The rule cannot match this flow (a header of another protocol)."""


def _scalar_matches(rhs: str, value: str) -> bool:
    if rhs.endswith("*"):
        return value.startswith(rhs[:-1])
    if rhs.isdigit() and value.startswith("0x"):
        return int(value, 16) == int(rhs)
    return _component_matches(rhs, value)


def _literal_map(text: str) -> dict[str, str]:
    """``{ 0 : goto a , 1 : goto b }`` -> {"0": "goto a", ...}."""
    out: dict[str, str] = {}
    for item in text.strip()[1:-1].split(","):
        key, sep, verdict = item.partition(" : ")
        if sep:
            out[key.strip()] = verdict.strip()
    return out


def _split_elements(body: str) -> list[str]:
    """Split ``a, b : c, d`` on top-level commas (quoted comments may hold commas)."""
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for k, ch in enumerate(body):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "{(":
            depth += 1
        elif not quoted and ch in "})":
            depth -= 1
        elif ch == "," and not quoted and depth == 0:
            part = body[start:k].strip()
            if part:
                out.append(part)
            start = k + 1
    tail = body[start:].strip()
    if tail:
        out.append(tail)
    return out
