"""Read back a table from ``nft list table`` output as the ``add`` commands the nftables
evaluator reads (for ``diff --against-live``).

``nft`` prints what the kernel holds in its own spelling (blocks, symbolic priorities,
``elements = { ... }`` over several lines); this turns it into one ``add`` command per object.
Dynamic sets (ClientIP affinity entries) are read as empty: explain follows a new client.
"""

from __future__ import annotations

import re

from minikproxy.explain.engine import ExplainError

_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
               "srcnat": 100}  # fmt: skip
_PRIORITY = re.compile(r"priority ([a-z]+|-?\d+)(?: ([+-]) (\d+))?;")


def _priority(spec: str) -> str:
    """``type nat hook prerouting priority dstnat - 10; policy accept;`` -> numeric form."""
    m = _PRIORITY.search(spec)
    if m is None:
        raise ExplainError(f"chain priority not understood: {spec!r}")
    base, sign, delta = m.group(1), m.group(2), m.group(3)
    value = int(base) if base.lstrip("-").isdigit() else _PRIORITIES.get(base)
    if value is None:
        raise ExplainError(f"unknown chain priority {base!r}")
    if sign:
        value += int(delta) if sign == "+" else -int(delta)
    head = spec[: m.start()].strip()
    return f"{head} priority {value}"


def list_to_commands(text: str) -> list[str]:
    """The ``add`` commands for the table in ``nft list table`` output."""
    lines = [line.strip() for line in text.splitlines()]
    out: list[str] = []
    prefix = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line or line == "}":
            continue
        words = line.split()
        if words[0] == "table" and line.endswith("{"):
            prefix = f"{words[1]} {words[2]}"
            out.append(f"add table {prefix}")
        elif words[0] in ("set", "map") and line.endswith("{"):
            body, i = _block(lines, i)
            out.extend(_set_commands(prefix, words[0], words[1], body))
        elif words[0] == "chain" and line.endswith("{"):
            body, i = _block(lines, i)
            out.extend(_chain_commands(prefix, words[1], body))
        elif words[0] == "comment":
            continue
        else:
            raise ExplainError(f"nft list output not understood: {line!r}")
    if not prefix:
        raise ExplainError("no table in the nft list output")
    return out


def _block(lines: list[str], i: int) -> tuple[list[str], int]:
    """The lines of a ``{ ... }`` block opened on the line before ``i`` (elements included,
    joined to one line), and the index after its closing brace."""
    body: list[str] = []
    while i < len(lines):
        line = lines[i]
        i += 1
        if line == "}":
            return body, i
        if line.startswith("elements = {"):
            joined = line
            while joined.count("{") > joined.count("}") and i < len(lines):
                joined += " " + lines[i]
                i += 1
            body.append(joined)
        else:
            body.append(line)
    raise ExplainError("unterminated block in nft list output")


def _set_commands(prefix: str, kind: str, name: str, body: list[str]) -> list[str]:
    dynamic = any(line.startswith("flags") and "dynamic" in line for line in body)
    out = [f"add {kind} {prefix} {name}"]
    for line in body:
        if line.startswith("elements = ") and not dynamic:
            out.append(f"add element {prefix} {name} {line[len('elements = ') :]}")
    return out


def _chain_commands(prefix: str, name: str, body: list[str]) -> list[str]:
    out: list[str] = []
    rules = body
    if body and body[0].startswith("type "):
        out.append(f"add chain {prefix} {name} {{ {_priority(body[0])} ; }}")
        rules = body[1:]
    else:
        out.append(f"add chain {prefix} {name}")
    out.extend(f"add rule {prefix} {name} {rule}" for rule in rules if not _comment_only(rule))
    return out


def _comment_only(line: str) -> bool:
    return line.startswith('comment "') and line.endswith('"')
