"""Shared fixtures: synthetic kube-proxy-shaped clusters, built once per size."""

from __future__ import annotations

from functools import cache

from minikproxy.changes import ClusterTracker, Snapshot
from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.localdetect import make_local_detector
from minikproxy.model.names import IPV4
from minikproxy.testing.synthetic import synthetic_cluster

ENDPOINTS_PER_SERVICE = 10


@cache
def tracked(services: int) -> tuple[ClusterTracker, Snapshot]:
    """A tracker fed ``services`` x 10 endpoints, and its first IPv4 snapshot."""
    tracker = ClusterTracker("node-0")
    tracker.add_objects(synthetic_cluster(services, ENDPOINTS_PER_SERVICE))
    return tracker, tracker.snapshot(IPV4)


def bench_options() -> IptablesOptions:
    """Options like a real node's: ClusterCIDR detection, a node IP."""
    detector = make_local_detector("ClusterCIDR", IPV4, cluster_cidrs=["10.128.0.0/9"])
    return IptablesOptions(local_detector=detector, node_ip="192.168.0.10")
