"""KubeProxyConfiguration read as kube-proxy reads it: kubeadm's complete file (every field,
zero values meaning "default"), kube-proxy's v1alpha1 defaulting and validation, and
one-line errors naming the file and field (or the flag), exit 2 and no traceback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from minikproxy.cli import build_parser, config_from_args, main
from minikproxy.config import SCHEMA, ConfigError, ProxyConfig, load_config

DATA = Path(__file__).resolve().parents[1] / "data"
KUBEADM = DATA / "kubeadm-kube-proxy-config.yaml"
ALL_FIELDS = DATA / "kube-proxy-config-all-fields.yaml"


def paths(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Every field path of a schema or document, nested sections included."""
    out: set[str] = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, Mapping) and key != "featureGates":  # a map, not a section
            out |= paths(value, f"{prefix}{key}.")
    return out


def from_args(*argv: str) -> ProxyConfig:
    return config_from_args(build_parser().parse_args(["run", "--dry-run", *argv]))


def test_kubeadm_config_gets_kube_proxy_defaults() -> None:
    config = load_config(KUBEADM)
    assert config == ProxyConfig(
        kubeconfig="/var/lib/kube-proxy/kubeconfig.conf",
        cluster_cidr="10.244.0.0/16",
        sync_period=30.0,  # syncPeriod: 0s
        min_sync_period=1.0,  # minSyncPeriod: 0s
        masquerade_bit=14,
        localhost_nodeports=True,
        healthz_bind_address="0.0.0.0:10256",
        metrics_bind_address="127.0.0.1:10249",
    )


def test_kubeadm_config_through_the_command_line() -> None:
    config = from_args("--config", str(KUBEADM), "--kubeconfig", "/tmp/kc")
    assert (config.sync_period, config.min_sync_period, config.kubeconfig) == (30.0, 1.0, "/tmp/kc")


def test_the_fixtures_hold_every_field() -> None:
    kubeadm = yaml.safe_load(KUBEADM.read_text())
    everything = yaml.safe_load(ALL_FIELDS.read_text())
    assert paths(everything) == paths(SCHEMA)
    # what kubeadm leaves out: maps and lists it has no value for, and two optional fields
    assert paths(SCHEMA) - paths(kubeadm) == {
        "featureGates",
        "logging.format",
        "logging.vmodule",
        "logging.options.text.splitStream",
        "logging.options.json.splitStream",
        "windowsRunAsService",
    }


def test_every_field_set() -> None:
    config = load_config(ALL_FIELDS)
    assert config == ProxyConfig(
        mode="iptables",
        hostname_override="Node-A",
        kubeconfig="/etc/kube-proxy/kubeconfig",
        cluster_cidr="10.244.0.0/16,fd00:10:244::/56",
        masquerade_all=True,
        masquerade_bit=13,
        localhost_nodeports=False,
        sync_period=60.0,
        min_sync_period=2.0,
        detect_local_mode="InterfaceNamePrefix",
        bridge_interface="cbr0",
        interface_name_prefix="veth",
        nodeport_addresses=("192.168.5.0/24", "fd00::/64"),
        healthz_bind_address="192.168.5.1:10256",  # kube-proxy appends the default port
        metrics_bind_address="0.0.0.0:9100",
        conntrack_tcp_be_liberal=True,
        node_ips=("192.168.5.1",),  # bindAddress overrides the node's primary IP
        ipvs_scheduler="wrr",
        ipvs_sync_period=45.0,
        ipvs_min_sync_period=5.0,
        ipvs_exclude_cidrs=("10.1.0.0/16",),
        ipvs_strict_arp=True,
        ipvs_tcp_timeout=900.0,
        ipvs_tcp_fin_timeout=30.0,
        ipvs_udp_timeout=300.0,
    )


def test_ipv6_bind_address_defaults_the_servers_to_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text("bindAddress: '::'\nhealthzBindAddress: '::1'\n")
    config = load_config(path)
    assert (config.healthz_bind_address, config.metrics_bind_address) == (
        "[::1]:10256",
        "[::1]:10249",
    )
    assert config.node_ips == ()


def test_masquerade_bit_zero_is_a_value_not_the_default(tmp_path: Path) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text("iptables: {masqueradeBit: 0, localhostNodePorts: false}\n")
    config = load_config(path)
    assert (config.masquerade_bit, config.localhost_nodeports) == (0, False)


