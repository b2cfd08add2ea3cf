"""``explain --proxy-mode ipvs`` agrees with an IPVS kernel, and ``diff --against-live`` reads
its state back.

Marked ``ipvs``: run inside the VM of ``test_ipvs_vm.py``. To keep that boot short, the cases
of explain_cases.py that fit IPVS are merged into a few rulesets (one per node configuration
and family); each is rendered, loaded with the stock tools (``ipset restore``, ``ipvsadm -R``,
``ip addr``, ``iptables-restore``) into the node namespace, and every packet is both explained
and sent: verdict, set of endpoints reached and masquerading must agree. Then the state is
read back from the kernel (what ``--against-live`` reads) and explained again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from minikproxy.config import ProxyConfig
from minikproxy.explain.diff import diff_views
from minikproxy.explain.driver import ModeView, build_view, explain_packet, track, with_mode
from minikproxy.explain.live import live_view
from minikproxy.model.names import IPV4, IPV6, IPFamily
from minikproxy.render import render_objects
from minikproxy.sources.manifests import SourcedObject
from minikproxy.testing.ipvsload import load_ipvs
from minikproxy.testing.netns import Topology

from .explain_cases import CASES, Send
from .test_explain_agreement import check_agreement
from .traffic import BACKENDS, NODE, NODE_IP, NODE_OBJ, service, slice_

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]

_BY_NAME = {c.name: c for c in CASES}
SCALE = float(os.environ.get("MINIKPROXY_TIME_SCALE", "1"))
"""Waits for answers stretch with the VM's emulation (an answer is waited for, a drop is not)."""
TRIES = 3
"""Connections per endpoint: the rr scheduler hands each endpoint one in turn."""


def _merge(*names: str) -> tuple[list[Any], list[Send]]:
    objects: dict[tuple[str, str], Any] = {}
    sends: list[Send] = []
    for name in names:
        case = _BY_NAME[name]
        for obj in case.objects:
            objects.setdefault((obj["kind"], obj["metadata"]["name"]), obj)
        sends.extend(case.sends)
    return list(objects.values()), sends


@dataclass(frozen=True)
class Batch:
    """One ruleset: objects, node options and the packets checked against it."""

    name: str
    objects: list[Any]
    sends: list[Send]
    family: IPFamily = IPV4
    config: dict[str, Any] = field(default_factory=dict)


_DEFAULT_OBJECTS, _DEFAULT_SENDS = _merge(
    "cluster-ip-tcp-udp",  # ClusterIP TCP/UDP, from the node, another port (IPVS filter)
    "external-frontends-cluster-policy",
    "external-policy-local",
    "external-policy-local-no-local-endpoint",  # IPVS falls back to the cluster's endpoints
    "internal-policy-local",
    "no-endpoints",
    "source-ranges",
    "source-ranges-from-the-node",
    "terminating-fallback",
    "session-affinity",
    "external-ip-local-policy-and-udp-nodeport",
    "internal-policy-local-from-the-node",
    "local-endpoint-only-terminating",
    "not-ready-endpoints-only",
    "two-ports-one-service",
)
_POD_OBJECTS, _POD_SENDS = _merge("cluster-ip-from-pod-cidr", "external-policy-local-from-a-pod")

BATCHES = [
    Batch(
        "default",
        [
            *_DEFAULT_OBJECTS,
            # Hairpin: a local endpoint reaching its own Service (KUBE-LOOP-BACK).
            service("self", "10.96.0.80"),
            slice_("self", BACKENDS[:1], local=BACKENDS[:1]),
        ],
        [
            *_DEFAULT_SENDS,
            Send("10.96.0.80", 80, origin="pod", src=BACKENDS[0]),
            # The node connecting from the load balancer's own address: KUBE-IPVS-OUT-FILTER.
            Send("203.0.113.64", 80, origin="node", src="203.0.113.64"),
        ],
    ),
    Batch("pod-cidr", _POD_OBJECTS, _POD_SENDS, config={"cluster_cidr": "10.10.0.0/16"}),
    Batch(
        "masquerade-all-nodeport-addresses",
        _BY_NAME["nodeport-addresses"].objects + _BY_NAME["masquerade-all"].objects,
        [*_BY_NAME["nodeport-addresses"].sends, *_BY_NAME["masquerade-all"].sends],
        config={
            "cluster_cidr": "10.10.0.0/16",
            "masquerade_all": True,
            "nodeport_addresses": ("10.10.1.0/24",),
        },
    ),
    Batch(
        "ipv6",
        _BY_NAME["ipv6"].objects,
        _BY_NAME["ipv6"].sends,
        IPV6,
        {"cluster_cidr": "10.10.2.0/24,fd00:10:2::/64"},
    ),
]


