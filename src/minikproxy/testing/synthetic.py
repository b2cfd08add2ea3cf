"""Synthetic, kube-proxy-shaped clusters for benchmarks and property tests.

Each Service is a ClusterIP Service with one named TCP port and one EndpointSlice of
``endpoints_per_service`` ready endpoints spread over ``nodes`` nodes; every tenth Service is
a NodePort. At 10k x 10 this compiles to ~430k iptables lines, like kube-proxy's output.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def synthetic_service(i: int) -> Obj:
    """Service number ``i``."""
    spec: Obj = {
        "type": "NodePort" if i % 10 == 0 else "ClusterIP",
        "clusterIP": f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    }
    if i % 10 == 0:
        spec["ports"][0]["nodePort"] = 30000 + (i // 10) % 2768
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": f"ns-{i % 50}", "resourceVersion": "1"},
        "spec": spec,
    }


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
