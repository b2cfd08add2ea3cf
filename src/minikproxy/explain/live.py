"""The live side of explain and diff: a cluster read once, and this node's kernel rules."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from typing import Any

from minikproxy.explain.driver import ModeView
from minikproxy.explain.engine import ExplainError
from minikproxy.explain.iptables import IptablesRules
from minikproxy.model.names import IPV6
from minikproxy.sources.manifests import SourcedObject


def list_cluster(kubeconfig: str | None, node_name: str) -> list[SourcedObject]:
    """Services, EndpointSlices and this node's Node, listed once (no watch), with the
    selectors ``run`` uses."""
    from minikproxy.sources.kubeapi import ENDPOINT_SLICES, SERVICES, ResourceSpec, node_spec
    from minikproxy.sources.kubeclient import list_function, load_api_client

    api = load_api_client(kubeconfig)
    specs: list[ResourceSpec] = [SERVICES, ENDPOINT_SLICES]
    if node_name:
        specs.append(node_spec(node_name))
    out: list[SourcedObject] = []
    for spec in specs:
        fn = list_function(api, spec.group_path, spec.plural)
        kwargs: dict[str, Any] = {}
        if spec.label_selector:
            kwargs["label_selector"] = spec.label_selector
        if spec.field_selector:
            kwargs["field_selector"] = spec.field_selector
        token = ""
        while True:
            resp = fn(_preload_content=False, _continue=token or None, **kwargs)
            try:
                body = json.loads(resp.read())
            finally:
                resp.release_conn()
            kind = str(body.get("kind", "")).removesuffix("List")
            for item in body.get("items") or []:
                item.setdefault("kind", kind)
                out.append(SourcedObject(item, f"{spec.group_path}/{spec.plural}"))
            token = (body.get("metadata") or {}).get("continue") or ""
            if not token:
                break
    return out


def live_view(view: ModeView, netns: str = "") -> ModeView:
    """``view`` with the rules this node's kernel holds instead of the compiled ones."""
    if view.mode != "iptables":
        raise ExplainError(f"--against-live: not implemented for {view.mode} mode (iptables only)")
    binary = "ip6tables-save" if view.family == IPV6 else "iptables-save"
    argv = [binary]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ExplainError(f"{binary} failed: {proc.stderr.strip()}")
    return dataclasses.replace(
        view, rules=IptablesRules.from_text(proc.stdout), ruleset=None, mode="iptables"
    )
