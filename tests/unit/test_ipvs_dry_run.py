"""``run --dry-run --proxy-mode ipvs``: the controller compiles IPVS plans from a fake API server
and prints what each sync would change, per service port (no kernel needed)."""

from __future__ import annotations

import io
from pathlib import Path

from minikproxy.config import ProxyConfig
from minikproxy.controller import Controller
from minikproxy.model.names import IPV4
from minikproxy.sources.kubeclient import load_api_client
from minikproxy.testing.apiserver import FakeApiServer

from ..helpers import wait_for
from ..kernel.cluster_objects import NODE_OBJ, endpoint_slice, service

VIP = "10.96.0.10"


def test_dry_run_describes_per_service_changes(tmp_path: Path) -> None:
    out = io.StringIO()
    config = ProxyConfig().with_overrides(
        hostname_override="node-1", mode="ipvs", min_sync_period=0.0, cluster_cidr="10.10.2.0/24"
    )
    with FakeApiServer() as api:
        api.create(NODE_OBJ)
        controller = Controller(
            config,
            "node-1",
            load_api_client(str(api.write_kubeconfig(tmp_path / "kc"))),
            execer=None,
            families=[IPV4],
            metrics_bind_address="",
            healthz_bind_address="",
            out=out,
        )
        controller.start()
        try:
            wait_for(lambda: "initial sync" in out.getvalue(), what="the initial sync")
            api.create(service("web", VIP))
            api.create(endpoint_slice("web", ["10.10.2.2", "10.10.2.3"]))
            line = "+ -a -t 10.96.0.10:80 -r 10.10.2.3:8080 -m -w 1"
            wait_for(lambda: line in out.getvalue(), what="the real server line")
            api.update(endpoint_slice("web", ["10.10.2.2"]))
            wait_for(lambda: f"- {line[2:]}" in out.getvalue(), what="the removed real server")
            assert "# IPv4: default/web:p (tcp) " in out.getvalue()
            assert "+ add KUBE-CLUSTER-IP 10.96.0.10,tcp:80" in out.getvalue()
        finally:
            controller.stop()
