"""A dry-run controller (compiles as in production, never touches the kernel) against the
fake API server, through the official client: the shared setup of the controller tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.sources.kubeclient import load_api_client


def dry_run_controller(kubeconfig: Path, node: str, **settings: Any) -> Controller:
    """An IPv4 dry-run controller for ``node`` with no minimum sync interval, fast reflector
    backoff and no events; ``settings`` override the configuration. Not started."""
    config = ProxyConfig().with_overrides(
        hostname_override=node, min_sync_period=0.0, sync_period=30.0, **settings
    )
    return Controller(
        config,
        node,
        load_api_client(str(kubeconfig)),
        execer=None,
        families=[IPV4],
        out=io.StringIO(),
        record_events=False,
        reflector_options={"backoff_initial": 0.05, "backoff_max": 0.2},
    )
