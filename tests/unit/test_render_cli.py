"""``minikproxy render``: input handling, exit codes and flag precedence, through ``main``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from minikproxy.cli import main
from minikproxy.compile.names import service_chains
from minikproxy.model.names import ServicePortName

EXAMPLES = Path(__file__).parent.parent.parent / "examples"
CLUSTER = str(EXAMPLES / "cluster")
CONFIG = str(EXAMPLES / "kube-proxy-config.yaml")

WEB_HTTP = service_chains(ServicePortName("shop", "web", "http", "TCP"))
DNS_UDP = service_chains(ServicePortName("kube-system", "kube-dns", "dns", "UDP"))
DNS_TCP = service_chains(ServicePortName("kube-system", "kube-dns", "dns-tcp", "TCP"))
API_HTTP = service_chains(ServicePortName("shop", "api", "http", "TCP"))

NODEPORTS_JUMP = re.compile(r"^-A KUBE-SERVICES .* -j KUBE-NODEPORTS$", re.MULTILINE)
WEB_CLUSTER_IP_MASQ = re.compile(
    rf'^-A {WEB_HTTP.cluster} -m comment --comment "shop/web:http cluster IP" .*'
    r"-j KUBE-MARK-MASQ$",
    re.MULTILINE,
)

BAD_SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "broken", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.999", "ports": [{"name": "http", "port": 80}]},
}


def render(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``minikproxy render ARGS``; return (exit code, stdout, stderr)."""
    code = main(["render", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def render_examples(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The IPv4 payload of the example cluster with ``args``; asserts success."""
    code, out, err = render(capsys, "-f", CLUSTER, "--config", CONFIG, "--ip-family", "IPv4", *args)
    assert code == 0, err
    return out


def write_bad_input(tmp_path: Path) -> Path:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD_SERVICE))
    return bad


# --- the examples ---------------------------------------------------------------------------


def test_examples_render_both_families(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = render(capsys, "-f", CLUSTER, "--config", CONFIG)
    assert code == 0
    assert "warning:" not in err
    sections = re.split(r"^# (IPv4|IPv6)\n", out, flags=re.MULTILINE)
    assert sections[0] == ""
    assert sections[1::2] == ["IPv4", "IPv6"]
    v4, v6 = sections[2], sections[4]
    for payload in (v4, v6):
        assert payload.startswith("*filter\n")
        assert payload.count("COMMIT\n") == payload.count("\n*") + 1
    assert "10.96.12.34" in v4
    assert "fd00:10:96::70" in v6
    assert "10.96.12.34" not in v6


@pytest.mark.parametrize(
    ("family", "present", "absent"),
    [
        pytest.param("IPv4", "-d 10.96.70.1", "fd00:10:96::70", id="IPv4"),
        pytest.param("IPv6", "-d fd00:10:96::70", "10.96.70.1", id="IPv6"),
    ],
)
def test_single_family_is_one_payload(
    capsys: pytest.CaptureFixture[str], family: str, present: str, absent: str
) -> None:
    code, out, _ = render(capsys, "-f", CLUSTER, "--config", CONFIG, "--ip-family", family)
    assert code == 0
    assert out.startswith("*filter\n")
    assert "# IPv" not in out
    assert out.count("*filter\n") == 1
    assert out.count("*nat\n") == 1
    assert present in out
    assert absent not in out


def test_services_that_produce_no_rules_are_absent(capsys: pytest.CaptureFixture[str]) -> None:
    out = render_examples(capsys)
    for name in ("shop/db", "shop/search", "shop/mesh-managed", "10.96.99.1"):
        assert name not in out


@pytest.mark.parametrize(
    ("services", "present", "absent"),
    [
        pytest.param(["shop/web"], [WEB_HTTP.cluster], [DNS_UDP.cluster, DNS_TCP.cluster,
                                                        API_HTTP.cluster], id="one-service"),
        pytest.param(["shop/web", "kube-system/kube-dns"],
                     [WEB_HTTP.cluster, DNS_UDP.cluster, DNS_TCP.cluster], [API_HTTP.cluster],
                     id="two-services"),
        pytest.param(["shop/nope"], [], [WEB_HTTP.cluster, DNS_UDP.cluster], id="unknown"),
    ],
)  # fmt: skip
def test_service_filter(
    capsys: pytest.CaptureFixture[str], services: list[str], present: list[str], absent: list[str]
) -> None:
    args = [arg for s in services for arg in ("--service", s)]
    out = render_examples(capsys, *args)
    for chain in present:
        assert f":{chain} - [0:0]" in out
        assert f"-j {chain}" in out
    for chain in absent:
        assert chain not in out
    comments = set(re.findall(r'--comment "?([a-z-]+/[a-z-]+)', out))
    assert comments <= set(services)


def test_web_only_output_has_its_endpoint_chains(capsys: pytest.CaptureFixture[str]) -> None:
    out = render_examples(capsys, "--service", "shop/web")
    assert re.findall(r"DNAT --to-destination (\S+)", out) == [
        "10.244.1.10:8080",
        "10.244.2.10:8080",
        "10.244.3.10:8080",
    ]
    assert "KUBE-NODEPORTS" not in out
    assert not re.search(r"^:KUBE-SERVICES ", out, re.MULTILINE)


@pytest.mark.parametrize("value", ["web", "shop/", "/web"])
def test_bad_service_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["render", "-f", CLUSTER, "--service", value])
    assert exc.value.code == 2
    assert "NAMESPACE/NAME" in capsys.readouterr().err


# --- bad input ------------------------------------------------------------------------------


def test_bad_yaml_exits_2_with_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Service\nmetadata:\n  name: [web\nspec: {}\n")
    code, out, err = render(capsys, "-f", CLUSTER, "-f", str(bad))
    assert code == 2
    assert out == ""
    assert str(bad) in err
    assert re.search(r"line \d+", err)


def test_invalid_object_warns_and_renders_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write_bad_input(tmp_path)
    code, out, err = render(capsys, "-f", CLUSTER, "-f", str(bad), "--config", CONFIG)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) >= 1
    for line in warnings:
        assert str(bad) in line
        assert "shop/broken" in line
        assert "spec.clusterIPs[0]" in line
    assert f"-j {WEB_HTTP.cluster}" in out
    assert "shop/broken" not in out


def test_invalid_object_with_strict_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write_bad_input(tmp_path)
    code, out, err = render(capsys, "-f", CLUSTER, "-f", str(bad), "--strict")
    assert code == 2
    assert out == ""
    assert "shop/broken" in err
    assert "--strict" in err


def test_strict_with_valid_input_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = render(capsys, "-f", CLUSTER, "--config", CONFIG, "--strict")
    assert code == 0
    assert out.startswith("# IPv4\n*filter\n")


def test_other_kinds_are_noted(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    extra = tmp_path / "cm.json"
    extra.write_text(json.dumps({"kind": "ConfigMap", "metadata": {"name": "settings"}}))
    code, _, err = render(capsys, "-f", CLUSTER, "-f", str(extra), "--config", CONFIG)
    assert code == 0
    assert "note:" in err
    assert "ConfigMap settings" in err


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-f", "/nonexistent/minikproxy-test.yaml"], id="missing-manifest"),
        pytest.param(["-f", CLUSTER, "--config", "/nonexistent/kp.yaml"], id="missing-config"),
        pytest.param(["-f", CLUSTER, "--nodeport-addresses", "not-a-cidr"], id="bad-cidr-flag"),
        pytest.param(["-f", CLUSTER, "--iptables-masquerade-bit", "32"], id="bad-masquerade-bit"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = render(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.startswith("minikproxy render: ")


def test_stdin_input(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n---\n".join(
        (EXAMPLES / "cluster" / name).read_text()
        for name in ("services.yaml", "endpointslices.yaml", "node.yaml")
    )
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    code, out, _ = render(capsys, "-f", "-", "--config", CONFIG, "--ip-family", "IPv4")
    assert code == 0
    assert out == render_examples(capsys)


# --- flags override the config file -----------------------------------------------------------


def test_masquerade_all(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    default = render_examples(capsys)
    rule = WEB_CLUSTER_IP_MASQ.search(default)
    assert rule is not None
    assert rule.group(0).endswith("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ")
    forced = render_examples(capsys, "--masquerade-all")
    rule = WEB_CLUSTER_IP_MASQ.search(forced)
    assert rule is not None
    assert "! -s" not in rule.group(0)
    # And a flag turns off what the file turned on.
    config = tmp_path / "kp.yaml"
    config.write_text(
        Path(CONFIG).read_text().replace("masqueradeAll: false", "masqueradeAll: true")
    )
    code, from_file, _ = render(capsys, "-f", CLUSTER, "--config", str(config), "--ip-family",
                                "IPv4")  # fmt: skip
    assert code == 0
    assert from_file == forced
    code, overridden, _ = render(capsys, "-f", CLUSTER, "--config", str(config), "--ip-family",
                                 "IPv4", "--masquerade-all=false")  # fmt: skip
    assert code == 0
    assert overridden == default


def test_cluster_cidr_flag_wins(capsys: pytest.CaptureFixture[str]) -> None:
    out = render_examples(capsys, "--cluster-cidr", "10.0.0.0/8")
    rule = WEB_CLUSTER_IP_MASQ.search(out)
    assert rule is not None
    assert rule.group(0).endswith("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    assert "10.244.0.0/16" not in out


@pytest.mark.parametrize(
    ("args", "jump"),
    [
        pytest.param([], "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS", id="default"),
        pytest.param(["--iptables-localhost-nodeports", "false"],
                     "-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS",
                     id="localhost-nodeports-false"),
        pytest.param(["--nodeport-addresses", "primary"], "-d 192.168.10.11 -j KUBE-NODEPORTS",
                     id="nodeport-addresses-primary"),
        pytest.param(["--nodeport-addresses", "192.168.10.0/24", "--node-addresses",
                      "192.168.10.11,10.0.0.1"], "-d 192.168.10.11 -j KUBE-NODEPORTS",
                     id="nodeport-addresses-cidr"),
    ],
)  # fmt: skip
def test_nodeports_jump(capsys: pytest.CaptureFixture[str], args: list[str], jump: str) -> None:
    out = render_examples(capsys, *args)
    jumps = NODEPORTS_JUMP.findall(out)
    assert len(jumps) == 1
    assert jumps[0].endswith(jump)


def test_localhost_nodeports_from_config_overridden_by_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "kp.yaml"
    config.write_text(
        Path(CONFIG).read_text().replace("localhostNodePorts: true", "localhostNodePorts: false")
    )
    base = ["-f", CLUSTER, "--config", str(config), "--ip-family", "IPv4"]
    _, from_file, _ = render(capsys, *base)
    assert NODEPORTS_JUMP.findall(from_file)[0].endswith("! -d 127.0.0.0/8 -j KUBE-NODEPORTS")
    _, overridden, _ = render(capsys, *base, "--iptables-localhost-nodeports", "true")
    assert NODEPORTS_JUMP.findall(overridden)[0].endswith("--dst-type LOCAL -j KUBE-NODEPORTS")


def test_hostname_override_changes_local_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    """storefront (ETP=Local) has a ready endpoint on node-b only: node-b's SVL chain uses it."""
    storefront = service_chains(ServicePortName("shop", "storefront", "https", "TCP"))
    local_rules = re.compile(rf"^-A {storefront.local} .*-j (KUBE-SEP-\w+)$", re.MULTILINE)
    on_a = render_examples(capsys)
    on_b = render_examples(capsys, "--hostname-override", "node-b")
    assert local_rules.findall(on_a) != local_rules.findall(on_b)
    assert len(local_rules.findall(on_b)) == 1
