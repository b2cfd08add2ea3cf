"""Cases for the explain-vs-kernel agreement tests: objects, node options, and packets.

Each :class:`Case` is loaded into the node namespace of the traffic topology (traffic.py:
node-1 at 10.10.1.1, client 10.10.1.2, backend "pods" 10.10.2.2-4 and fd00:10:2::2-4) in one
mode; every :class:`Send` is then both explained and sent, and the two must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.kernel.traffic import BACKENDS, NODE, NODE_IP, service, slice_

BACKENDS6 = ["fd00:10:2::2", "fd00:10:2::3", "fd00:10:2::4"]
NODE_IP6 = "fd00:10:1::1"
CLIENT = "10.10.1.2"
CLIENT6 = "fd00:10:1::2"


@dataclass(frozen=True)
class Send:
    """A packet: from ``origin`` (``external``/``pod`` from the client namespace, ``pod`` from a
    backend with ``src``, ``node``/``localhost`` from the node) to ``dst:port``."""

    dst: str
    port: int
    origin: str = "external"
    proto: str = "tcp"
    src: str = ""
    in_interface: str = ""


@dataclass(frozen=True)
class Case:
    """Objects and node options, and the packets to check with them."""

    name: str
    objects: list[Any]
    sends: list[Send]
    family: str = "IPv4"
    config: dict[str, Any] = field(default_factory=dict)
    modes: tuple[str, ...] = ("iptables", "nftables", "nftables/kube-proxy")


def _lb(name: str, cip: str, vip: str, node_port: int, **spec: Any) -> Any:
    return service(
        name,
        cip,
        type="LoadBalancer",
        port_extra={"nodePort": node_port},
        status={"loadBalancer": {"ingress": [{"ip": vip}]}},
        **spec,
    )


def _zone_slice(name: str) -> Any:
    eps = slice_(name, BACKENDS)
    for ep, zone in zip(eps["endpoints"], ("a", "b", "a"), strict=True):
        ep["hints"] = {"forZones": [{"name": zone}]}
        ep["zone"] = zone
    return eps


_ZONED_NODE = {
    "kind": "Node",
    "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "a"}},
    "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
}

CASES: list[Case] = [
    Case(
        "cluster-ip-tcp-udp",
        [
            service("web", "10.96.0.10"),
            slice_("web", BACKENDS),
            service("dns", "10.96.0.53", port=53, proto="UDP"),
            slice_("dns", BACKENDS, proto="UDP"),
        ],
        [
            Send("10.96.0.10", 80),
            Send("10.96.0.53", 53, proto="udp"),
            Send("10.96.0.10", 80, origin="node", src=NODE_IP),
            Send("10.96.0.10", 81),
        ],
    ),
    Case(
        "cluster-ip-from-pod-cidr",
        [service("web", "10.96.0.10"), slice_("web", BACKENDS)],
        [Send("10.96.0.10", 80, origin="pod")],
        config={"cluster_cidr": "10.10.0.0/16"},
    ),
    Case(
        "masquerade-all",
        [service("web", "10.96.0.10"), slice_("web", BACKENDS)],
        [Send("10.96.0.10", 80, origin="pod")],
        config={"cluster_cidr": "10.10.0.0/16", "masquerade_all": True},
    ),
    Case(
        "interface-detection",
        [service("web", "10.96.0.10"), slice_("web", BACKENDS)],
        [
            Send("10.96.0.10", 80, origin="pod"),
            Send("10.96.0.10", 80, in_interface="cl0"),  # the client's interface, named
        ],
        config={"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "cl"},
    ),
    Case(
        "interface-detection-other-interface",  # the client's cl0 is not a pod interface
        [service("web", "10.96.0.10"), slice_("web", BACKENDS)],
        [Send("10.96.0.10", 80, origin="external")],
        config={"detect_local_mode": "InterfaceNamePrefix", "interface_name_prefix": "xx"},
    ),
    Case(
        "external-frontends-cluster-policy",
        [
            _lb("shop", "10.96.0.20", "203.0.113.20", 30080, externalIPs=["203.0.113.10"]),
            slice_("shop", BACKENDS),
        ],
        [
            Send("203.0.113.10", 80),
            Send("203.0.113.20", 80),
            Send(NODE_IP, 30080),
            Send(NODE_IP, 30080, origin="node", src=NODE_IP),
            Send("203.0.113.20", 80, origin="pod", src=BACKENDS[0]),
        ],
    ),
    Case(
        "external-policy-local",
        [
            _lb("local", "10.96.0.40", "203.0.113.40", 30040, externalTrafficPolicy="Local"),
            slice_("local", BACKENDS, local=("10.10.2.3",)),
        ],
        [
            Send(NODE_IP, 30040),
            Send("203.0.113.40", 80),
            Send("10.96.0.40", 80),
        ],
    ),
    Case(
        "external-policy-local-from-a-pod",  # pods are short-circuited to every endpoint
        [
            _lb("local", "10.96.0.40", "203.0.113.40", 30040, externalTrafficPolicy="Local"),
            slice_("local", BACKENDS, local=("10.10.2.3",)),
        ],
        [Send("203.0.113.40", 80, origin="pod"), Send(NODE_IP, 30040, origin="pod")],
        config={"cluster_cidr": "10.10.0.0/16"},
    ),
    Case(
        "external-policy-local-no-local-endpoint",
        [
            _lb("remote", "10.96.0.41", "203.0.113.41", 30041, externalTrafficPolicy="Local"),
            slice_("remote", BACKENDS),
        ],
        [Send(NODE_IP, 30041), Send("203.0.113.41", 80), Send("10.96.0.41", 80)],
    ),
    Case(
        "internal-policy-local",
        [
            service("itp", "10.96.0.42", internalTrafficPolicy="Local"),
            slice_("itp", BACKENDS, local=("10.10.2.4",)),
            service("itp-none", "10.96.0.43", internalTrafficPolicy="Local"),
            slice_("itp-none", BACKENDS),
        ],
        [Send("10.96.0.42", 80), Send("10.96.0.43", 80)],
    ),
    Case(
        "no-endpoints",
        [
            service("empty", "10.96.0.30", type="NodePort", port_extra={"nodePort": 30030}),
            service("empty-udp", "10.96.0.31", proto="UDP"),
        ],
        [Send("10.96.0.30", 80), Send(NODE_IP, 30030), Send("10.96.0.31", 80, proto="udp")],
    ),
    Case(
        "source-ranges",
        [
            _lb(
                "allowed",
                "10.96.0.61",
                "203.0.113.61",
                30061,
                loadBalancerSourceRanges=["10.10.1.0/24"],
            ),
            _lb(
                "denied",
                "10.96.0.62",
                "203.0.113.62",
                30062,
                loadBalancerSourceRanges=["192.0.2.0/24"],
            ),
            slice_("allowed", BACKENDS),
            slice_("denied", BACKENDS),
        ],
        [Send("203.0.113.61", 80), Send("203.0.113.62", 80), Send(NODE_IP, 30062)],
    ),
    Case(
        "terminating-fallback",
        [
            service("drain", "10.96.0.70"),
            slice_("drain", BACKENDS[1:], ready=False, serving=True, terminating=True),
        ],
        [Send("10.96.0.70", 80)],
    ),
    Case(
        "session-affinity",
        [service("sticky", "10.96.0.50", sessionAffinity="ClientIP"), slice_("sticky", BACKENDS)],
        [Send("10.96.0.50", 80)],
    ),
    Case(
        "hairpin",
        [service("self", "10.96.0.80"), slice_("self", BACKENDS[:1])],
        [Send("10.96.0.80", 80, origin="pod", src=BACKENDS[0])],
    ),
    Case(
        "topology-zone-hints",
        [_ZONED_NODE, service("zoned", "10.96.0.90"), _zone_slice("zoned")],
        [Send("10.96.0.90", 80)],
    ),
    Case(
        "load-balancer-ip-mode-proxy",
        [
            service(
                "proxied",
                "10.96.0.91",
                type="LoadBalancer",
                port_extra={"nodePort": 30091},
                status={"loadBalancer": {"ingress": [{"ip": "203.0.113.91", "ipMode": "Proxy"}]}},
            ),
            slice_("proxied", BACKENDS),
        ],
        [Send("203.0.113.91", 80), Send(NODE_IP, 30091)],
    ),
    Case(
        "service-cidr-unallocated",
        [service("web", "10.96.0.10"), slice_("web", BACKENDS)],
        [Send("10.96.0.99", 80)],
        config={"service_cidrs": ("10.96.0.0/16",)},
        modes=("nftables", "nftables/kube-proxy"),
    ),
    Case(
        "localhost-nodeport",
        [
            service("lh", "10.96.0.92", type="NodePort", port_extra={"nodePort": 30092}),
            slice_("lh", BACKENDS),
        ],
        [Send("127.0.0.1", 30092, origin="localhost", src="127.0.0.1")],
        modes=("iptables",),
    ),
    Case(
        "source-ranges-from-the-node",  # the node's IP is in the range: it may use its LB
        [
            _lb(
                "fromnode",
                "10.96.0.63",
                "203.0.113.63",
                30063,
                loadBalancerSourceRanges=["10.10.1.0/24"],
            ),
            slice_("fromnode", BACKENDS),
            _lb(
                "notnode",
                "10.96.0.64",
                "203.0.113.64",
                30064,
                loadBalancerSourceRanges=["192.0.2.0/24"],
            ),
            slice_("notnode", BACKENDS),
        ],
        [
            Send("203.0.113.63", 80, origin="node", src=NODE_IP),
            Send("203.0.113.64", 80, origin="node", src=NODE_IP),
        ],
    ),
    Case(
        "external-ip-local-policy-and-udp-nodeport",
        [
            service(
                "ext",
                "10.96.0.45",
                type="NodePort",
                externalTrafficPolicy="Local",
                externalIPs=["203.0.113.45"],
                port_extra={"nodePort": 30045},
            ),
            slice_("ext", BACKENDS, local=("10.10.2.2", "10.10.2.4")),
            service(
                "dnsnp", "10.96.0.46", proto="UDP", type="NodePort", port_extra={"nodePort": 30046}
            ),
            slice_("dnsnp", BACKENDS, proto="UDP"),
        ],
        [Send("203.0.113.45", 80), Send(NODE_IP, 30045), Send(NODE_IP, 30046, proto="udp")],
    ),
    Case(
        "internal-policy-local-from-the-node",
        [
            service("itpn", "10.96.0.47", internalTrafficPolicy="Local"),
            slice_("itpn", BACKENDS, local=("10.10.2.2",)),
        ],
        [Send("10.96.0.47", 80, origin="node", src=NODE_IP)],
    ),
    Case(
        "local-endpoint-only-terminating",  # ETP Local falls back to the serving-terminating one
        [
            service(
                "lterm",
                "10.96.0.48",
                type="NodePort",
                externalTrafficPolicy="Local",
                port_extra={"nodePort": 30048},
            ),
            {
                **slice_(
                    "lterm",
                    BACKENDS[:1],
                    local=("10.10.2.2",),
                    ready=False,
                    serving=True,
                    terminating=True,
                ),
                "metadata": {
                    "name": "lterm-a",
                    "namespace": "t",
                    "labels": {"kubernetes.io/service-name": "lterm"},
                },
            },
            {
                **slice_("lterm", BACKENDS[1:]),
                "metadata": {
                    "name": "lterm-b",
                    "namespace": "t",
                    "labels": {"kubernetes.io/service-name": "lterm"},
                },
            },
        ],
        [Send(NODE_IP, 30048), Send("10.96.0.48", 80)],
    ),
    Case(
        "not-ready-endpoints-only",
        [service("unready", "10.96.0.49"), slice_("unready", BACKENDS, ready=False)],
        [Send("10.96.0.49", 80)],
    ),
    Case(
        "two-ports-one-service",
        [
            {
                **service("multi", "10.96.0.55"),
                "spec": {
                    "clusterIP": "10.96.0.55",
                    "clusterIPs": ["10.96.0.55"],
                    "ports": [
                        {"name": "p", "port": 80, "protocol": "TCP"},
                        {"name": "q", "port": 81, "protocol": "TCP"},
                    ],
                },
            },
            {
                **slice_("multi", BACKENDS),
                "ports": [
                    {"name": "p", "port": 8080, "protocol": "TCP"},
                    {"name": "q", "port": 8080, "protocol": "UDP"},
                ],
            },
        ],
        [Send("10.96.0.55", 80), Send("10.96.0.55", 81)],
    ),
    Case(
        "nodeport-addresses",  # only 10.10.1.1 answers; the node's other addresses do not
        [
            service("npa", "10.96.0.56", type="NodePort", port_extra={"nodePort": 30056}),
            slice_("npa", BACKENDS),
        ],
        [Send(NODE_IP, 30056), Send("10.10.2.1", 30056, origin="pod", src=BACKENDS[0])],
        config={"nodeport_addresses": ("10.10.1.0/24",)},
    ),
    Case(
        "ipv6",
        [
            service(
                "web6",
                "fd00:96::10",
                type="NodePort",
                ipFamilies=["IPv6"],
                clusterIPs=["fd00:96::10"],
                port_extra={"nodePort": 30100},
            ),
            slice_("web6", BACKENDS6, family="IPv6"),
            service("empty6", "fd00:96::20", ipFamilies=["IPv6"], clusterIPs=["fd00:96::20"]),
            service(
                "local6",
                "fd00:96::30",
                type="NodePort",
                ipFamilies=["IPv6"],
                clusterIPs=["fd00:96::30"],
                externalTrafficPolicy="Local",
                port_extra={"nodePort": 30101},
            ),
            slice_("local6", BACKENDS6, family="IPv6", local=("fd00:10:2::3",)),
        ],
        [
            Send("fd00:96::10", 80),
            Send(NODE_IP6, 30100),
            Send("fd00:96::20", 80),
            Send(NODE_IP6, 30101),
            Send("fd00:96::10", 80, origin="node", src=NODE_IP6),
        ],
        family="IPv6",
        config={"cluster_cidr": "10.10.2.0/24,fd00:10:2::/64"},
    ),
]
