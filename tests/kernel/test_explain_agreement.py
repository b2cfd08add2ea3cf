"""``explain`` agrees with the kernel: every case of explain_cases.py is rendered, loaded into
the node namespace in each mode, and each packet is both explained and sent. The verdict, the
set of endpoints reached and whether the source was masqueraded must match.
"""

from __future__ import annotations

from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.explain.driver import ModeView, build_view, explain_packet, track, with_mode
from minikproxy.explain.live import live_view
from minikproxy.explain.packet import make_packet
from minikproxy.explain.result import Explanation
from minikproxy.model.names import IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.netns import IptablesBackend, Probe, Topology

from .explain_cases import CASES, CLIENT, CLIENT6, Case, Send
from .traffic import NODE, NODE_OBJ

pytestmark = pytest.mark.kernel

NODE_ADDRESSES = {"10.10.1.1", "10.10.2.1", "10.10.9.1", "fd00:10:1::1", "fd00:10:2::1",
                  "fd00:10:9::1"}  # fmt: skip
"""The node namespace's own addresses (netns.py's address plan)."""

PARAMS = [
    pytest.param(case, mode, id=f"{mode}-{case.name}")
    for case in CASES
    for mode in case.modes + (("iptables-legacy",) if "iptables" in case.modes else ())
]
"""Every case in each of its modes; iptables cases also loaded into legacy iptables."""


def _config(case: Case, mode: str) -> ProxyConfig:
    settings: dict[str, Any] = {"hostname_override": NODE, "cluster_cidr": "10.10.2.0/24"}
    settings.update(case.config)
    return with_mode(ProxyConfig(**settings), mode)


def load_case(topo: Topology, case: Case, mode: str) -> ModeView:
    """Render ``case`` in ``mode`` (``iptables-legacy``: iptables rules into the legacy
    backend), load it into the node, and return explain's view of it."""
    backend: IptablesBackend = "legacy" if mode == "iptables-legacy" else "nft"
    mode = mode.removesuffix("-legacy")
    config = _config(case, mode)
    family: IPFamily = case.family  # type: ignore[assignment]
    objects = [SourcedObject(o, "case") for o in [NODE_OBJ, *case.objects]]
    rendered = render_objects(objects, config, families=[family])
    assert rendered.problems == []
    if mode == "iptables":
        topo.load_iptables(rendered.payloads[family], family=family, backend=backend)
    else:
        topo.load_nft(rendered.payloads[family])
    tracker, _ = track(objects, config)
    return build_view(tracker, config, family)


def _source(send: Send, family: str) -> tuple[str, str]:
    """(namespace, source address) the packet is sent from."""
    if send.origin in ("node", "localhost"):
        return "node", send.src
    if send.src:
        return "backend", send.src
    return "client", CLIENT6 if family == "IPv6" else CLIENT


def check_agreement(
    topo: Topology, view: ModeView, send: Send, *, scale: float = 1.0, tries: int = 12
) -> Explanation:
    """Explain ``send`` with ``view`` and send it through the kernel; assert they agree.
    ``scale`` stretches the waits for answers (an emulated kernel is slower); ``tries``
    connections per endpoint show the endpoints reached (2 suffice for round robin)."""
    ns, src = _source(send, view.family)
    packet = make_packet(src, send.dst, send.port, send.proto, send.origin, send.in_interface)  # type: ignore[arg-type]
    exp = explain_packet(view, packet)
    probe = Probe(send.dst, send.port, send.proto, src)  # type: ignore[arg-type]
    where = f"{view.mode} {packet.describe()}: explain says {exp.verdict}"
    if exp.verdict == "dnat":
        ips = {e.address.rpartition(":")[0].strip("[]") for e in exp.endpoints}
        masq = {e.address.rpartition(":")[0].strip("[]"): e.masquerade for e in exp.endpoints}
        if exp.affinity:
            results = [topo.connect_many([probe], from_ns=ns, timeout=scale)[0] for _ in range(6)]
        else:
            probes = [probe] * (tries * len(ips))
            results = topo.connect_many(probes, from_ns=ns, timeout=2.0 * scale)
        assert all(r.ok for r in results), (where, [r.outcome for r in results])
        seen = {r.server_ip for r in results}
        if exp.affinity:
            assert len(seen) == 1 and seen <= ips, (where, seen, ips)
        else:
            assert seen == ips, (where, seen, ips)
        for r in results:
            assert topo.masqueraded(r, src) == masq[r.server_ip], (where, r, exp.masquerade)
        return exp
    timeout = 0.5 if exp.verdict == "drop" else scale
    result = topo.connect_many([probe], from_ns=ns, timeout=timeout)[0]
    expected = {"reject": "refused", "drop": "timeout"}.get(exp.verdict)
    if exp.verdict == "none":
        # Untouched: the node itself refuses it (one of its addresses), or it is routed out.
        on_node = send.dst in NODE_ADDRESSES or send.dst.startswith("127.")
        expected = "refused" if on_node else "unreachable"
    assert result.outcome == expected, (where, result)
    return exp


def _shares(exp: Explanation) -> list[tuple[str, float, bool]]:
    """Endpoints with shares to 6 places (iptables-save prints 0.33333333349 for 0.3333333333)."""
    return [(e.address, round(e.probability, 6), e.masquerade) for e in exp.endpoints]


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_explain_agrees_with_the_kernel(topo: Topology, case: Case, mode: str) -> None:
    if case.name == "localhost-nodeport":
        topo.node_exec(["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
    view = load_case(topo, case, mode)
    live = live_view(view, topo.namespaces["node"])  # the rules read back from the kernel
    for send in case.sends:
        exp = check_agreement(topo, view, send)
        again = explain_packet(live, exp.packet)
        assert (again.verdict, _shares(again), again.masquerade) == (
            exp.verdict,
            _shares(exp),
            exp.masquerade,
        ), (mode, exp.packet)
