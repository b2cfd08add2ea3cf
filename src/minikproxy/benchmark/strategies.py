"""iptables apply strategies, on the legacy backend: the same complete ruleset loaded into an
empty namespace by ``iptables-legacy-restore`` (what minikproxy and kube-proxy do) and by
python-iptables (libiptc bindings: one Python object per rule and match, the table committed
once per table). python-iptables only speaks to the legacy backend (libiptc).

The python-iptables side runs in a child process inside the namespace (``nsenter``), which
times its own work (the payload's translation into libiptc calls and the commits), without
its start-up; the restore side is timed around the tool's process, as the controller runs it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from typing import Any

from minikproxy.dataplane.execer import RealExecer
from minikproxy.dataplane.iptables import RealIptables
from minikproxy.model.names import IPV4

#: How long ``iptables-legacy-restore`` waits for the xtables lock: the lock is one file for
#: every namespace of the machine, so other users' iptables commands can hold it a while.
WAIT_SECONDS = 60
_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
_RULE_FIELDS = {
    "-p": "protocol",
    "-s": "src",
    "-d": "dst",
    "-i": "in_interface",
    "-o": "out_interface",
}


def _apply_rule(iptc: Any, chain: Any, tokens: list[str]) -> None:
    rule = iptc.Rule()
    current: Any = None
    negate = False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "!":
            negate = True
            i += 1
            continue
        bang = "!" if negate else ""
        negate = False
        if token in _RULE_FIELDS:
            setattr(rule, _RULE_FIELDS[token], bang + tokens[i + 1])
            i += 2
        elif token == "-m":
            current = rule.create_match(tokens[i + 1])
            i += 2
        elif token == "-j":
            current = rule.create_target(tokens[i + 1])
            i += 2
        elif token.startswith("--"):
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("-") and tokens[j] != "!":
                j += 1
            if current is None:
                raise ValueError(f"option {token} before any -m or -j: {' '.join(tokens)}")
            current.set_parameter(token[2:], bang + " ".join(tokens[i + 1 : j]))
            i = j
        else:
            raise ValueError(f"cannot translate {token!r} in: {' '.join(tokens)}")
    chain.append_rule(rule)


def apply_with_python_iptables(payload: str) -> float:
    """Load ``iptables-restore`` input through python-iptables into this process's namespace
    (legacy backend); return the seconds it took. Needs the ``bench`` extra."""
    import iptc

    start = time.perf_counter()
    table: Any = None
    chains: dict[str, Any] = {}
    for line in payload.splitlines():
        if line.startswith("*"):
            table = iptc.Table(line[1:], autocommit=False)
            chains = {}
        elif line.startswith(":"):
            name = line[1:].split()[0]
            chains[name] = iptc.Chain(table, name)
            if name not in _BUILTIN and not table.is_chain(name):
                table.create_chain(name)
        elif line.startswith("-A "):
            tokens = shlex.split(line)
            name = tokens[1]
            if name not in chains:
                chains[name] = iptc.Chain(table, name)
            _apply_rule(iptc, chains[name], tokens[2:])
        elif line == "COMMIT":
            table.commit()
            table.refresh()
    return time.perf_counter() - start


def _child_main() -> None:  # pragma: no cover - runs in the child process
    payload = sys.stdin.read()
    print(apply_with_python_iptables(payload))


def python_iptables_load(payload: str, netns: str) -> float:
    """Seconds python-iptables takes to load ``payload`` into the empty namespace ``netns``."""
    argv = [
        "nsenter", f"--net=/run/netns/{netns}", "--", sys.executable, "-c",
        "from minikproxy.benchmark.strategies import _child_main; _child_main()",
    ]  # fmt: skip
    proc = subprocess.run(argv, input=payload, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"python-iptables load failed: {tail[0]}")
    return float(proc.stdout.strip().splitlines()[-1])


def restore_load(payload: str, netns: str) -> float:
    """Seconds ``iptables-legacy-restore`` takes to load ``payload`` into ``netns``."""
    start = time.perf_counter()
    RealIptables(RealExecer(netns), IPV4, "legacy", wait_seconds=WAIT_SECONDS).restore(
        payload.encode(), noflush=False
    )
    return time.perf_counter() - start


def python_iptables_missing() -> str | None:
    """Why python-iptables cannot run here (None: it can)."""
    try:
        import iptc  # noqa: F401
    except ImportError as exc:
        return f"python-iptables is not importable ({exc}); install minikproxy[bench]"
    except Exception as exc:  # the bindings load libiptc/libxtables at import
        return f"python-iptables cannot load its libraries: {exc}"
    return None
