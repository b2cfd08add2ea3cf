"""The live side of explain and diff: a cluster read once, and this node's kernel rules."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from minikproxy.explain.driver import ModeView
from minikproxy.explain.engine import ExplainError
from minikproxy.explain.iptables import IptablesRules
from minikproxy.explain.nft import NftRules
from minikproxy.explain.nftlist import list_to_commands
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


def live_view(view: ModeView, netns: str = "", *, timeout: float = 60.0) -> ModeView:
    """``view`` with the rules this node's kernel holds instead of the compiled ones: in
    iptables mode ``iptables-save`` of the backend the node uses (detected as ``run`` does),
    in nftables mode ``nft list table`` of the mode's table, in IPVS mode ``ipset save``,
    ``ipvsadm -S -n``, the addresses of ``kube-ipvs0`` and ``iptables-save``. ``netns`` runs
    the tools in that network namespace."""
    from minikproxy.dataplane.execer import RealExecer
    from minikproxy.dataplane.iptables import binary_name, detect_backend

    execer = RealExecer(netns or None, timeout=timeout)
    try:
        if view.mode == "ipvs":
            return dataclasses.replace(view, rules=_live_ipvs(execer, view), ruleset=None)
        if view.mode == "iptables":
            tool = binary_name(view.family, detect_backend(execer), "save")
            text = _run(execer, [tool])
            return dataclasses.replace(view, rules=IptablesRules.from_text(text), ruleset=None)
        family = "ip6" if view.family == IPV6 else "ip"
        table = "kube-proxy" if view.mode == "nftables/kube-proxy" else "minikproxy"
        text = _run(execer, ["nft", "list", "table", family, table])
    finally:
        execer.close()
    rules = NftRules.from_lines(list_to_commands(text))
    return dataclasses.replace(view, rules=rules, ruleset=None)


def _live_ipvs(execer: Any, view: ModeView) -> Any:
    from minikproxy.compile.ipvs import DUMMY_DEVICE
    from minikproxy.dataplane.iptables import binary_name, detect_backend
    from minikproxy.explain.ipvs import IpvsRules

    ipset = _run(execer, ["ipset", "save"])
    ipvs = _run(execer, ["ipvsadm", "-S", "-n"])
    links = _run(execer, ["ip", "-o", "link", "show"])
    addresses = ""
    if f" {DUMMY_DEVICE}:" in links:
        addresses = _run(execer, ["ip", "-o", "addr", "show", "dev", DUMMY_DEVICE])
    tool = binary_name(view.family, detect_backend(execer), "save")
    return IpvsRules.from_text(ipset, ipvs, addresses, _run(execer, [tool]))


def _run(execer: Any, argv: list[str]) -> str:
    result = execer.run(argv)
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise ExplainError(f"{' '.join(argv)} failed: {stderr}")
    return str(result.stdout.decode())
