"""The container image, built from the Dockerfile and run as the DaemonSet in deploy/ declares.

Run by scripts/image-test.sh (it sets up podman in a directory of its own and provides the
base image). The pod's ``podman run`` arguments come from the rendered kustomization
(:mod:`tests.image.pod`); its "host network" is a network namespace the test makes (``node``),
joined by a veth pair to a second one (``cp``) holding the fake API server, which serves HTTPS
with a certificate the test makes and requires the service account's bearer token, exactly
what the kubelet gives the pod: the two env vars (overridden by the ConfigMap, as the
DaemonSet says) and the three files under /var/run/secrets/kubernetes.io/serviceaccount.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from minikproxy import __version__
from minikproxy.testing.apiserver import FakeApiServer
from minikproxy.testing.netns import run_in_netns
from minikproxy.testing.tls import make_ca
from tests.image.pod import ROOT, Pod, render_kustomization, translate

pytestmark = [pytest.mark.image, pytest.mark.kernel, pytest.mark.timeout(240)]

NODE_NAME = "node-1"
NODE_IP, CP_IP = "10.77.0.1", "10.77.0.2"
CLUSTER_IP, NODE_PORT, BACKEND_PORT = "10.96.7.7", 30080, 8080
MAX_IMAGE_BYTES = 250 * 1000 * 1000


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return proc


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    """Build the Dockerfile (the layers stay cached in the test's podman storage), or use
    ``$MINIKPROXY_IMAGE_TEST_IMAGE`` (an image already built, e.g. from another revision)."""
    if os.environ.get("MINIKPROXY_IMAGE_TEST_IMAGE"):
        yield os.environ["MINIKPROXY_IMAGE_TEST_IMAGE"]
        return
    tag = f"localhost/minikproxy-image-test:{os.getpid()}"
    build = ["build", "--network=host", "-t", tag]
    ca = os.environ.get("MINIKPROXY_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt")
    if Path(ca).is_file():
        build.append(f"--secret=id=ca-bundle,src={ca}")
    if os.environ.get("PIP_INDEX_URL"):
        build.append(f"--build-arg=PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}")
    podman(*build, str(ROOT), timeout=600)
    yield tag
    podman("rmi", "-f", tag, check=False)
    # Dangling images (older builds) go after a day: recent ones keep the build cache warm,
    # and a concurrent build is never disturbed.
    podman("image", "prune", "-f", "--filter", "until=24h", check=False)


@pytest.fixture(scope="session")
def manifests() -> list[dict[str, Any]]:
    return render_kustomization()


def host_output(*args: str) -> bytes:
    exe = Path(sys.executable).parent / "minikproxy"
    return subprocess.run([str(exe), *args], capture_output=True, check=True).stdout


# --- the image itself -----------------------------------------------------------------------


def test_image_size_and_environment(image: str, manifests: list[dict[str, Any]]) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= MAX_IMAGE_BYTES, f"image is {size / 1e6:.0f} MB"
    env = podman("image", "inspect", "--format", "{{json .Config.Env}}", image).stdout
    assert "DEBIAN_FRONTEND" not in env  # a build-time setting only
    ds = next(o for o in manifests if o["kind"] == "DaemonSet")
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == f"minikproxy:{__version__}"


def test_version_and_render_match_the_host(image: str) -> None:
    version = podman("run", "--rm", "--read-only", image, "--version").stdout.encode()
    assert version == host_output("--version")
    examples = ROOT / "examples"
    render = ["render", "-f", "/examples/cluster", "--config", "/examples/kube-proxy-config.yaml"]
    in_image = subprocess.run(
        ["podman", "run", "--rm", "--read-only", "-v", f"{examples}:/examples:ro", image,
         *render],
        capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    on_host = host_output(*[a.replace("/examples", str(examples)) for a in render])
    assert in_image == on_host
    assert b"KUBE-SVC-" in in_image


# --- the pod on a node ------------------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_exec(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=check
    )


def cluster_objects() -> list[dict[str, Any]]:
    meta = {"namespace": "default"}
    return [
        {"kind": "Node", "metadata": {"name": NODE_NAME},
         "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}},
        {"kind": "Service", "metadata": {"name": "web", **meta},
         "spec": {"type": "NodePort", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
                  "ipFamilies": ["IPv4"], "selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                             "targetPort": BACKEND_PORT, "nodePort": NODE_PORT}]}},
        {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
         "metadata": {"name": "web-abc", "labels": {"kubernetes.io/service-name": "web"},
                      **meta},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [CP_IP], "conditions": {"ready": True},
                        "nodeName": NODE_NAME}],
         "ports": [{"name": "http", "port": BACKEND_PORT, "protocol": "TCP"}]},
    ]  # fmt: skip


@dataclass
class Node:
    """A node (network namespace ``netns``) and its control plane (``cp``)."""

    netns: str
    cp: str
    workdir: Path
    apiserver: FakeApiServer
    token: str
    ca: Path
    apiserver_host: str
    manifests: list[dict[str, Any]]
    image: str
    names: list[str]

    def service_account(self, *, token: str | None = None, ca: Path | None = None) -> Path:
        """The three files the kubelet mounts (a fresh directory each call)."""
        sa = self.workdir / f"sa-{secrets.token_hex(3)}"
        sa.mkdir()
        (sa / "token").write_text(token if token is not None else self.token)
        (sa / "ca.crt").write_bytes((ca or self.ca).read_bytes())
        (sa / "namespace").write_text("kube-system")
        return sa

    def run_pod(self, *, sa: Path | None = None, **deviations: Any) -> tuple[str, Pod]:
        """Start the pod detached; return the container name and its translation."""
        workdir = self.workdir / f"pod-{secrets.token_hex(3)}"
        workdir.mkdir()
        pod = translate(
            self.manifests,
            image=self.image,
            netns=self.netns,
            node_name=NODE_NAME,
            service_account=sa or self.service_account(),
            workdir=workdir,
            hosts={self.apiserver_host: CP_IP},
            **deviations,
        )
        name = f"{self.netns}-{len(self.names)}"
        self.names.append(name)
        podman("run", "-d", "--name", name, *pod.args)
        return name, pod

    def logs(self, name: str) -> str:
        return podman("logs", name).stderr + podman("logs", name).stdout

    def wait_log(self, name: str, pattern: str, timeout: float = 60) -> str:
        return wait_for(f"{pattern!r} in the logs of {name}",
                        lambda: re.search(pattern, self.logs(name)), timeout).group(0)  # fmt: skip

    def stop(self, name: str, grace: int) -> int:
        podman("stop", "-t", str(grace), name, timeout=grace + 30)
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout)
        if code != 0:  # shown by pytest when the test fails: what the process was doing
            print(f"{name} exited {code}; its logs end with:\n{self.logs(name)[-6000:]}")
        return code

    def exit_code(self, name: str, timeout: float = 60) -> int:
        return int(podman("wait", name, timeout=timeout).stdout.strip())

    def nat(self, backend: str = "nft") -> str:
        return netns_exec(self.netns, f"iptables-{backend}-save", "-t", "nat").stdout

    def nat_rules(self) -> list[str]:
        """The nat table's chains and rules, without the dated comments and the counters."""
        return [
            re.sub(r" \[\d+:\d+\]$", "", line)
            for line in self.nat().splitlines()
            if not line.startswith("#")
        ]

    def get(self, url: str, timeout: float = 5) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()

        return run_in_netns(self.netns, fetch)


def _backend(netns: str) -> Callable[[], None]:
    """A TCP server on CP_IP:BACKEND_PORT answering its name; returns a stopper."""
    listener = run_in_netns(netns, lambda: socket.create_server((CP_IP, BACKEND_PORT)))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"backend\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)
        listener.close()

    return close


@pytest.fixture
def node(image: str, manifests: list[dict[str, Any]], tmp_path: Path) -> Iterator[Node]:
    prefix = "mki" + secrets.token_hex(3)
    netns, cp = f"{prefix}-node", f"{prefix}-cp"
    config_map = next(o for o in manifests if o["kind"] == "ConfigMap")["data"]
    host = config_map["apiserver-host"]
    port = int(config_map["apiserver-port"])
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "cluster-ca")
    serving = ca.issue(pki, "apiserver", [host, CP_IP])
    token = secrets.token_urlsafe(32)
    created: list[str] = []
    names: list[str] = []
    stoppers: list[Callable[[], None]] = []
    try:
        for ns in (netns, cp):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", f"{prefix}n", "netns", netns, "type", "veth",
           "peer", "name", f"{prefix}c", "netns", cp)  # fmt: skip
        ip("-n", netns, "addr", "add", f"{NODE_IP}/24", "dev", f"{prefix}n")
        ip("-n", cp, "addr", "add", f"{CP_IP}/24", "dev", f"{prefix}c")
        ip("-n", netns, "link", "set", f"{prefix}n", "up")
        ip("-n", cp, "link", "set", f"{prefix}c", "up")
        apiserver = FakeApiServer(
            host=CP_IP, port=port, tls_cert=serving.cert, tls_key=serving.key, token=token
        )
        run_in_netns(cp, apiserver.start)
        stoppers.append(apiserver.stop)
        for obj in cluster_objects():
            apiserver.create(obj)
        stoppers.append(_backend(cp))
        yield Node(netns, cp, tmp_path, apiserver, token, ca.cert, host, manifests, image, names)
    finally:
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)
        for stop in stoppers:
            stop()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False)


