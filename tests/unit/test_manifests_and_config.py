"""Reading manifests (YAML, JSON, lists, directories, stdin) and KubeProxyConfiguration files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from minikproxy.config import ConfigError, ProxyConfig, config_from_mapping, load_config
from minikproxy.config import parse_duration as parse_go_duration
from minikproxy.sources.manifests import ManifestError, SourcedObject, load_manifests

EXAMPLES = Path(__file__).parent.parent.parent / "examples"

SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
"""
SLICE_YAML = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1]}]
"""


def names(objects: list[SourcedObject]) -> list[tuple[str, str]]:
    """(kind, name) of each loaded object, in order."""
    return [(str(o.obj.get("kind")), str(o.obj["metadata"]["name"])) for o in objects]


def load_text(tmp_path: Path, filename: str, text: str) -> tuple[list[SourcedObject], list[str]]:
    path = tmp_path / filename
    path.write_text(text)
    notes: list[str] = []
    return load_manifests([str(path)], notes), notes


def obj(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name}, **extra}


# --- manifests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "text", "expected"),
    [
        pytest.param("m.yaml", SERVICE_YAML + "---\n" + SLICE_YAML,
                     [("Service", "web"), ("EndpointSlice", "web-1")], id="multi-doc-yaml"),
        pytest.param("m.yml", "---\n" + SERVICE_YAML + "---\n---\n# only a comment\n",
                     [("Service", "web")], id="empty-documents-skipped"),
        pytest.param("m.json", json.dumps(obj("Service", "a")), [("Service", "a")],
                     id="json-object"),
        pytest.param("m.json", json.dumps([obj("Service", "a"), obj("Node", "n")]),
                     [("Service", "a"), ("Node", "n")], id="json-array"),
        pytest.param("m.yaml", json.dumps(obj("Endpoints", "e")), [("Endpoints", "e")],
                     id="json-in-yaml-file"),
        pytest.param("m.yaml", json.dumps(
            {"apiVersion": "v1", "kind": "List",
             "items": [obj("Service", "a"), obj("EndpointSlice", "s")]}),
                     [("Service", "a"), ("EndpointSlice", "s")], id="kind-list"),
        pytest.param("m.json", json.dumps(
            {"kind": "List", "items": [{"kind": "List", "items": [obj("Service", "nested")]}]}),
                     [("Service", "nested")], id="nested-list"),
        pytest.param("m.json", json.dumps(
            {"kind": "ServiceList", "items": [{"metadata": {"name": "a"}}]}),
                     [("Service", "a")], id="service-list-items-without-kind"),
        pytest.param("m.json", json.dumps(
            {"kind": "EndpointSliceList", "items": [{"metadata": {"name": "s"}}]}),
                     [("EndpointSlice", "s")], id="endpointslice-list"),
        pytest.param("m.json", json.dumps(
            {"kind": "EndpointsList", "items": [{"metadata": {"name": "e"}}]}),
                     [("Endpoints", "e")], id="endpoints-list"),
        pytest.param("m.json", json.dumps(
            {"kind": "NodeList", "items": [{"metadata": {"name": "n"}}]}),
                     [("Node", "n")], id="node-list"),
        pytest.param("m.yaml", "", [], id="empty-file"),
    ],
)  # fmt: skip
def test_load_formats(
    tmp_path: Path, filename: str, text: str, expected: list[tuple[str, str]]
) -> None:
    objects, notes = load_text(tmp_path, filename, text)
    assert names(objects) == expected
    assert notes == []
    assert {o.source for o in objects} <= {str(tmp_path / filename)}


@pytest.mark.parametrize(
    ("text", "note_part"),
    [
        pytest.param(json.dumps(obj("ConfigMap", "settings")), "ConfigMap settings",
                     id="other-kind"),
        pytest.param(json.dumps({"metadata": {"name": "x"}}), "object without kind",
                     id="no-kind"),
        pytest.param(json.dumps({"kind": "List", "items": [{"metadata": {"name": "x"}}]}),
                     "object without kind", id="list-item-without-kind"),
        pytest.param("just a string\n", "not an object", id="scalar-document"),
    ],
)  # fmt: skip
def test_other_documents_ignored_with_a_note(tmp_path: Path, text: str, note_part: str) -> None:
    objects, notes = load_text(tmp_path, "m.yaml", SERVICE_YAML + "---\n" + text)
    assert names(objects) == [("Service", "web")]
    assert len(notes) == 1
    assert note_part in notes[0]
    assert str(tmp_path / "m.yaml") in notes[0]


def test_directory_reads_only_manifest_suffixes(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(json.dumps(obj("Service", "b")))
    (tmp_path / "a.yml").write_text(json.dumps(obj("Service", "a")))
    (tmp_path / "c.json").write_text(json.dumps(obj("Service", "c")))
    (tmp_path / "d.txt").write_text(json.dumps(obj("Service", "d")))
    (tmp_path / "e.yaml.bak").write_text("not: [valid")
    (tmp_path / "README").write_text("::: not yaml :::")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "f.yaml").write_text(json.dumps(obj("Service", "f")))
    notes: list[str] = []
    objects = load_manifests([str(tmp_path)], notes)
    assert names(objects) == [("Service", n) for n in ("a", "b", "c", "f")]
    assert objects[0].source == str(tmp_path / "a.yml")
    assert notes == []


def test_several_paths_in_order(tmp_path: Path) -> None:
    (tmp_path / "1.yaml").write_text(json.dumps(obj("Service", "one")))
    (tmp_path / "2.yaml").write_text(json.dumps(obj("Service", "two")))
    objects = load_manifests([str(tmp_path / "2.yaml"), str(tmp_path / "1.yaml")], [])
    assert names(objects) == [("Service", "two"), ("Service", "one")]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(SERVICE_YAML + "---\n" + SLICE_YAML, id="yaml"),
        pytest.param(json.dumps({"kind": "List", "items": [
            {"kind": "Service", "metadata": {"name": "web"}},
            {"kind": "EndpointSlice", "metadata": {"name": "web-1"}}]}), id="json"),
        pytest.param("  \n" + json.dumps([{"kind": "Service", "metadata": {"name": "web"}},
                                          {"kind": "EndpointSlice",
                                           "metadata": {"name": "web-1"}}]), id="json-array"),
    ],
)  # fmt: skip
def test_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    objects = load_manifests(["-"], [])
    assert names(objects) == [("Service", "web"), ("EndpointSlice", "web-1")]
    assert {o.source for o in objects} == {"<stdin>"}


@pytest.mark.parametrize(
    ("filename", "text", "where"),
    [
        pytest.param("bad.yaml", SERVICE_YAML + "---\nkind: Service\nmetadata:\n  name: [x, y\n",
                     "line 9", id="yaml-unclosed-flow"),
        pytest.param("bad.yaml", "kind: Service\nmetadata:\n name: a\n  x: 1\n", "line 4",
                     id="yaml-bad-indent"),
        pytest.param("bad.yml", "kind: Service\n\tmetadata: {}\n", "line 2", id="yaml-tab"),
        pytest.param("bad.json", '{\n  "kind": "Service",\n  "metadata": \n}\n', "line 4",
                     id="json-missing-value"),
        pytest.param("bad.json", '[{"kind": "Service"},\n', "line 2", id="json-truncated"),
    ],
)  # fmt: skip
def test_malformed_input_names_file_and_line(
    tmp_path: Path, filename: str, text: str, where: str
) -> None:
    with pytest.raises(ManifestError) as err:
        load_text(tmp_path, filename, text)
    message = str(err.value)
    assert message.startswith(str(tmp_path / filename))
    assert where in message


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        pytest.param("a: [1\n", r"^<stdin>: line 2 column \d+: invalid YAML", id="yaml"),
        pytest.param('[{"kind": "Service"},\n]',
                     r"^<stdin>: line 1 column 21: invalid JSON: trailing comma", id="json"),
    ],
)  # fmt: skip
def test_malformed_stdin_names_stdin(
    monkeypatch: pytest.MonkeyPatch, text: str, pattern: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    with pytest.raises(ManifestError, match=pattern):
        load_manifests(["-"], [])


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match=r"nope\.yaml: no such file"):
        load_manifests([missing], [])


def test_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: Service\nmetadata: {name: caf\xe9}\n")
    with pytest.raises(ManifestError, match=r"latin1\.yaml: cannot read"):
        load_manifests([str(path)], [])


def test_examples_load() -> None:
    notes: list[str] = []
    objects = load_manifests([str(EXAMPLES / "cluster")], notes)
    kinds = {str(o.obj["kind"]) for o in objects}
    assert kinds == {"Service", "EndpointSlice", "Endpoints", "Node"}
    assert notes == []


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("1s", 1.0, id="1s"),
        pytest.param("500ms", 0.5, id="500ms"),
        pytest.param("1m30s", 90.0, id="1m30s"),
        pytest.param("1h", 3600.0, id="1h"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param("250us", 250e-6, id="us"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param(" 2s ", 2.0, id="whitespace"),
        pytest.param("-1s", -1.0, id="negative"),  # valid; validation then rejects it
        pytest.param("0s", 0.0, id="zero-seconds"),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1", "s", "1x", "1s2", "abc", "--1s", "-", "1 s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


def test_example_config() -> None:
    config = load_config(EXAMPLES / "kube-proxy-config.yaml")
    assert config == ProxyConfig(
        mode="iptables",
        cluster_cidr="10.244.0.0/16,fd00:10:244::/56",
        detect_local_mode="ClusterCIDR",
        masquerade_all=False,
        masquerade_bit=14,
        localhost_nodeports=True,
        min_sync_period=1.0,
        sync_period=30.0,
        nodeport_addresses=(),
    )


FULL_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: node-z
clusterCIDR: 10.0.0.0/8
clientConnection: {kubeconfig: /etc/kube/config, qps: 5}
healthzBindAddress: 0.0.0.0:10999
metricsBindAddress: 0.0.0.0:10998
detectLocalMode: InterfaceNamePrefix
detectLocal: {interfaceNamePrefix: veth}
nodePortAddresses: [primary]
conntrack: {tcpBeLiberal: true}
iptables:
  masqueradeAll: true
  masqueradeBit: 10
  localhostNodePorts: false
  minSyncPeriod: 500ms
  syncPeriod: 1m30s
bindAddress: 0.0.0.0
featureGates: {SomeGate: true}
ipvs: {scheduler: rr}
"""


