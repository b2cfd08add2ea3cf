"""The image test's translation of the DaemonSet into podman arguments (tests/image/pod.py)
covers every field deploy/ uses, and fails on a field it does not know."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.image.pod import DriftError, render_kustomization, translate


def _translate(objects: list[dict], tmp_path: Path) -> list[str]:
    return translate(
        objects,
        image="img",
        netns="ns",
        node_name="node-1",
        service_account=tmp_path,
        workdir=tmp_path,
        hosts={"api": "10.0.0.1"},
    ).args


def test_the_daemonset_translates(tmp_path: Path) -> None:
    args = _translate(render_kustomization(), tmp_path)
    assert "--read-only" in args and "--cap-drop=all" in args
    assert "--cap-add=NET_ADMIN,NET_RAW" in args
    assert args[args.index("img") + 1 :] == ["run", "--config=/etc/minikproxy/config.yaml"]
    assert "--env=KUBERNETES_SERVICE_HOST=kind-control-plane" in args


def test_an_unknown_field_is_drift(tmp_path: Path) -> None:
    objects = copy.deepcopy(render_kustomization())
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["procMount"] = "Unmasked"
    with pytest.raises(DriftError, match="procMount"):
        _translate(objects, tmp_path)