def synced(node: Node, backend: str = "nft") -> Callable[[], bool]:
    return lambda: "KUBE-SVC-" in node.nat(backend) and f"{CLUSTER_IP}/32" in node.nat(backend)


def no_traceback(logs: str) -> None:
    assert "Traceback" not in logs, logs


def test_the_daemonset_pod_in_cluster(node: Node) -> None:
    """As deploy/ declares it: HTTPS with the service account, rules, health, metrics, SIGTERM."""
    name, pod = node.run_pod()
    wait_for("the Service's rules", synced(node))
    health_path, health_port = pod.probes["readinessProbe"]
    live_path, live_port = pod.probes["livenessProbe"]
    status, body = wait_for(
        "a healthy /healthz",
        lambda: (r := node.get(f"http://{NODE_IP}:{health_port}{health_path}"))[0] == 200 and r,
    )
    assert '"lastUpdated"' in body
    assert node.get(f"http://{NODE_IP}:{live_port}{live_path}")[0] == 200
    # Metrics on the node's loopback only (metricsBindAddress 127.0.0.1:10249).
    metrics_port = pod.ports["metrics"]
    status, metrics = node.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and "kubeproxy_sync_proxy_rules_last_timestamp_seconds" in metrics
    with pytest.raises(urllib.error.URLError):
        node.get(f"http://{NODE_IP}:{metrics_port}/metrics", timeout=2)
    # Every request carried the token, over the verified TLS connection.
    assert node.apiserver.unauthorized_count == 0
    assert node.apiserver.tls_failure_count == 0
    assert {r.resource for r in node.apiserver.request_log} >= {
        "services", "endpointslices", "nodes"}  # fmt: skip
    wait_for("the Starting event", lambda: node.apiserver.objects("events"))
    # SIGTERM (podman stop, the grace period of the pod) exits 0 and leaves the rules.
    rules = node.nat_rules()
    assert node.stop(name, pod.grace_seconds) == 0
    assert node.nat_rules() == rules
    logs = node.logs(name)
    assert "received SIGTERM" in logs
    no_traceback(logs)


