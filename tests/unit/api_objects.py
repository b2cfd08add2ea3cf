"""API objects for the unit tests that talk to the fake API server or feed a tracker."""

from __future__ import annotations

from typing import Any


def service(name: str, ip: str, **labels: str) -> dict[str, Any]:
    """A ClusterIP Service in ``default`` with one TCP port 80 named ``p``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP"}],
        },
    }


def endpoint_slice(name: str, *addresses: str, **labels: str) -> dict[str, Any]:
    """The IPv4 EndpointSlice ``<name>-1`` of Service ``name`` in ``default``: one ready
    endpoint per address, TCP port 8080 named ``p``."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name, **labels},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
    }


def service_cidr(name: str, *cidrs: str) -> dict[str, Any]:
    """A ``networking.k8s.io/v1`` ServiceCIDR (cluster-scoped) holding ``cidrs``."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }
