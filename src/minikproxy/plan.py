"""What a sync would change, per service port: the ``--dry-run`` printout.

A compact diff of rule lines between two compiled rulesets (``+`` added, ``-`` removed),
grouped by service port, so a reader sees exactly what one Service or EndpointSlice change
does to the kernel's rules.
"""

from __future__ import annotations

from collections.abc import Iterator

from minikproxy.compile.iptables import RULE_LINE_FIELDS, IptablesRuleset, ServiceRules
from minikproxy.model.names import IPFamily, ServicePortName


def service_lines(rules: ServiceRules | None) -> list[str]:
    """Every rule line a service port contributes, top-level chains first."""
    if rules is None:
        return []
    lines: list[str] = []
    for name in RULE_LINE_FIELDS:
        lines.extend(getattr(rules, name).splitlines())
    return lines


def _label(name: ServicePortName) -> str:
    return f"{name} ({name.protocol.lower()})"


def describe_changes(
    old: IptablesRuleset | None, new: IptablesRuleset, family: IPFamily
) -> Iterator[str]:
    """Lines describing what applying ``new`` over ``old`` changes (nothing if nothing does).

    The first sync (``old`` None) is summarised per service port; later syncs list the
    added and removed rule lines of each changed service port.
    """
    if old is None:
        counts = new.rule_counts()
        yield (
            f"# {family}: initial sync: {len(new.services)} service ports, "
            f"{counts['filter']} filter and {counts['nat']} nat rules"
        )
        for name in new.order:
            rules = new.services[name]
            chains = ", ".join(c for c in rules.chains if not c.startswith("KUBE-SEP-"))
            endpoints = len(rules.categorized.reachable)
            yield f"+ {_label(name)}: {len(service_lines(rules))} rules, {endpoints} endpoints" + (
                f" [{chains}]" if chains else ""
            )
        return
    names = (
        sorted(new.changed)
        if new.changed is not None
        else sorted(set(old.services) | set(new.services))
    )
    for name in names:
        before, after = service_lines(old.services.get(name)), service_lines(new.services.get(name))
        before_set, after_set = set(before), set(after)
        removed = [line for line in before if line not in after_set]
        added = [line for line in after if line not in before_set]
        if not removed and not added:
            continue
        verb = "added" if not before else "removed" if not after else "changed"
        yield f"# {family}: {_label(name)} {verb}: +{len(added)} -{len(removed)}"
        yield from (f"- {line}" for line in removed)
        yield from (f"+ {line}" for line in added)