@pytest.mark.parametrize("wrong", ["ca", "token"])
def test_a_wrong_ca_or_token_is_one_clear_log_line(node: Node, wrong: str) -> None:
    other_ca = make_ca(node.workdir, "other-ca").cert
    sa = node.service_account(ca=other_ca) if wrong == "ca" else node.service_account(token="nope")
    name, pod = node.run_pod(sa=sa)
    expected = r"CERTIFICATE_VERIFY_FAILED" if wrong == "ca" else r"HTTP 401 Unauthorized"
    line = node.wait_log(name, rf"[^\n]*services: list failed: [^\n]*{expected}[^\n]*")
    assert "retrying" in line
    event = node.wait_log(name, r"WARNING [^\n]*could not record the Starting event[^\n]*\n")
    assert expected.split()[-1] in event  # the cause, in the same line
    assert node.stop(name, pod.grace_seconds) == 0
    logs = node.logs(name)
    no_traceback(logs)
    # One line per failure: no urllib3 retry chatter, no multi-line exception dumps.
    assert "Retrying (" not in logs and "HTTP response headers" not in logs, logs
    assert "KUBE-" not in node.nat()


def test_dry_run_writes_nothing(node: Node) -> None:
    name, pod = node.run_pod(extra_args=("--dry-run",))
    podman_logs = node.wait_log(name, r"KUBE-SVC-\w+|default/web:http")
    assert podman_logs
    assert node.stop(name, pod.grace_seconds) == 0
    for backend in ("nft", "legacy"):
        assert "KUBE-" not in netns_exec(node.netns, f"iptables-{backend}-save").stdout
    assert not node.apiserver.objects("events")  # dry-run records no event either
    no_traceback(node.logs(name))


