"""The synthetic clusters a benchmark runs against, and the Services it sends traffic to.

A cluster of ``size`` Services is :func:`~minikproxy.testing.synthetic.synthetic_cluster`'s
kube-proxy-shaped mix (ClusterIP, NodePort, LoadBalancer; ``endpoints`` endpoints each,
none of them answering), plus the benchmark's own Services in namespace ``zz-bench`` (sorted
after every synthetic one, so iptables' KUBE-SERVICES walk passes every other Service first),
whose endpoints are backend addresses of the benchmark's :class:`~minikproxy.testing.netns.
Topology` and answer:

* ``datapath`` (:data:`DATAPATH_VIP`): ``endpoints`` answering endpoints; connect latency and
  rate are measured against it;
* ``flip-endpoint`` (:data:`FLIP_ENDPOINT_VIP`): no endpoints at first; update rounds add and
  remove one;
* ``flip-service`` (:data:`FLIP_SERVICE_VIP`): its EndpointSlice (one answering endpoint)
  always exists; update rounds create and delete the Service.
"""

from __future__ import annotations

from typing import Any

from minikproxy.testing.synthetic import synthetic_cluster

Obj = dict[str, Any]

NAMESPACE = "zz-bench"
NODE = "node-0"
CLUSTER_CIDR = "10.128.0.0/9"  # where the synthetic endpoints live
SERVICE_CIDR = "10.96.0.0/12"
PORT = 80
TARGET_PORT = 8080
DATAPATH_VIP = "10.100.0.10"
FLIP_ENDPOINT_VIP = "10.100.0.11"
FLIP_SERVICE_VIP = "10.100.0.12"
BACKEND_SUBNET = "10.10.2"  # the Topology's backend /24
#: Endpoints per Service the backend /24 can answer for (.2 to .251; ``--endpoints``).
MAX_ENDPOINTS = 250
#: A backend address nothing listens on (a connection to it is refused at once), in a
#: topology made with ``refusing=(REFUSING_BACKEND,)``; above every :func:`backend_addresses`.
REFUSING_BACKEND = f"{BACKEND_SUBNET}.254"


def backend_addresses(count: int) -> tuple[str, ...]:
    """``count`` backend addresses in the topology's backend subnet (.2 upwards)."""
    if not 1 <= count <= MAX_ENDPOINTS:
        raise ValueError(
            f"--endpoints must be 1..{MAX_ENDPOINTS} for the answering Service, got {count}"
        )
    return tuple(f"{BACKEND_SUBNET}.{2 + i}" for i in range(count))


def bench_service(name: str, vip: str) -> Obj:
    """A ClusterIP Service of the benchmark's namespace."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET_PORT}],
        },
    }


def bench_slice(name: str, addresses: tuple[str, ...]) -> Obj:
    """The EndpointSlice of Service ``name``: ``addresses``, ready, on this node."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-bench",
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": NODE,
            }
            for address in addresses
        ],
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
    }


def cluster_objects(size: int, endpoints: int, *, flip_service: bool = True) -> list[Obj]:
    """The node, ``size`` synthetic Services with their slices, and the benchmark's Services
    (``flip-service`` itself only if ``flip_service``)."""
    answering = backend_addresses(endpoints)
    objs = synthetic_cluster(size, endpoints)
    objs += [
        bench_service("datapath", DATAPATH_VIP),
        bench_slice("datapath", answering),
        bench_service("flip-endpoint", FLIP_ENDPOINT_VIP),
        bench_slice("flip-endpoint", ()),
        bench_slice("flip-service", answering[:1]),
    ]
    if flip_service:
        objs.append(bench_service("flip-service", FLIP_SERVICE_VIP))
    return objs
