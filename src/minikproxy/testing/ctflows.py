"""A conntrack flow population for the churn soak: UDP flows to Services, answered by their
serving endpoints, that go stale as the churn changes the Services; and flows that are no
Service's, which must survive every reconcile.

Flows are inserted through ctnetlink (:meth:`~minikproxy.dataplane.ctnetlink.CtNetlink.create`)
into the node's network namespace; each kind has its own source range, so a dump tells them
apart:

* Service flows, from ``10.50.0.0/16``: to a UDP service port's cluster IP and port, or to
  its NodePort on the node address, DNATed to one of its serving endpoints.
* Other UDP flows, from ``10.60.0.0/16``: to outside hosts (plain and DNATed to another
  outside host), to a cluster IP on a port no Service has, to the node address on a port
  outside the NodePort range.
* TCP flows (the larger mixed table), from ``10.70.0.0/16`` to outside hosts.

What a Service frontend's serving endpoints are is computed here from the API objects
themselves (:func:`udp_service_frontends`), not from the proxy's model, so a check against it
is independent of :mod:`minikproxy.ctreconcile`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from minikproxy.ctreconcile import Frontend, pack_ip
from minikproxy.dataplane.ctnetlink import CtNetlink, pack_port
from minikproxy.dataplane.nsenter import run_in_netns
from minikproxy.model.names import IPV4

SERVICE_SOURCES = "10.50.0.0"
OTHER_SOURCES = "10.60.0.0"
TCP_SOURCES = "10.70.0.0"
_SERVICE_PREFIX = pack_ip(SERVICE_SOURCES)[:2]
_OTHER_PREFIX = pack_ip(OTHER_SOURCES)[:2]
IPPROTO_TCP = 6
FLOW_TIMEOUT = 7200  # seconds: no flow expires during a soak
_PORTS_PER_IP = 60_000

Triple = tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]


def _source(base: str, n: int) -> tuple[bytes, bytes]:
    """The ``n``-th distinct (IP, port) source of a range."""
    ip = ipaddress.ip_address(base) + n // _PORTS_PER_IP
    return ip.packed, pack_port(1024 + n % _PORTS_PER_IP)


def _text(ip_port: tuple[bytes, bytes]) -> str:
    return f"{ipaddress.ip_address(ip_port[0])}:{int.from_bytes(ip_port[1], 'big')}"


def udp_service_frontends(
    objects: Iterable[Mapping[str, Any]], node_ip: str
) -> dict[Frontend, frozenset[Frontend]]:
    """Each UDP service port's cluster IP frontend (and NodePort on ``node_ip``), with the
    (IP, port) of its serving endpoints, from raw Service and EndpointSlice objects (IPv4).

    An endpoint serves when ``conditions.serving`` is not false (unset: ``ready`` is not
    false); its port is the slice's port of the same name and protocol."""
    services = [o for o in objects if o.get("kind") == "Service"]
    slices: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for obj in objects:
        if obj.get("kind") != "EndpointSlice" or obj.get("addressType") != "IPv4":
            continue
        meta = obj["metadata"]
        owner = meta.get("labels", {}).get("kubernetes.io/service-name")
        if owner:
            slices.setdefault((meta["namespace"], owner), []).append(obj)
    out: dict[Frontend, frozenset[Frontend]] = {}
    node = pack_ip(node_ip)
    for svc in services:
        spec, meta = svc.get("spec", {}), svc["metadata"]
        cluster_ip = spec.get("clusterIP")
        if spec.get("type") == "ExternalName" or not cluster_ip or cluster_ip == "None":
            continue
        for port in spec.get("ports", ()):
            if port.get("protocol", "TCP") != "UDP":
                continue
            name = port.get("name", "")
            serving: set[Frontend] = set()
            for sl in slices.get((meta["namespace"], meta["name"]), ()):
                numbers = [
                    p["port"]
                    for p in sl.get("ports") or ()
                    if p.get("name", "") == name and p.get("protocol", "TCP") == "UDP"
                ]
                if not numbers or numbers[0] is None:
                    continue
                for ep in sl.get("endpoints") or ():
                    cond = ep.get("conditions") or {}
                    serves = cond.get("serving")
                    if serves is None:
                        serves = cond.get("ready") is not False
                    if serves and ep.get("addresses"):
                        serving.add((pack_ip(ep["addresses"][0]), pack_port(numbers[0])))
            endpoints = frozenset(serving)
            out[(pack_ip(cluster_ip), pack_port(port["port"]))] = endpoints
            if port.get("nodePort"):
                out[(node, pack_port(port["nodePort"]))] = endpoints
    return out


@dataclass
class FlowCheck:
    """The conntrack table at a checkpoint: Service flows left, other UDP flows left (of how
    many inserted), and every Service flow that breaks the invariant (described)."""

    service_flows: int
    other_flows: int
    others_inserted: int
    violations: list[str] = field(default_factory=list)
    added: int = 0  # Service flows inserted after the check (the top-up)

    @property
    def ok(self) -> bool:
        """No stale Service flow left and every other flow still there."""
        return not self.violations and self.other_flows == self.others_inserted


class FlowPopulation:
    """Keeps ``service_flows`` UDP Service flows (topped up on request) and ``other_flows``
    UDP plus ``tcp_flows`` TCP flows that are no Service's in the network namespace
    ``netns``'s conntrack table."""

    def __init__(
        self,
        netns: str,
        node_ip: str,
        *,
        service_flows: int,
        other_flows: int,
        tcp_flows: int = 0,
        seed: int = 0,
    ) -> None:
        self.node_ip = node_ip
        self.service_target = service_flows
        self.other_target = other_flows
        self.tcp_target = tcp_flows
        self.rng = random.Random(seed)
        self.ct = run_in_netns(netns, CtNetlink)
        self.others_inserted = 0
        self.service_inserted = 0
        self._next_service = 0

    def close(self) -> None:
        """Close the netlink socket."""
        self.ct.close()

    def _create(self, flows: list[Triple], protocol: int = 17) -> None:
        for i in range(0, len(flows), 5000):
            chunk = flows[i : i + 5000]
            result = self.ct.create(IPV4, chunk, timeout=FLOW_TIMEOUT, protocol=protocol)
            if result.deleted != len(chunk):
                raise RuntimeError(f"could not insert conntrack flows: {result}")

    def insert_others(self) -> None:
        """Insert the flows that are no Service's (once, before the churn)."""
        node, flows = pack_ip(self.node_ip), []
        for n in range(self.other_target):
            origin = _source(OTHER_SOURCES, n)
            outside = (ipaddress.ip_address("172.16.0.0") + n % 1000).packed
            kind = n % 4
            if kind == 0:  # plain, to an outside DNS server
                flows.append((origin, (outside, pack_port(53)), (outside, pack_port(53))))
            elif kind == 1:  # DNATed by something else, to another outside host
                other = (ipaddress.ip_address("172.17.0.0") + n % 1000).packed
                flows.append((origin, (outside, pack_port(443)), (other, pack_port(8443))))
            elif kind == 2:  # a cluster IP, on a port no Service has
                vip = (ipaddress.ip_address("10.96.0.1") + n % 200).packed
                flows.append((origin, (vip, pack_port(9)), (vip, pack_port(9))))
            else:  # the node address, outside the NodePort range
                flows.append((origin, (node, pack_port(5000)), (node, pack_port(5000))))
        self._create(flows)
        self.others_inserted = len(flows)
        tcp = [
            (
                _source(TCP_SOURCES, n),
                ((ipaddress.ip_address("172.16.0.0") + n % 1000).packed, pack_port(443)),
                ((ipaddress.ip_address("172.16.0.0") + n % 1000).packed, pack_port(443)),
            )
            for n in range(self.tcp_target)
        ]
        self._create(tcp, IPPROTO_TCP)

    def check(self, wanted: Mapping[Frontend, frozenset[Frontend]]) -> FlowCheck:
        """Dump the UDP flows and check them against ``wanted`` (the current Services'
        frontends and serving endpoints, :func:`udp_service_frontends`): every Service flow
        left goes to a current frontend and is answered by one of its serving endpoints (a
        frontend that went away loses its flows), and every other flow is still there."""
        services = others = 0
        violations: list[str] = []
        for row in self.ct.dump_udp(IPV4).rows:
            prefix = row[1][:2]
            if prefix == _OTHER_PREFIX:
                others += 1
                continue
            if prefix != _SERVICE_PREFIX:
                continue
            services += 1
            sent_to, answered_by = (row[2], row[4]), (row[5], row[6])
            serving = wanted.get(sent_to)
            if serving is None:
                violations.append(f"{_text(sent_to)} is no Service's now, its flow survived")
            elif answered_by not in serving:
                violations.append(f"{_text(sent_to)} answered by {_text(answered_by)}: stale")
        return FlowCheck(services, others, self.others_inserted, violations)

    def top_up(self, wanted: Mapping[Frontend, frozenset[Frontend]], present: int) -> int:
        """Insert Service flows until there are ``service_flows`` (``present`` are there):
        each to a random frontend of ``wanted`` that has serving endpoints, answered by a
        random one of them. Returns how many were inserted."""
        live = sorted((f, sorted(eps)) for f, eps in wanted.items() if eps)
        missing = self.service_target - present
        if not live or missing <= 0:
            return 0
        flows: list[Triple] = []
        for _ in range(missing):
            sent_to, endpoints = self.rng.choice(live)
            origin = _source(SERVICE_SOURCES, self._next_service)
            self._next_service += 1
            flows.append((origin, sent_to, self.rng.choice(endpoints)))
        self._create(flows)
        self.service_inserted += len(flows)
        return len(flows)