def test_without_net_raw_nftables_works(node: Node) -> None:
    # The kubelet's hint chain says the node uses nf_tables.
    netns_exec(node.netns, "iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    name, pod = node.run_pod(drop_capabilities=("NET_RAW",))
    wait_for("the Service's rules", synced(node))
    assert "iptables backend nft" in node.logs(name)
    assert node.stop(name, pod.grace_seconds) == 0
    no_traceback(node.logs(name))


def test_without_net_raw_a_legacy_node_is_reported(node: Node) -> None:
    netns_exec(node.netns, "iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT")
    netns_exec(node.netns, "iptables-legacy", "-t", "nat", "-N", "KUBE-SERVICES")
    name, _ = node.run_pod(drop_capabilities=("NET_RAW",))
    assert node.exit_code(name) == 2
    logs = node.logs(name)
    assert re.search(r"ERROR .*cannot detect the iptables backend: iptables-legacy-save: .*"
                     r"Permission denied.*NET_RAW", logs), logs  # fmt: skip
    no_traceback(logs)
    assert "KUBE-SVC" not in node.nat("nft") + node.nat("legacy")


def _with_localhost_nodeports(node: Node) -> dict[str, str]:
    data = dict(Pod(node.manifests).config_map)
    config = yaml.safe_load(data["config.yaml"])
    config["iptables"]["localhostNodePorts"] = True
    data["config.yaml"] = yaml.safe_dump(config)
    return data


def route_localnet(node: Node) -> str:
    return netns_exec(node.netns, "cat", "/proc/sys/net/ipv4/conf/all/route_localnet").stdout


def test_localhost_nodeports_unprivileged_warn_and_install_the_rules(node: Node) -> None:
    name, pod = node.run_pod(config_map=_with_localhost_nodeports(node))
    wait_for("the Service's rules", synced(node))
    line = node.wait_log(name, r"WARNING [^\n]*route_localnet[^\n]*")
    assert "Read-only file system" in line and "privileged" in line
    assert f"--dport {NODE_PORT}" in node.nat()
    assert route_localnet(node).strip() == "0"
    assert node.stop(name, pod.grace_seconds) == 0
    no_traceback(node.logs(name))


def test_localhost_nodeports_privileged_set_route_localnet_and_work(node: Node) -> None:
    name, pod = node.run_pod(config_map=_with_localhost_nodeports(node), privileged=True)
    wait_for("the Service's rules", synced(node))
    assert route_localnet(node).strip() == "1"

    def connect() -> bytes:
        with socket.create_connection(("127.0.0.1", NODE_PORT), timeout=5) as conn:
            return conn.recv(100)

    assert run_in_netns(node.netns, connect) == b"backend\n"
    assert node.stop(name, pod.grace_seconds) == 0
    no_traceback(node.logs(name))
