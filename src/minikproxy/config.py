"""The proxy's configuration: a KubeProxyConfiguration-like YAML file, overridden by flags.

Field names and defaults follow kube-proxy's ``kubeproxy.config.k8s.io/v1alpha1``. Fields that
kube-proxy has but minikproxy does not use (IPVS tuning, Windows, logging, ...) are accepted
and ignored; unknown fields are errors naming the file and the field, as with kube-proxy's
strict decoding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from minikproxy.compile.localdetect import DETECT_LOCAL_MODES

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
PROXY_MODES = ("iptables", "nftables")
NFTABLES_LAYOUTS = ("flat", "kube-proxy")


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class ProxyConfig:
    """The settings minikproxy uses, with kube-proxy's defaults."""

    mode: str = "iptables"
    hostname_override: str = ""
    kubeconfig: str = ""
    cluster_cidr: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    detect_local_mode: str = "ClusterCIDR"
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    nodeport_addresses: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    conntrack_tcp_be_liberal: bool = False
    node_ips: tuple[str, ...] = field(default=())
    # Not in KubeProxyConfiguration (kube-proxy reads the API's ServiceCIDR objects): a flag.
    service_cidrs: tuple[str, ...] = ()
    nftables_layout: str = "flat"

    def with_overrides(self, **overrides: Any) -> ProxyConfig:
        """A copy with the given (non-None) settings replaced."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``1s``, ``500ms``, ``1m30s``, ``0``) into seconds."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r} (expected e.g. 1s, 500ms, 1m30s)")
    return total


# kube-proxy fields minikproxy accepts but does not act on.
_IGNORED_TOP_LEVEL = {
    "apiVersion",
    "kind",
    "bindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "featureGates",
    "logging",
    "ipvs",
    "nftables",
    "winkernel",
    "oomScoreAdj",
    "portRange",
    "configSyncPeriod",
    "udpIdleTimeout",
}


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is int:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def config_from_mapping(doc: Mapping[str, Any], source: str) -> ProxyConfig:
    """Build a :class:`ProxyConfig` from a parsed KubeProxyConfiguration document."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a {KIND} mapping")
    if doc.get("kind", KIND) != KIND:
        raise ConfigError(f"{source}: kind: expected {KIND}, got {doc.get('kind')!r}")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(f"{source}: apiVersion: expected {API_VERSION}")
    settings: dict[str, Any] = {}

    def where(path: str) -> str:
        return f"{source}: {path}"

    for key, value in doc.items():
        if key in _IGNORED_TOP_LEVEL:
            continue
        if key == "mode":
            mode = _expect(value, str, where("mode")) or "iptables"
            if mode not in PROXY_MODES:
                raise ConfigError(f"{where('mode')}: unsupported proxy mode {mode!r}")
            settings["mode"] = mode
        elif key == "hostnameOverride":
            settings["hostname_override"] = _expect(value or "", str, where(key))
        elif key == "clusterCIDR":
            settings["cluster_cidr"] = _expect(value or "", str, where(key))
        elif key == "clientConnection":
            conn = _expect(value or {}, Mapping, where(key))
            kubeconfig = conn.get("kubeconfig") or ""
            settings["kubeconfig"] = _expect(kubeconfig, str, where(f"{key}.kubeconfig"))
        elif key in ("healthzBindAddress", "metricsBindAddress"):
            target = "healthz_bind_address" if key.startswith("healthz") else "metrics_bind_address"
            if value:
                settings[target] = _expect(value, str, where(key))
        elif key == "detectLocalMode":
            if value:
                if value not in DETECT_LOCAL_MODES:
                    raise ConfigError(f"{where(key)}: unknown mode {value!r}")
                settings["detect_local_mode"] = value
        elif key == "detectLocal":
            detect = _expect(value or {}, Mapping, where(key))
            for sub, target in (
                ("bridgeInterface", "bridge_interface"),
                ("interfaceNamePrefix", "interface_name_prefix"),
            ):
                if detect.get(sub):
                    settings[target] = _expect(detect[sub], str, where(f"{key}.{sub}"))
            extra = set(detect) - {"bridgeInterface", "interfaceNamePrefix"}
            if extra:
                raise ConfigError(f"{where(key)}: unknown fields {sorted(extra)}")
        elif key == "nodePortAddresses":
            addresses = _expect(value or [], list, where(key))
            settings["nodeport_addresses"] = tuple(
                _expect(a, str, where(f"{key}[{i}]")) for i, a in enumerate(addresses)
            )
        elif key == "iptables":
            _read_iptables(_expect(value or {}, Mapping, where(key)), where(key), settings)
        elif key == "conntrack":
            ct = _expect(value or {}, Mapping, where(key))
            if ct.get("tcpBeLiberal") is not None:
                settings["conntrack_tcp_be_liberal"] = _expect(
                    ct["tcpBeLiberal"], bool, where(f"{key}.tcpBeLiberal")
                )
        else:
            raise ConfigError(f"{where(key)}: unknown field")
    return ProxyConfig().with_overrides(**settings)


def _read_iptables(section: Mapping[str, Any], where: str, settings: dict[str, Any]) -> None:
    for key, value in section.items():
        path = f"{where}.{key}"
        if value is None:
            continue
        if key == "masqueradeAll":
            settings["masquerade_all"] = _expect(value, bool, path)
        elif key == "masqueradeBit":
            bit = _expect(value, int, path)
            if not 0 <= bit <= 31:
                raise ConfigError(f"{path}: must be in 0..31, got {bit}")
            settings["masquerade_bit"] = bit
        elif key == "localhostNodePorts":
            settings["localhost_nodeports"] = _expect(value, bool, path)
        elif key in ("syncPeriod", "minSyncPeriod"):
            try:
                seconds = parse_duration(str(value))
            except ValueError as err:
                raise ConfigError(f"{path}: {err}") from None
            settings["sync_period" if key == "syncPeriod" else "min_sync_period"] = seconds
        else:
            raise ConfigError(f"{path}: unknown field")


def load_config(path: str | Path) -> ProxyConfig:
    """Read a KubeProxyConfiguration YAML file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{line}: invalid YAML: {err}") from None
    return config_from_mapping(doc or {}, source)
