"""Kubernetes Events the proxy records, as kube-proxy does (events.k8s.io/v1)."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

REPORTING_CONTROLLER = "minikproxy"


def starting_event(node_name: str, now: datetime | None = None) -> dict[str, Any]:
    """kube-proxy's start-up Event on its Node: type Normal, reason ``Starting``, action
    ``StartKubeProxy``; Events about cluster-scoped objects live in ``default``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{node_name}.{secrets.token_hex(8)}", "namespace": "default"},
        "eventTime": stamp,
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": f"{REPORTING_CONTROLLER}-{node_name}",
        "action": "StartKubeProxy",
        "reason": "Starting",
        "type": "Normal",
        "regarding": {"kind": "Node", "name": node_name, "uid": node_name, "apiVersion": "v1"},
    }


def record_starting(api_client: Any, node_name: str) -> bool:
    """Create the start-up Event; a failure is logged, never fatal. True if recorded."""
    from kubernetes import client  # imported lazily: the CLI's render path never needs it

    from minikproxy.sources.kubeapi import describe_error

    try:
        api = client.EventsV1Api(api_client)
        body: Any = starting_event(node_name)  # a plain dict: the client serialises it as is
        api.create_namespaced_event("default", body, _preload_content=False)
    except Exception as err:  # any API or connection error: the proxy runs regardless
        logger.warning(
            "could not record the Starting event for node %s: %s", node_name, describe_error(err)
        )
        return False
    return True
