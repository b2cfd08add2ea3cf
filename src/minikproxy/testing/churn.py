"""An operator-shaped cluster and a random stream of changes to it, for churn soaks.

:class:`ChurnCluster` builds ``services`` Services of every type (ClusterIP, NodePort,
LoadBalancer with and without source ranges, external IPs, a few headless and ExternalName
ones), ``udp_share`` of their ports UDP, Local traffic policies, ClientIP affinity, multi-port
Services, and EndpointSlices with ready, terminating and not-ready endpoints on this node and
others, some with zone hints. :meth:`ChurnCluster.next_change` then yields random API writes
(create, update, delete) the way controllers make them: scaling and rolling endpoints,
flipping conditions, editing Services, deleting and creating Services with their slices.
Everything is drawn from one seeded :class:`random.Random`, so a seed replays a run.
"""

from __future__ import annotations

import copy
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

Obj = dict[str, Any]
Op = Literal["create", "update", "delete"]

NODE = "node-1"
NODE_IP = "10.10.1.1"
NODES = (NODE, "node-2", "node-3")
ZONES = {"node-1": "zone-a", "node-2": "zone-b", "node-3": "zone-c"}
CLUSTER_CIDR = "10.244.0.0/16"
_PORT_NUMBERS = (53, 80, 443, 8080, 9090, 5432, 6379, 8443)


@dataclass(frozen=True)
class Change:
    """One API write: ``create``/``update`` carry the whole object, ``delete`` only its
    kind (``plural``), namespace and name. ``hidden``: a proxy never sees it (an
    EndpointSlice of a headless Service, which kube-proxy's watch filters out)."""

    op: Op
    plural: str
    namespace: str
    name: str
    obj: Obj | None = None
    hidden: bool = False


def node_object() -> Obj:
    """This node (``node-1``, zone ``zone-a``, InternalIP 10.10.1.1: the netns topology's
    node address)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": ZONES[NODE]}},
        "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
    }


class ChurnCluster:
    """A mutable cluster of ``services`` Services and their slices, and random changes to it.

    The generator assumes every change it returns is applied (it keeps its own copy of the
    objects as the API server would hold them after the write).
    """

    def __init__(self, services: int = 300, *, udp_share: float = 0.2, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.udp_share = udp_share
        self.services: dict[tuple[str, str], Obj] = {}
        self.slices: dict[tuple[str, str], list[str]] = {}  # service -> its slice names
        self.slice_objs: dict[tuple[str, str], Obj] = {}  # (namespace, slice name) -> slice
        self._next_service = 0
        self._next_endpoint = 0
        self._free_node_ports = list(range(30000, 32000))
        self.rng.shuffle(self._free_node_ports)
        self._followups: deque[Change] = deque()
        self._initial: list[Obj] = [node_object()]
        for _ in range(services):
            for change in self._new_service():
                assert change.obj is not None
                self._initial.append(change.obj)
        self._followups.clear()

    # --- objects ------------------------------------------------------------------------------

    def initial_objects(self) -> list[Obj]:
        """The Node, Services and EndpointSlices to create before the churn starts."""
        return list(self._initial)

    def _node_port(self) -> int:
        return self._free_node_ports.pop()

    def _release_ports(self, spec: Obj) -> None:
        for port in spec.get("ports", ()):
            if "nodePort" in port:
                self._free_node_ports.insert(0, port.pop("nodePort"))
        if "healthCheckNodePort" in spec:
            self._free_node_ports.insert(0, spec.pop("healthCheckNodePort"))

    def _ports(self, count: int) -> list[Obj]:
        numbers = self.rng.sample(_PORT_NUMBERS, count)
        return [
            {
                "name": f"p{n}",
                "port": number,
                "protocol": "UDP" if self.rng.random() < self.udp_share else "TCP",
                "targetPort": 8000 + n,
            }
            for n, number in enumerate(numbers)
        ]

    def _set_type(self, svc: Obj, svc_type: str) -> None:
        """Make ``svc`` a ClusterIP, NodePort or LoadBalancer Service (node ports, policies,
        load-balancer status follow), as the API server's defaulting and validation do."""
        spec, index = svc["spec"], svc["metadata"]["annotations"]["churn/index"]
        self._release_ports(spec)
        for key in ("externalTrafficPolicy", "loadBalancerSourceRanges"):
            spec.pop(key, None)
        svc["status"] = {"loadBalancer": {}}
        spec["type"] = svc_type
        if svc_type == "ClusterIP":
            return
        for port in spec["ports"]:
            port["nodePort"] = self._node_port()
        spec["externalTrafficPolicy"] = "Local" if self.rng.random() < 0.4 else "Cluster"
        if svc_type == "LoadBalancer":
            i = int(index)
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.51.{i // 250}.{i % 250}"}]}}
            if self.rng.random() < 0.3:
                spec["loadBalancerSourceRanges"] = ["192.168.0.0/16", "10.10.1.0/24"]
            if spec["externalTrafficPolicy"] == "Local":
                spec["healthCheckNodePort"] = self._node_port()

    def _service(self, index: int) -> Obj:
        name, namespace = f"svc-{index}", f"ns-{index % 10}"
        roll = self.rng.random()
        headless = roll < 0.03
        ip = "None" if headless else f"10.96.{index // 250}.{index % 250 + 1}"
        ports = self._ports(self.rng.choices((1, 2, 3), weights=(70, 20, 10))[0])
        svc: Obj = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": {"churn/index": str(index)},
            },
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, "type": "ClusterIP"},
            "status": {"loadBalancer": {}},
        }
        if 0.03 <= roll < 0.05:
            svc["spec"] = {"type": "ExternalName", "externalName": f"{name}.example.org"}
            return svc
        if not headless:
            self._set_type(svc, self.rng.choices(("ClusterIP", "NodePort", "LoadBalancer"),
                                                 weights=(50, 25, 25))[0])  # fmt: skip
            self._edit_service(svc, rounds=2)
        return svc

    def _endpoint(self) -> Obj:
        n = self._next_endpoint
        self._next_endpoint += 1
        node = self.rng.choice(NODES)
        ep: Obj = {
            "addresses": [f"10.244.{n // 250 % 250}.{n % 250 + 2}"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": node,
            "zone": ZONES[node],
        }
        self._set_condition(ep)
        return ep

    def _set_condition(self, ep: Obj) -> None:
        state = self.rng.choices(
            ("ready", "terminating", "terminating-unserving", "unready"), weights=(80, 8, 4, 8)
        )[0]
        ep["conditions"] = {
            "ready": {"ready": True, "serving": True, "terminating": False},
            "terminating": {"ready": False, "serving": True, "terminating": True},
            "terminating-unserving": {"ready": False, "serving": False, "terminating": True},
            "unready": {"ready": False, "serving": False, "terminating": False},
        }[state]

    def _slice(self, svc: Obj, suffix: int) -> Obj:
        meta = svc["metadata"]
        labels = {
            "kubernetes.io/service-name": meta["name"],
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        }
        if svc["spec"].get("clusterIP") == "None":
            labels["service.kubernetes.io/headless"] = ""
        count = self.rng.choice((0, 1, 1, 2, 2, 2, 3, 4, 5))
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{meta['name']}-{suffix}",
                "namespace": meta["namespace"],
                "labels": labels,
            },
            "addressType": "IPv4",
            "endpoints": [self._endpoint() for _ in range(count)],
            "ports": self._slice_ports(svc),
        }

    @staticmethod
    def _slice_ports(svc: Obj) -> list[Obj]:
        return [
            {"name": p["name"], "port": p["targetPort"], "protocol": p["protocol"]}
            for p in svc["spec"].get("ports", ())
        ]

    # --- changes ------------------------------------------------------------------------------

    def _new_service(self) -> list[Change]:
        index = self._next_service
        self._next_service += 1
        svc = self._service(index)
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        self.services[key] = svc
        changes = [Change("create", "services", *key, copy.deepcopy(svc))]
        if svc["spec"]["type"] == "ExternalName":
            self.slices[key] = []
            return changes
        names = []
        for suffix in range(self.rng.choices((1, 2), weights=(85, 15))[0]):
            sl = self._slice(svc, suffix)
            names.append(sl["metadata"]["name"])
            self.slice_objs[(key[0], sl["metadata"]["name"])] = sl
            changes.append(
                Change(
                    "create", "endpointslices", key[0], names[-1], copy.deepcopy(sl), _headless(sl)
                )
            )
        self.slices[key] = names
        return changes

    def _delete_service(self, key: tuple[str, str]) -> list[Change]:
        svc = self.services.pop(key)
        self._release_ports(svc["spec"])
        changes = [Change("delete", "services", *key)]
        for name in self.slices.pop(key):
            sl = self.slice_objs.pop((key[0], name))
            changes.append(Change("delete", "endpointslices", key[0], name, None, _headless(sl)))
        return changes

    def _edit_service(self, svc: Obj, rounds: int = 1) -> None:
        spec = svc["spec"]
        for _ in range(rounds):
            what = self.rng.randrange(7)
            if what == 0:
                if spec.get("sessionAffinity") == "ClientIP":
                    spec.pop("sessionAffinity")
                    spec.pop("sessionAffinityConfig", None)
                elif self.rng.random() < 0.3:
                    spec["sessionAffinity"] = "ClientIP"
                    timeout = self.rng.choice((60, 10800))
                    spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": timeout}}
            elif what == 1 and spec["type"] != "ClusterIP":
                local = spec.get("externalTrafficPolicy") != "Local"
                spec["externalTrafficPolicy"] = "Local" if local else "Cluster"
                if spec["type"] == "LoadBalancer" and local:
                    spec["healthCheckNodePort"] = self._node_port()
                elif "healthCheckNodePort" in spec:
                    self._free_node_ports.insert(0, spec.pop("healthCheckNodePort"))
            elif what == 2:
                if spec.get("internalTrafficPolicy") == "Local":
                    spec.pop("internalTrafficPolicy")
                elif self.rng.random() < 0.3:
                    spec["internalTrafficPolicy"] = "Local"
            elif what == 3:
                if spec.get("externalIPs"):
                    spec.pop("externalIPs")
                elif self.rng.random() < 0.3:
                    i = int(svc["metadata"]["annotations"]["churn/index"])
                    spec["externalIPs"] = [f"203.0.{i // 250}.{i % 250 + 1}"]
            elif what == 4 and rounds == 1:
                svc_type = self.rng.choice(("ClusterIP", "NodePort", "LoadBalancer"))
                self._set_type(svc, svc_type)
            elif what == 5 and spec["type"] == "LoadBalancer":
                if "loadBalancerSourceRanges" in spec:
                    spec.pop("loadBalancerSourceRanges")
                else:
                    spec["loadBalancerSourceRanges"] = ["192.168.0.0/16"]
            elif what == 6 and rounds == 1 and spec.pop("trafficDistribution", None) is None:
                spec["trafficDistribution"] = "PreferClose"

    def _edit_ports(self, svc: Obj) -> None:
        """Add or remove a port (the slices follow, as the EndpointSlice controller's do)."""
        spec = svc["spec"]
        ports = spec["ports"]
        if len(ports) > 1 and self.rng.random() < 0.5:
            gone = ports.pop(self.rng.randrange(len(ports)))
            if "nodePort" in gone:
                self._free_node_ports.insert(0, gone["nodePort"])
            return
        used = {p["port"] for p in ports}
        free = [n for n in _PORT_NUMBERS if n not in used]
        names = {p["name"] for p in ports}
        n = next(i for i in range(10) if f"p{i}" not in names)
        port: Obj = {
            "name": f"p{n}",
            "port": self.rng.choice(free),
            "protocol": "UDP" if self.rng.random() < self.udp_share else "TCP",
            "targetPort": 8000 + n,
        }
        if spec["type"] != "ClusterIP":
            port["nodePort"] = self._node_port()
        ports.append(port)

    def _edit_slice(self, sl: Obj) -> None:
        eps = sl["endpoints"]
        what = self.rng.randrange(5)
        if what == 0:  # scale
            target = self.rng.choice((0, 1, 1, 2, 3, 4, 5))
            while len(eps) > target:
                eps.pop(self.rng.randrange(len(eps)))
            while len(eps) < target:
                eps.append(self._endpoint())
        elif what == 1 and eps:  # a rolling update: one pod replaced
            eps[self.rng.randrange(len(eps))]["conditions"] = {
                "ready": False,
                "serving": True,
                "terminating": True,
            }
            eps.append(self._endpoint())
            eps[:] = [e for e in eps if not e["conditions"]["terminating"]] + [
                e for e in eps if e["conditions"]["terminating"]
            ][-1:]
        elif what == 2 and eps:  # a condition flips
            self._set_condition(eps[self.rng.randrange(len(eps))])
        elif what == 3:  # topology hints on or off (for the whole slice, as the controller)
            hinted = any("hints" in e for e in eps)
            for e in eps:
                if hinted:
                    e.pop("hints", None)
                else:
                    e["hints"] = {"forZones": [{"name": e["zone"]}]}
        elif eps and self.rng.random() < 0.5:  # one endpoint gone
            eps.pop(self.rng.randrange(len(eps)))
        else:  # one endpoint added
            eps.append(self._endpoint())

    def next_change(self) -> Change:
        """The next random API write (follow-ups of a multi-object change come first)."""
        if self._followups:
            return self._followups.popleft()
        roll = self.rng.random()
        keys = list(self.services)
        if roll < 0.07 or not keys:
            changes = self._new_service()
        elif roll < 0.14:
            changes = self._delete_service(self.rng.choice(keys))
        elif roll < 0.32:
            key = self.rng.choice(keys)
            svc = self.services[key]
            if svc["spec"]["type"] == "ExternalName" or svc["spec"]["clusterIP"] == "None":
                return self.next_change()
            if self.rng.random() < 0.25:
                self._edit_ports(svc)
                changes = [Change("update", "services", *key, copy.deepcopy(svc))]
                for name in self.slices[key]:
                    sl = self.slice_objs[(key[0], name)]
                    sl["ports"] = self._slice_ports(svc)
                    changes.append(
                        Change("update", "endpointslices", key[0], name, copy.deepcopy(sl))
                    )
            else:
                self._edit_service(svc)
                changes = [Change("update", "services", *key, copy.deepcopy(svc))]
        else:
            key = self.rng.choice(keys)
            names = self.slices[key]
            if not names:
                return self.next_change()
            name = self.rng.choice(names)
            sl = self.slice_objs[(key[0], name)]
            self._edit_slice(sl)
            changes = [
                Change("update", "endpointslices", key[0], name, copy.deepcopy(sl), _headless(sl))
            ]
        self._followups.extend(changes[1:])
        return changes[0]


def _headless(sl: Obj) -> bool:
    return "service.kubernetes.io/headless" in sl["metadata"]["labels"]
