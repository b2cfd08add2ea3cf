"""Synthetic, kube-proxy-shaped clusters for benchmarks and property tests.

Each Service has one named TCP port and one EndpointSlice of ``endpoints_per_service`` ready
endpoints spread over ``nodes`` nodes. The mix is kube-proxy-shaped: of every 20 Services, 17
are ClusterIP, 2 NodePort (numbers 0 and 10) and 1 LoadBalancer (number 5, with an ingress IP
in 198.18.0.0/15 and a NodePort). NodePorts are unique up to ~18k Services. At 10k x 10 this
compiles to ~430k iptables lines, like kube-proxy's output.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def _node_port(i: int) -> int:
    """A NodePort for Service ``i`` (a NodePort or LoadBalancer), distinct from the others'."""
    ordinal = (i // 20) * 3 + {0: 0, 5: 1, 10: 2}[i % 20]
    return 30000 + ordinal % 2768


def service_type(i: int) -> str:
    """The type of Service number ``i`` in the synthetic mix."""
    if i % 10 == 0:
        return "NodePort"
    return "LoadBalancer" if i % 20 == 5 else "ClusterIP"


def synthetic_service(i: int) -> Obj:
    """Service number ``i``."""
    kind = service_type(i)
    spec: Obj = {
        "type": kind,
        "clusterIP": f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    }
    svc: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 50}", "resourceVersion": "1"},
        "spec": spec,
    }
    if kind != "ClusterIP":
        spec["ports"][0]["nodePort"] = _node_port(i)
    if kind == "LoadBalancer":
        j = i // 20
        ingress = f"198.{18 + j // 65536}.{(j // 256) % 256}.{j % 256}"
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": ingress}]}}
    return svc


def synthetic_slice(i: int, endpoints: int, *, nodes: int = 10, generation: int = 0) -> Obj:
    """The EndpointSlice of Service ``i``; ``generation`` shifts the endpoint addresses."""
    eps = []
    for j in range(endpoints):
        n = i * endpoints + j + generation * 7919
        eps.append(
            {
                "addresses": [f"10.{128 + (n >> 16) % 128}.{(n >> 8) & 255}.{n & 255}"],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": f"node-{n % nodes}",
            }
        )
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-abcde",
            "namespace": f"ns-{i % 50}",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
            "resourceVersion": "1",
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def synthetic_node(name: str = "node-0") -> Obj:
    """A Node with one InternalIP."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]},
    }


def synthetic_cluster(services: int, endpoints_per_service: int, *, nodes: int = 10) -> list[Obj]:
    """Services, their EndpointSlices and node-0."""
    objs: list[Obj] = [synthetic_node()]
    for i in range(services):
        objs.append(synthetic_service(i))
        objs.append(synthetic_slice(i, endpoints_per_service, nodes=nodes))
    return objs
