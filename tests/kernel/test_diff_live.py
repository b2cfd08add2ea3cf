"""``minikproxy diff --against-live``: the rules in the node's kernel against what the
manifests compile to, in a network namespace, before and after someone tampers with them."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from minikproxy.testing.netns import IptablesBackend, Topology

from .traffic import BACKENDS, NODE, NODE_IP, NODE_OBJ, payload, service, slice_

pytestmark = pytest.mark.kernel

OBJECTS = [
    NODE_OBJ,
    service("web", "10.96.0.10", type="NodePort", port_extra={"nodePort": 30080}),
    slice_("web", BACKENDS),
]


def live_diff(topo: Topology, manifest: Path, *mode: str) -> dict[str, Any]:
    """``diff --against-live --json`` (``mode``: extra flags) run inside the node's namespace."""
    argv = ["ip", "netns", "exec", topo.namespaces["node"], sys.executable, "-m", "minikproxy",
            "diff", "-f", str(manifest), "--hostname-override", NODE, "--cluster-cidr",
            "10.10.2.0/24", "--ip-family", "IPv4", "--against-live", "--json",
            "--exit-code", "--node-ip", NODE_IP, *mode]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert (proc.returncode == 1) == bool(out["changes"])
    return out


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_live_rules_match_then_drift_is_reported(
    topo: Topology, tmp_path: Path, backend: IptablesBackend
) -> None:
    manifest = tmp_path / "cluster.json"
    manifest.write_text(json.dumps({"kind": "List", "items": OBJECTS}))
    topo.load_iptables(payload(OBJECTS[1:], cluster_cidr="10.10.2.0/24"), backend=backend)
    assert live_diff(topo, manifest)["changes"] == []  # the backend in use is detected

    # Someone deletes the jump to the first endpoint from the service chain.
    saved = topo.iptables_save()
    (jump,) = [line for line in saved.splitlines() if "-> 10.10.2.2:8080" in line]
    topo.node_exec([f"iptables-{backend}", "-t", "nat", "-D", *shlex.split(jump)[1:]])
    changes = live_diff(topo, manifest)["changes"]
    assert changes and all(c["changed"] == ["endpoint set"] for c in changes)
    assert all("10.10.2.2:8080" not in c["new"] for c in changes)
    assert {(c["frontend"], c["from"]) for c in changes} >= {("ClusterIP", "pod"),
                                                            ("NodePort", "external")}  # fmt: skip

    # ... and flushes the NodePorts: they become unreachable (the kernel agrees).
    topo.node_exec([f"iptables-{backend}", "-t", "nat", "-F", "KUBE-NODEPORTS"])
    nodeport = [c for c in live_diff(topo, manifest)["changes"] if c["frontend"] == "NodePort"]
    assert nodeport and all("reachability" in c["changed"] for c in nodeport)
    assert topo.connect(NODE_IP, 30080).outcome == "refused"


@pytest.mark.parametrize(
    ("layout", "table", "element"),
    [
        ("flat", "minikproxy", ("service-dispatch", "10.96.0.10 . tcp . 80")),
        ("kube-proxy", "kube-proxy", ("service-ips", "10.96.0.10 . tcp . 80")),
    ],
)
def test_nftables_drift_is_reported(
    topo: Topology, tmp_path: Path, layout: str, table: str, element: tuple[str, str]
) -> None:
    manifest = tmp_path / "cluster.json"
    manifest.write_text(json.dumps({"kind": "List", "items": OBJECTS}))
    flags = ["--proxy-mode", "nftables", "--nftables-layout", layout]
    topo.load_nft(
        payload(OBJECTS[1:], cluster_cidr="10.10.2.0/24", mode="nftables", nftables_layout=layout)
    )
    assert live_diff(topo, manifest, *flags)["changes"] == []
    assert topo.connect("10.96.0.10", 80).ok

    # Someone deletes the cluster IP's dispatch element: no DNAT, the cluster-IP check rejects.
    name, key = element
    topo.node_exec(["nft", "delete", "element", "ip", table, name, "{", key, "}"])
    changes = live_diff(topo, manifest, *flags)["changes"]
    cluster_ip = [c for c in changes if c["frontend"] == "ClusterIP"]
    assert cluster_ip and all(c["new"] == "reject" for c in cluster_ip), changes
    assert all("reachability" in c["changed"] for c in cluster_ip)
    assert not [c for c in changes if c["frontend"] == "NodePort"]
    assert topo.connect("10.96.0.10", 80).outcome == "refused"
