"""API objects for the end-to-end tests: Services, EndpointSlices and the Node ``node-1``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.dataplane.execer import Execer
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.sources.kubeclient import load_api_client

NODE = "node-1"


def service(name: str, ip: str, proto: str = "TCP", **spec: Any) -> dict[str, Any]:
    """A Service in ``default`` with one port 80 named ``p`` (``port_extra`` adds fields to
    the port, other keywords go into ``spec``)."""
    ports = [{"name": "p", "port": 80, "protocol": proto, **spec.pop("port_extra", {})}]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports, **spec},
    }


def endpoint_slice(
    name: str,
    ips: list[str],
    proto: str = "TCP",
    local: tuple[str, ...] = (),
    trigger: str | None = None,
) -> dict[str, Any]:
    """The IPv4 EndpointSlice of ``name``: ready endpoints on port 8080; those in ``local``
    run on this node, the others on ``node-2``; ``trigger`` sets the last-change-trigger-time."""
    metadata: dict[str, Any] = {
        "name": f"{name}-1",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": name},
    }
    if trigger is not None:
        metadata["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": True},
                "nodeName": NODE if ip in local else "node-2",
            }
            for ip in ips
        ],
        "ports": [{"name": "p", "port": 8080, "protocol": proto}],
    }


NODE_OBJ: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": NODE},
    "status": {"addresses": [{"type": "InternalIP", "address": "10.10.1.1"}]},
}


def start_controller(
    kubeconfig: Path,
    execer: Execer,
    before_start: Callable[[Controller], None] | None = None,
    families: Sequence[IPFamily] = (IPV4,),
    **config: Any,
) -> Controller:
    """Start a Controller for ``node-1`` that programs ``execer``'s netns through the fake API
    server of ``kubeconfig``, with its HTTP servers on 127.0.0.1 ephemeral ports;
    ``before_start`` is called with it before it starts (to wrap its parts); IPv4 only
    unless ``families`` says otherwise."""
    settings = {
        "hostname_override": NODE,
        "cluster_cidr": "10.10.2.0/24",
        "min_sync_period": 0.0,
        "sync_period": 30.0,
        **config,
    }
    controller = Controller(
        ProxyConfig().with_overrides(**settings),
        NODE,
        load_api_client(str(kubeconfig)),
        execer=execer,
        backend="nft",
        families=list(families),
        metrics_bind_address="127.0.0.1:0",
        healthz_bind_address="127.0.0.1:0",
        service_health_addresses=("127.0.0.1",),
        reflector_options={"backoff_initial": 0.05, "backoff_max": 0.3},
    )
    if before_start is not None:
        before_start(controller)
    controller.start()
    return controller