def test_every_field_mapped(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(FULL_CONFIG)
    assert load_config(path) == ProxyConfig(
        mode="iptables",
        hostname_override="node-z",
        kubeconfig="/etc/kube/config",
        cluster_cidr="10.0.0.0/8",
        masquerade_all=True,
        masquerade_bit=10,
        localhost_nodeports=False,
        sync_period=90.0,
        min_sync_period=0.5,
        detect_local_mode="InterfaceNamePrefix",
        interface_name_prefix="veth",
        nodeport_addresses=("primary",),
        healthz_bind_address="0.0.0.0:10999",
        metrics_bind_address="0.0.0.0:10998",
        conntrack_tcp_be_liberal=True,
        ipvs_scheduler="rr",
    )


def test_empty_config_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == ProxyConfig()


@pytest.mark.parametrize(
    ("doc", "message_parts"),
    [
        pytest.param({"bogus": 1}, ["bogus", "unknown field"], id="unknown-top-level"),
        pytest.param({"iptables": {"masqueradeBits": 14}}, ["iptables.masqueradeBits", "unknown"],
                     id="unknown-iptables-field"),
        pytest.param({"detectLocal": {"bridge": "br0"}}, ["detectLocal", "bridge"],
                     id="unknown-detect-local-field"),
        pytest.param({"iptables": {"masqueradeBit": 32}}, ["iptables.masqueradeBit", "0..31"],
                     id="masquerade-bit-too-big"),
        pytest.param({"iptables": {"masqueradeBit": -1}}, ["iptables.masqueradeBit"],
                     id="masquerade-bit-negative"),
        pytest.param({"iptables": {"masqueradeBit": "14"}}, ["iptables.masqueradeBit"],
                     id="masquerade-bit-string"),
        pytest.param({"iptables": {"masqueradeBit": True}}, ["iptables.masqueradeBit", "integer"],
                     id="masquerade-bit-bool"),
        pytest.param({"iptables": {"masqueradeAll": "yes"}}, ["iptables.masqueradeAll"],
                     id="masquerade-all-string"),
        pytest.param({"iptables": {"localhostNodePorts": 1}}, ["iptables.localhostNodePorts"],
                     id="localhost-nodeports-int"),
        pytest.param({"iptables": {"syncPeriod": "soon"}}, ["iptables.syncPeriod", "duration"],
                     id="bad-duration"),
        pytest.param({"iptables": {"minSyncPeriod": 5}}, ["iptables.minSyncPeriod"],
                     id="duration-without-unit"),
        pytest.param({"iptables": ["x"]}, ["iptables"], id="iptables-not-a-mapping"),
        pytest.param({"clusterCIDR": 10}, ["clusterCIDR"], id="cluster-cidr-int"),
        pytest.param({"nodePortAddresses": "10.0.0.0/8"}, ["nodePortAddresses"],
                     id="nodeport-addresses-string"),
        pytest.param({"nodePortAddresses": [10]}, ["nodePortAddresses[0]"],
                     id="nodeport-address-int"),
        pytest.param({"conntrack": {"tcpBeLiberal": "true"}}, ["conntrack.tcpBeLiberal"],
                     id="conntrack-string"),
        pytest.param({"mode": "kernelspace"}, ["mode", "kernelspace"], id="unsupported-mode"),
        pytest.param({"detectLocalMode": "Magic"}, ["detectLocalMode", "Magic"],
                     id="unknown-detect-local-mode"),
        pytest.param({"kind": "KubeletConfiguration"}, ["kind"], id="wrong-kind"),
        pytest.param({"apiVersion": "v2"}, ["apiVersion"], id="wrong-api-version"),
    ],
)  # fmt: skip
def test_config_errors_name_file_and_field(
    tmp_path: Path, doc: dict[str, Any], message_parts: list[str]
) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path))
    for part in message_parts:
        assert part in message


@pytest.mark.parametrize(
    ("text", "message_part"),
    [
        pytest.param("mode: [iptables\n", "line 2", id="bad-yaml"),
        pytest.param("- a\n- b\n", "mapping", id="not-a-mapping"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, message_part: str) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path))
    assert message_part in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_config_from_mapping_null_values_keep_defaults() -> None:
    doc = {"iptables": {"masqueradeBit": None, "syncPeriod": None}, "detectLocalMode": ""}
    assert config_from_mapping(doc, "x") == ProxyConfig()


def test_with_overrides() -> None:
    base = ProxyConfig(masquerade_all=True, cluster_cidr="10.0.0.0/8")
    assert base.with_overrides(masquerade_all=None, cluster_cidr="10.1.0.0/16") == ProxyConfig(
        masquerade_all=True, cluster_cidr="10.1.0.0/16"
    )
    with pytest.raises(ConfigError, match="unknown settings"):
        base.with_overrides(bogus=1)
