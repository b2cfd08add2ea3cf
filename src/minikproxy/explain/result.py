"""What ``explain`` says about a packet: verdict, endpoints, masquerading, reasons, path."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from minikproxy.explain.packet import Packet

Verdict = Literal["dnat", "reject", "drop", "accept", "none"]
VERDICTS: tuple[Verdict, ...] = ("dnat", "reject", "drop", "accept", "none")


@dataclass(frozen=True, slots=True)
class Step:
    """One rule the packet matched (or one lookup it made), in the order crossed.

    ``probability`` is the share of new connections that take this step (below 1 after a
    random choice between endpoints); ``lookup`` names the set or map and the element matched.
    """

    hook: str
    table: str
    chain: str
    rule: str
    probability: float = 1.0
    lookup: str = ""

    def as_json(self) -> dict[str, Any]:
        """The step as a JSON object."""
        out: dict[str, Any] = {
            "hook": self.hook,
            "table": self.table,
            "chain": self.chain,
            "rule": self.rule,
            "probability": round(self.probability, 6),
        }
        if self.lookup:
            out["lookup"] = self.lookup
        return out


@dataclass(frozen=True, slots=True)
class EndpointShare:
    """An endpoint the packet may be DNATed to, with the share of new connections.

    ``masquerade`` says whether connections to this endpoint leave with the node's address.
    """

    address: str
    probability: float
    masquerade: bool


@dataclass(frozen=True)
class Explanation:
    """The rules' answer for one packet.

    ``verdict`` and ``endpoints``/``masquerade`` come from the rules alone; ``reasons`` are
    the Kubernetes causes (Service fields, endpoint conditions, node options) that make the
    rules what they are; ``masquerade_rules`` the rules that marked or masqueraded it.
    """

    packet: Packet
    mode: str
    verdict: Verdict
    endpoints: tuple[EndpointShare, ...] = ()
    masquerade: bool = False
    masquerade_rules: tuple[str, ...] = ()
    affinity: str = ""
    service: str = ""
    reasons: tuple[str, ...] = ()
    path: tuple[Step, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        """The explanation as one JSON object (the keys ``explain --json`` documents)."""
        p = self.packet
        return {
            "packet": {
                "src": p.src,
                "dst": p.dst,
                "dport": p.dport,
                "proto": p.proto,
                "from": p.origin,
            },
            "mode": self.mode,
            "service": self.service or None,
            "verdict": self.verdict,
            "endpoints": [
                {
                    "address": e.address,
                    "probability": round(e.probability, 6),
                    "masquerade": e.masquerade,
                }
                for e in self.endpoints
            ],
            "masquerade": self.masquerade,
            "masquerade_rules": list(self.masquerade_rules),
            "affinity": self.affinity or None,
            "reasons": list(self.reasons),
            "path": [s.as_json() for s in self.path],
            "notes": list(self.notes),
        }

    def lines(self) -> Iterator[str]:
        """The explanation as text, for people."""
        yield f"packet:     {self.packet.describe()}"
        yield f"mode:       {self.mode}"
        if self.service:
            yield f"service:    {self.service}"
        yield f"verdict:    {_VERDICT_TEXT[self.verdict]}"
        for ep in self.endpoints:
            masq = " (source masqueraded)" if ep.masquerade and not self.masquerade else ""
            yield f"  -> {ep.address}  {ep.probability * 100:.2f}%{masq}"
        if self.verdict == "dnat":
            how = f" by {', '.join(self.masquerade_rules)}" if self.masquerade_rules else ""
            yield f"masquerade: {'yes' + how if self.masquerade else 'no (the source IP is kept)'}"
        if self.affinity:
            yield f"affinity:   {self.affinity}"
        if self.reasons:
            yield "why:"
            yield from (f"  - {r}" for r in self.reasons)
        for note in self.notes:
            yield f"note: {note}"
        yield "path:"
        for step in self.path:
            share = f" [{step.probability * 100:.2f}%]" if step.probability < 0.9999 else ""
            yield f"  {step.hook:<11} {step.table}/{step.chain}{share}: {step.rule}"
            if step.lookup:
                yield f"  {'':<11}   {step.lookup}"


_VERDICT_TEXT: dict[str, str] = {
    "dnat": "DNAT to a Service endpoint",
    "reject": "REJECT (the client gets a connection refused / ICMP unreachable)",
    "drop": "DROP (the client times out)",
    "accept": "ACCEPT (delivered to the node itself)",
    "none": "untouched by the proxy's rules (routed as any other packet)",
}
