"""The DaemonSet's pod spec, translated into ``podman run`` arguments.

Every field of the pod and container spec in ``deploy/`` is either translated (what the kubelet
and container runtime would do with it) or explicitly listed as scheduling-only; an unknown
field fails the translation, so the image test breaks when the manifests drift from it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# What the kubelet injects for the `kubernetes` Service (cluster IP 10.96.0.1:443, kind's).
KUBELET_ENV = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_SERVICE_PORT_HTTPS": "443",
    "KUBERNETES_PORT": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    "KUBERNETES_PORT_443_TCP_PORT": "443",
    "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1",
}
# Pod fields that only matter to the scheduler or the API server, not to the running container.
_SCHEDULING_ONLY = {"priorityClassName", "tolerations", "nodeSelector", "serviceAccountName"}
_QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi)?$")


class DriftError(AssertionError):
    """The manifests use a field this translation does not know."""


def render_kustomization() -> list[dict[str, Any]]:
    """``kubectl kustomize deploy``: every object ``kubectl apply -k deploy/`` creates."""
    kubectl = Path(sys.executable).parent / "kubectl"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(ROOT / "deploy")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _bytes(quantity: str) -> int:
    m = _QUANTITY.match(quantity)
    if m is None:
        raise DriftError(f"quantity {quantity!r} not understood")
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


def _only(obj: dict[str, Any], known: set[str], where: str) -> None:
    unknown = set(obj) - known
    if unknown:
        raise DriftError(f"{where}: fields {sorted(unknown)} have no translation")


@dataclass
class Pod:
    """A DaemonSet pod on one node: the ``podman run`` arguments and what the test checks."""

    objects: list[dict[str, Any]]
    args: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    probes: dict[str, tuple[str, int]] = field(default_factory=dict)
    grace_seconds: int = 30

    def obj(self, kind: str) -> dict[str, Any]:
        (found,) = [o for o in self.objects if o["kind"] == kind]
        return found

    @property
    def config_map(self) -> dict[str, str]:
        data: dict[str, str] = self.obj("ConfigMap")["data"]
        return data


def translate(
    objects: list[dict[str, Any]],
    *,
    image: str,
    netns: str,
    node_name: str,
    service_account: Path,
    workdir: Path,
    hosts: dict[str, str],
    config_map: dict[str, str] | None = None,
    privileged: bool = False,
    drop_capabilities: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
) -> Pod:
    """The ``podman run`` arguments (after ``run``) of the DaemonSet's pod on ``node_name``.

    hostNetwork is the network namespace ``netns``; ``hosts`` are the node's name resolution
    (dnsPolicy Default); ``service_account`` holds token, ca.crt and namespace, mounted where
    the kubelet mounts them. ``config_map`` replaces the ConfigMap's data, ``privileged`` and
    ``drop_capabilities`` edit the security context, ``extra_args`` are appended to args: the
    deviations a test makes on purpose.
    """
    pod = Pod(objects)
    ds = pod.obj("DaemonSet")
    data = dict(config_map if config_map is not None else pod.config_map)
    spec = ds["spec"]["template"]["spec"]
    _only(spec, _SCHEDULING_ONLY | {"hostNetwork", "dnsPolicy", "containers", "volumes",
                                    "terminationGracePeriodSeconds"}, "pod spec")  # fmt: skip
    args = ["--hostname", node_name]
    if spec.get("hostNetwork") is not True:
        raise DriftError("the pod is not hostNetwork: the test's netns stands for the host's")
    args.append(f"--network=ns:/run/netns/{netns}")
    if spec.get("dnsPolicy") != "Default":
        raise DriftError(f"dnsPolicy {spec.get('dnsPolicy')!r} has no translation")
    args += [f"--add-host={name}:{ip}" for name, ip in hosts.items()]
    pod.grace_seconds = int(spec.get("terminationGracePeriodSeconds", 30))
    args += ["-v", f"{service_account}:{SERVICE_ACCOUNT_DIR}:ro"]
    (container,) = spec["containers"]
    _only(container, {"name", "image", "imagePullPolicy", "args", "env", "ports", "livenessProbe",
                      "readinessProbe", "resources", "securityContext", "volumeMounts"},
          "container")  # fmt: skip

    env = dict(KUBELET_ENV)
    for var in container.get("env", []):
        _only(var, {"name", "value", "valueFrom"}, f"env {var['name']}")
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            env[var["name"]] = node_name
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            if ref["name"] != pod.obj("ConfigMap")["metadata"]["name"]:
                raise DriftError(f"env {var['name']}: unknown ConfigMap {ref['name']}")
            env[var["name"]] = data[ref["key"]]
        else:
            raise DriftError(f"env {var['name']}: valueFrom {source} has no translation")
    args += [f"--env={k}={v}" for k, v in env.items()]

    pod.ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for kind in ("livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        port = probe["port"]
        pod.probes[kind] = (probe["path"], pod.ports[port] if isinstance(port, str) else port)

    limits = container.get("resources", {}).get("limits", {})
    _only(limits, {"memory"}, "resources.limits")
    if "memory" in limits:
        args.append(f"--memory={_bytes(limits['memory'])}")

    sc = container.get("securityContext", {})
    _only(sc, {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsUser",
               "runAsGroup", "capabilities", "seccompProfile"}, "securityContext")  # fmt: skip
    if sc.get("runAsUser") is not None:
        args.append(f"--user={sc['runAsUser']}:{sc.get('runAsGroup', 0)}")
    if sc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # only the pod's volumes are writable
    if sc.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    if sc.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
        raise DriftError(f"seccompProfile {sc['seccompProfile']} has no translation")
    if privileged or sc.get("privileged"):
        args.append("--privileged")
    else:
        caps = sc.get("capabilities", {})
        if caps.get("drop") == ["ALL"]:
            args.append("--cap-drop=all")
        elif caps.get("drop"):
            raise DriftError(f"capabilities.drop {caps['drop']} has no translation")
        add = [c for c in caps.get("add", []) if c not in drop_capabilities]
        if add:
            args.append(f"--cap-add={','.join(add)}")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        _only(mount, {"name", "mountPath", "readOnly"}, f"volumeMount {mount['name']}")
        volume = volumes[mount["name"]]
        ro = ":ro" if mount.get("readOnly") else ""
        target = mount["mountPath"]
        if "configMap" in volume:
            source = workdir / f"volume-{mount['name']}"
            source.mkdir(parents=True, exist_ok=True)
            for item in volume["configMap"]["items"]:
                (source / item["path"]).write_text(data[item["key"]])
            args += ["-v", f"{source}:{target}{ro}"]
        elif "hostPath" in volume:
            host = volume["hostPath"]
            path = Path(host["path"])
            if host.get("type") == "FileOrCreate":
                path.touch(exist_ok=True)
            elif host.get("type") == "Directory" and not path.is_dir():
                raise DriftError(f"hostPath {path}: not a directory on this node")
            args += ["-v", f"{path}:{target}{ro}"]
        elif "emptyDir" in volume:
            empty = volume["emptyDir"]
            if empty.get("medium") != "Memory":
                raise DriftError(f"emptyDir {mount['name']}: only medium Memory is translated")
            size = _bytes(empty["sizeLimit"]) if "sizeLimit" in empty else None
            args.append(f"--tmpfs={target}:rw" + (f",size={size}" if size else ""))
        else:
            raise DriftError(f"volume {mount['name']}: {sorted(volume)} has no translation")

    args.append(image)
    args += [*container.get("args", []), *extra_args]
    pod.args = args
    return pod