BAD_FILES = [
    ({"conntrack": {"maxPerCor": 1}}, "conntrack.maxPerCor: unknown field"),
    ({"clientConnection": {"kubeConfig": "x"}}, "clientConnection.kubeConfig: unknown field"),
    ({"logging": {"options": {"text": {"bufferSize": 1}}}},
     "logging.options.text.bufferSize: unknown field"),
    ({"winkernel": {"enableDSRR": True}}, "winkernel.enableDSRR: unknown field"),
    ({"bogus": 1}, "bogus: unknown field"),
    ({"iptables": {"syncPeriod": "1s", "minSyncPeriod": "5s"}},
     "iptables.minSyncPeriod: 5s must not be greater than"),
    ({"iptables": {"syncPeriod": "-1s"}}, "iptables.syncPeriod: must be greater than 0, got -1s"),
    ({"iptables": {"minSyncPeriod": "-1s"}}, "iptables.minSyncPeriod: must be 0 or more"),
    ({"iptables": {"masqueradeBit": 32}}, "iptables.masqueradeBit: must be in 0..31, got 32"),
    ({"nftables": {"masqueradeBit": 40}}, "nftables.masqueradeBit: must be in 0..31, got 40"),
    ({"conntrack": {"maxPerCore": -1}}, "conntrack.maxPerCore: must be >= 0, got -1"),
    ({"conntrack": {"udpTimeout": "-5s"}}, "conntrack.udpTimeout: must be >= 0, got -5s"),
    ({"conntrack": {"min": "big"}}, "conntrack.min: expected an integer"),
    ({"clientConnection": {"burst": -1}}, "clientConnection.burst: must be >= 0"),
    ({"clientConnection": {"qps": "fast"}}, "clientConnection.qps: expected a number"),
    ({"configSyncPeriod": "-1m"}, "configSyncPeriod: must be >= 0"),
    ({"configSyncPeriod": 15}, "configSyncPeriod: expected a duration string"),
    ({"oomScoreAdj": 2000}, "oomScoreAdj: must be in -1000..1000, got 2000"),
    ({"portRange": "abc"}, "portRange: 'abc' is not a port range"),
    ({"showHiddenMetricsForVersion": "v1"}, "showHiddenMetricsForVersion: 'v1' is not"),
    ({"logging": {"format": "xml"}}, "logging.format: must be text or json"),
    ({"logging": {"options": {"json": {"infoBufferSize": "lots"}}}},
     "logging.options.json.infoBufferSize: expected a quantity"),
    ({"logging": {"vmodule": [{"verbosity": 2}]}}, "logging.vmodule[0].filePattern: must not"),
    ({"featureGates": {"Foo": "yes"}}, "featureGates.Foo: expected true or false"),
    ({"bindAddress": "nowhere"}, "bindAddress: 'nowhere' is not a valid IP address"),
    ({"healthzBindAddress": "10256"}, "healthzBindAddress: '10256' must be IP:port"),
    ({"healthzBindAddress": "0.0.0.0:99999"}, "healthzBindAddress: port '99999'"),
    ({"metricsBindAddress": "localhost:10249"}, "metricsBindAddress: 'localhost' in"),
    ({"clusterCIDR": "10.0.0.0/8,10.1.0.0/16"}, "clusterCIDR: '10.0.0.0/8,10.1.0.0/16' must be"),
    ({"clusterCIDR": "10.0.0.0/33"}, "clusterCIDR: '10.0.0.0/33' is not a valid CIDR"),
    ({"nodePortAddresses": ["primary", "10.0.0.0/8"]},
     "nodePortAddresses: cannot use both 'primary' and CIDRs"),
    ({"nodePortAddresses": ["10.0.0.0/8", "nope"]}, "nodePortAddresses: [1] 'nope' is not"),
    ({"detectLocalMode": "BridgeInterface"}, "detectLocal.bridgeInterface: must not be empty"),
    ({"detectLocalMode": "InterfaceNamePrefix"},
     "detectLocal.interfaceNamePrefix: must not be empty"),
    ({"ipvs": {"excludeCIDRs": "10.0.0.0/8"}}, "ipvs.excludeCIDRs: expected a list"),
    ({"ipvs": {"excludeCIDRs": ["10.0.0.0/8", "x"]}}, "ipvs.excludeCIDRs: [1] 'x' is not a valid"),
    ({"ipvs": {"scheduler": "fifo"}}, "ipvs.scheduler: unknown scheduler 'fifo'"),
    ({"ipvs": {"tcpTimeout": "-1s"}}, "ipvs.tcpTimeout: must be 0 or more, got -1s"),
    ({"ipvs": {"syncPeriod": "10s", "minSyncPeriod": "20s"}},
     "ipvs.minSyncPeriod: 20s must not be greater than"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_values_are_one_line_errors_naming_file_and_field(
    tmp_path: Path, doc: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}"), err.value
    assert "\n" not in str(err.value)
    # and through `run`: exit 2 with that one error line
    assert main(["run", "--dry-run", "--config", str(path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [str(err.value)]


BAD_FLAGS = [
    (["--min-sync-period", "1m"],
     "--min-sync-period: 1m0s must not be greater than iptables.syncPeriod (default) (30s)"),
    (["--sync-period", "10s", "--min-sync-period", "20s"],
     "--min-sync-period: 20s must not be greater than --sync-period (10s)"),
    (["--sync-period", "0s"], "--sync-period: must be greater than 0, got 0s"),
    (["--healthz-bind-address", "10256"], "--healthz-bind-address: '10256' must be IP:port"),
    (["--healthz-bind-address", "0.0.0.0:99999"],
     "--healthz-bind-address: port '99999' in '0.0.0.0:99999' is not a valid port"),
    (["--metrics-bind-address", "::1:10249"],
     "--metrics-bind-address: '::1:10249' must be IP:port (IPv6 addresses in brackets)"),
    (["--iptables-masquerade-bit", "40"], "--iptables-masquerade-bit: must be in 0..31, got 40"),
    (["--cluster-cidr", "10.0.0.0/8,banana"], "--cluster-cidr: 'banana' is not a valid CIDR"),
    (["--nodeport-addresses", "primary,10.0.0.0/8"],
     "--nodeport-addresses: cannot use both 'primary' and CIDRs"),
    (["--node-ip", "10.0.0.300"], "--node-ip: '10.0.0.300' is not a valid IP address"),
    (["--ipvs-scheduler", "fifo"],
     "--ipvs-scheduler: unknown scheduler 'fifo': must be one of rr, wrr, lc, wlc, lblc, lblcr, "
     "sh, dh, sed, nq, mh, blank means the default (rr)"),
    (["--ipvs-exclude-cidrs", "10.0.0.0/33"],
     "--ipvs-exclude-cidrs: [0] '10.0.0.0/33' is not a valid CIDR"),
    (["--ipvs-udp-timeout=-2s"], "--ipvs-udp-timeout: must be 0 or more, got -2s"),
    (["--detect-local-mode", "BridgeInterface"],
     "detectLocal.bridgeInterface (default): must not be empty with detectLocalMode "
     "BridgeInterface"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_naming_the_flag(
    flags: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["run", "--dry-run", *flags]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [message]


def test_flags_get_the_default_port_and_override_the_file() -> None:
    config = from_args(
        "--config", str(ALL_FIELDS), "--healthz-bind-address", "127.0.0.1",
        "--metrics-bind-address", "", "--sync-period", "2m",
    )  # fmt: skip
    assert config.healthz_bind_address == "127.0.0.1:10256"
    assert config.metrics_bind_address == ""  # disabled
    assert (config.sync_period, config.min_sync_period) == (120.0, 2.0)
    assert config.where("sync_period") == "--sync-period"
    assert config.where("min_sync_period") == f"{ALL_FIELDS}: iptables.minSyncPeriod"


def test_a_bad_file_exits_2_without_a_traceback_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "kp.yaml"
    path.write_text(
        KUBEADM.read_text().replace("  tcpBeLiberal: false", "  tcpBeLiberal: false\n  bogus: 1")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "minikproxy", "run", "--dry-run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith(f"minikproxy: {path}: conntrack.bogus: unknown field"), line


def test_ipvs_section_defaults_and_sync_periods(tmp_path: Path) -> None:
    """kube-proxy's v1alpha1 defaults: ipvs.syncPeriod 30s, no minSyncPeriod default; in
    ipvs mode the IPVS proxier syncs with the ipvs periods."""
    path = tmp_path / "kp.yaml"
    path.write_text(
        "mode: ipvs\niptables: {syncPeriod: 5s}\n"
        "ipvs: {scheduler: wlc, strictARP: true, excludeCIDRs: [10.1.0.0/16], "
        "tcpTimeout: 900s, tcpFinTimeout: 120s, udpTimeout: 300s, minSyncPeriod: 2s}\n"
    )
    config = load_config(path)
    assert (config.mode, config.ipvs_scheduler, config.ipvs_strict_arp) == ("ipvs", "wlc", True)
    assert config.ipvs_exclude_cidrs == ("10.1.0.0/16",)
    assert (config.ipvs_tcp_timeout, config.ipvs_tcp_fin_timeout, config.ipvs_udp_timeout) == (
        900.0,
        120.0,
        300.0,
    )
    assert (config.sync_period, config.min_sync_period) == (30.0, 2.0)
    flagged = from_args("--config", str(path), "--ipvs-sync-period", "1m", "--ipvs-scheduler", "mh")
    assert (flagged.sync_period, flagged.ipvs_scheduler) == (60.0, "mh")
    assert from_args("--proxy-mode", "ipvs").min_sync_period == 0.0
    assert from_args("--proxy-mode", "ipvs", "--sync-period", "7s").sync_period == 7.0