def load_batch(topo: Topology, batch: Batch) -> ModeView:
    """Render ``batch`` in IPVS mode, load it into the node, return explain's view of it."""
    settings: dict[str, Any] = {"hostname_override": NODE, "cluster_cidr": "10.10.2.0/24"}
    config = with_mode(ProxyConfig(**{**settings, **batch.config}), "ipvs")
    objects = [SourcedObject(o, "case") for o in [NODE_OBJ, *batch.objects]]
    rendered = render_objects(objects, config, families=[batch.family])
    assert rendered.problems == []
    load_ipvs(topo.namespaces["node"], rendered.payloads[batch.family], batch.family)
    tracker, _ = track(objects, config)
    return build_view(tracker, config, batch.family)


def _answer(view: ModeView, exp: Any) -> tuple[Any, ...]:
    again = explain_packet(view, exp.packet)
    return again.verdict, [
        (e.address, round(e.probability, 6), e.masquerade) for e in again.endpoints
    ]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: b.name)
def test_explain_agrees_with_the_ipvs_kernel(topo: Topology, batch: Batch) -> None:
    view = load_batch(topo, batch)
    live = live_view(view, topo.namespaces["node"])
    seen: list[str] = []
    for send in batch.sends:
        exp = check_agreement(topo, view, send, scale=SCALE, tries=TRIES)
        assert _answer(live, exp) == _answer(view, exp), exp.packet
        seen.append(exp.verdict)
    if batch.name == "default":  # the verdicts IPVS mode has are all crossed
        assert {"dnat", "reject", "drop"} <= set(seen)
    assert diff_views(view, live) == []  # --against-live: no drift


def test_against_live_reports_drift(topo: Topology) -> None:
    """Someone removes a real server and a source-range entry: diff --against-live says
    which traffic changes, and the kernel agrees with the live explanation."""
    batch = Batch(
        "drift",
        [
            service("web", "10.96.0.10", type="NodePort", port_extra={"nodePort": 30080}),
            slice_("web", BACKENDS),
            *_BY_NAME["source-ranges"].objects[::2],  # "allowed" and its slice
        ],
        [],
    )
    view = load_batch(topo, batch)
    netns = topo.namespaces["node"]
    assert diff_views(view, live_view(view, netns)) == []
    topo.node_exec(["ipvsadm", "-d", "-t", "10.96.0.10:80", "-r", "10.10.2.2:8080"])
    topo.node_exec(["ipset", "del", "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                    "203.0.113.61,tcp:80,10.10.1.0/24"])  # fmt: skip
    live = live_view(view, netns)
    changes = diff_views(view, live)
    web = [c for c in changes if str(c.probe.port) == "t/web:p"]
    assert web and all(c.probe.frontend == "ClusterIP" for c in web)
    assert all(c.what == ("endpoint set",) for c in web)
    assert all("10.10.2.2:8080" not in c.new.describe() for c in web)
    allowed = [c for c in changes if str(c.probe.port) == "t/allowed:p"]
    assert allowed and all(c.probe.frontend == "LoadBalancer IP" for c in allowed)
    assert {(c.old.verdict, c.new.verdict) for c in allowed} == {("dnat", "drop")}
    # The kernel agrees with what the live state explains.
    for send in (Send("10.96.0.10", 80), Send("203.0.113.61", 80), Send(NODE_IP, 30080)):
        check_agreement(topo, live, send, scale=SCALE, tries=TRIES)
