"""The proxy's configuration: a KubeProxyConfiguration YAML file, overridden by flags.

The file is kube-proxy's ``kubeproxy.config.k8s.io/v1alpha1``, read as kube-proxy reads it:
every field kube-proxy knows is accepted (the complete file kubeadm writes included, every
field present and zero values meaning "default"), defaulted as in kube-proxy's v1alpha1
defaults and validated as in its validation package. Fields minikproxy does not act on
(nftables and Windows tuning, logging, conntrack sysctls, ...) are type-checked and
validated, then ignored (:data:`IGNORED_FIELDS`). Unknown fields, at any depth, are errors
naming the file and the field's path. Every error is one line naming the file and field (or
the flag) that holds the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from minikproxy.compile.localdetect import DETECT_LOCAL_MODES
from minikproxy.model.parse import canonical_cidr, canonical_ip

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
PROXY_MODES = ("iptables", "nftables", "ipvs")
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")
"""kube-proxy's IPVS schedulers; an empty scheduler means ``rr``."""
NFTABLES_LAYOUTS = ("flat", "kube-proxy")
HEALTHZ_PORT = 10256  # kube-proxy's ports.ProxyHealthzPort
METRICS_PORT = 10249  # kube-proxy's ports.ProxyStatusPort


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class ProxyConfig:
    """The settings minikproxy uses, with kube-proxy's defaults.

    ``origins`` maps a setting to where it came from (``FILE: iptables.syncPeriod`` or
    ``--sync-period``), for error messages; it takes no part in comparisons.
    """

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
    healthz_bind_address: str = f"0.0.0.0:{HEALTHZ_PORT}"
    metrics_bind_address: str = f"127.0.0.1:{METRICS_PORT}"
    conntrack_tcp_be_liberal: bool = False
    node_ips: tuple[str, ...] = field(default=())
    # Not in KubeProxyConfiguration (kube-proxy reads the API's ServiceCIDR objects): a flag.
    service_cidrs: tuple[str, ...] = ()
    nftables_layout: str = "flat"
    # kube-proxy's ipvs section; in ipvs mode sync_period/min_sync_period come from it.
    ipvs_scheduler: str = ""
    ipvs_sync_period: float = 30.0
    ipvs_min_sync_period: float = 0.0
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    ipvs_strict_arp: bool = False
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcp_fin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def with_overrides(self, **overrides: Any) -> ProxyConfig:
        """A copy with the given (non-None) settings replaced."""
        known = {f.name for f in fields(self)} - {"origins"}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def where(self, name: str) -> str:
        """Where setting ``name`` came from, for an error message."""
        return self.origins.get(name) or f"{_CONFIG_PATHS.get(name, name)} (default)"


# The file's path of each ProxyConfig setting (for messages about defaults and the file).
_CONFIG_PATHS = {
    "mode": "mode",
    "hostname_override": "hostnameOverride",
    "kubeconfig": "clientConnection.kubeconfig",
    "cluster_cidr": "clusterCIDR",
    "masquerade_all": "iptables.masqueradeAll",
    "masquerade_bit": "iptables.masqueradeBit",
    "localhost_nodeports": "iptables.localhostNodePorts",
    "sync_period": "iptables.syncPeriod",
    "min_sync_period": "iptables.minSyncPeriod",
    "detect_local_mode": "detectLocalMode",
    "bridge_interface": "detectLocal.bridgeInterface",
    "interface_name_prefix": "detectLocal.interfaceNamePrefix",
    "nodeport_addresses": "nodePortAddresses",
    "healthz_bind_address": "healthzBindAddress",
    "metrics_bind_address": "metricsBindAddress",
    "conntrack_tcp_be_liberal": "conntrack.tcpBeLiberal",
    "node_ips": "bindAddress",
    "ipvs_scheduler": "ipvs.scheduler",
    "ipvs_sync_period": "ipvs.syncPeriod",
    "ipvs_min_sync_period": "ipvs.minSyncPeriod",
    "ipvs_exclude_cidrs": "ipvs.excludeCIDRs",
    "ipvs_strict_arp": "ipvs.strictARP",
    "ipvs_tcp_timeout": "ipvs.tcpTimeout",
    "ipvs_tcp_fin_timeout": "ipvs.tcpFinTimeout",
    "ipvs_udp_timeout": "ipvs.udpTimeout",
}

# --- Go durations -------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float:
    """Parse a Go duration (``1s``, ``500ms``, ``1m30s``, ``-1s``, ``0``) into seconds."""
    text = text.strip()
    body, sign = text, 1.0
    if body[:1] in ("+", "-"):
        body, sign = body[1:], (-1.0 if body[0] == "-" else 1.0)
        if not body:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 1s, 500ms, 1m30s)")
    if body in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(body):
        raise ValueError(f"invalid duration {text!r} (expected e.g. 1s, 500ms, 1m30s)")
    return sign * total


def format_duration(seconds: float) -> str:
    """Seconds as a short Go-like duration (``30s``, ``1m0s``, ``500ms``)."""
    if seconds and abs(seconds) < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(abs(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    sign = "-" if seconds < 0 else ""
    if hours:
        return f"{sign}{hours}h{minutes}m{secs:g}s"
    return f"{sign}{minutes}m{secs:g}s" if minutes else f"{sign}{secs:g}s"


# --- the v1alpha1 schema --------------------------------------------------------------------


class _Reader:
    """Type checks for one file: each returns the value (None when null: Go's zero value)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def string(self, value: Any, path: str) -> Any:
        if value is not None and not isinstance(value, str):
            raise self.error(path, f"expected a string, got {value!r}")
        return value

    def boolean(self, value: Any, path: str) -> Any:
        if value is not None and not isinstance(value, bool):
            raise self.error(path, f"expected true or false, got {value!r}")
        return value

    def integer(self, value: Any, path: str) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(path, f"expected an integer, got {value!r}")
        if value is not None and not -(2**31) <= value < 2**31:
            raise self.error(path, f"{value} does not fit in 32 bits")
        return value

    def number(self, value: Any, path: str) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise self.error(path, f"expected a number, got {value!r}")
        return value

    def duration(self, value: Any, path: str) -> float | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(path, f"expected a duration string (e.g. 30s), got {value!r}")
        try:
            return parse_duration(value)
        except ValueError as err:
            raise self.error(path, str(err)) from None

    def string_list(self, value: Any, path: str) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(path, f"expected a list of strings, got {value!r}")
        return [self.string(v, f"{path}[{i}]") or "" for i, v in enumerate(value)]

    def mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(path, f"expected a mapping, got {value!r}")
        return value

    def flush_frequency(self, value: Any, path: str) -> Any:
        # TimeOrMetaDuration: nanoseconds as an integer, or a duration string
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return self.duration(value, path)

    def quantity(self, value: Any, path: str) -> Any:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
            raise self.error(path, f"expected a quantity (e.g. 0, 64Ki, 1M), got {value!r}")
        return value

    def bool_map(self, value: Any, path: str) -> Any:
        for key, flag in self.mapping(value, path).items():
            self.boolean(flag, f"{path}.{key}")
        return value

    def vmodule(self, value: Any, path: str) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {value!r}")
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            entry = self.section(item, where, {"filePattern": "string", "verbosity": "integer"})
            if not entry.get("filePattern"):
                raise self.error(f"{where}.filePattern", "must not be empty")
        return value

    def section(self, value: Any, path: str, schema: Mapping[str, Any]) -> dict[str, Any]:
        """Check a mapping against ``schema`` (field -> check name, or a nested schema)."""
        out: dict[str, Any] = {}
        prefix = f"{path}." if path else ""
        for key, item in self.mapping(value, path or "(document)").items():
            where = f"{prefix}{key}"
            kind = schema.get(key) if isinstance(key, str) else None
            if kind is None:
                raise self.error(where, "unknown field")
            if isinstance(kind, Mapping):
                out[key] = self.section(item, where, kind)
            else:
                check: Callable[[Any, str], Any] = getattr(self, kind)
                out[key] = check(item, where)
        return out


_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munk]|)")

_OUTPUT_ROUTING = {"infoBufferSize": "quantity", "splitStream": "boolean"}
_D = "duration"
SCHEMA: Mapping[str, Any] = {
    "apiVersion": "string",
    "kind": "string",
    "featureGates": "bool_map",
    "clientConnection": {
        "kubeconfig": "string",
        "acceptContentTypes": "string",
        "contentType": "string",
        "qps": "number",
        "burst": "integer",
    },
    "logging": {
        "format": "string",
        "flushFrequency": "flush_frequency",
        "verbosity": "integer",
        "vmodule": "vmodule",
        "options": {"text": _OUTPUT_ROUTING, "json": _OUTPUT_ROUTING},
    },
    "hostnameOverride": "string",
    "bindAddress": "string",
    "healthzBindAddress": "string",
    "metricsBindAddress": "string",
    "bindAddressHardFail": "boolean",
    "enableProfiling": "boolean",
    "showHiddenMetricsForVersion": "string",
    "mode": "string",
    "iptables": {
        "masqueradeBit": "integer",
        "masqueradeAll": "boolean",
        "localhostNodePorts": "boolean",
        "syncPeriod": _D,
        "minSyncPeriod": _D,
    },
    "ipvs": {
        "syncPeriod": _D,
        "minSyncPeriod": _D,
        "scheduler": "string",
        "excludeCIDRs": "string_list",
        "strictARP": "boolean",
        "tcpTimeout": _D,
        "tcpFinTimeout": _D,
        "udpTimeout": _D,
    },
    "nftables": {
        "masqueradeBit": "integer",
        "masqueradeAll": "boolean",
        "syncPeriod": _D,
        "minSyncPeriod": _D,
    },
    "winkernel": {
        "networkName": "string",
        "sourceVip": "string",
        "enableDSR": "boolean",
        "rootHnsEndpointName": "string",
        "forwardHealthCheckVip": "boolean",
    },
    "detectLocalMode": "string",
    "detectLocal": {"bridgeInterface": "string", "interfaceNamePrefix": "string"},
    "clusterCIDR": "string",
    "nodePortAddresses": "string_list",
    "oomScoreAdj": "integer",
    "conntrack": {
        "maxPerCore": "integer",
        "min": "integer",
        "tcpEstablishedTimeout": _D,
        "tcpCloseWaitTimeout": _D,
        "tcpBeLiberal": "boolean",
        "udpTimeout": _D,
        "udpStreamTimeout": _D,
    },
    "configSyncPeriod": _D,
    "portRange": "string",
    "windowsRunAsService": "boolean",
}
"""Every field of kube-proxy's v1alpha1 KubeProxyConfiguration, with its check."""

IGNORED_FIELDS = (
    "bindAddressHardFail",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "configSyncPeriod",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpEstablishedTimeout",
    "conntrack.tcpCloseWaitTimeout",
    "conntrack.udpTimeout",
    "conntrack.udpStreamTimeout",
    "enableProfiling",
    "featureGates",
    "logging",
    "nftables",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "windowsRunAsService",
)
"""Fields accepted and validated as kube-proxy does, but not acted on."""


def _get(doc: Mapping[str, Any], path: str) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def config_from_mapping(doc: Mapping[str, Any], source: str) -> ProxyConfig:
    """Build a :class:`ProxyConfig` from a parsed KubeProxyConfiguration document: strict
    field checks, kube-proxy's v1alpha1 defaulting, then its validation."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: expected a {KIND} mapping")
    reader = _Reader(source)
    values = reader.section(doc, "", SCHEMA)
    if values.get("kind") not in (None, "", KIND):
        raise reader.error("kind", f"expected {KIND}, got {values['kind']!r}")
    if values.get("apiVersion") not in (None, "", API_VERSION):
        raise reader.error("apiVersion", f"expected {API_VERSION}, got {values['apiVersion']!r}")

    def get(path: str) -> Any:
        return _get(values, path)

    _validate_ignored(values, reader)
    settings: dict[str, Any] = {}
    origins: dict[str, str] = {}

    def put(name: str, value: Any) -> None:
        settings[name] = value
        origins[name] = f"{source}: {_CONFIG_PATHS[name]}"

    put("mode", get("mode") or "iptables")
    put("hostname_override", get("hostnameOverride") or "")
    put("kubeconfig", get("clientConnection.kubeconfig") or "")
    put("cluster_cidr", get("clusterCIDR") or "")
    put("detect_local_mode", get("detectLocalMode") or "ClusterCIDR")
    put("bridge_interface", get("detectLocal.bridgeInterface") or "")
    put("interface_name_prefix", get("detectLocal.interfaceNamePrefix") or "")
    put("nodeport_addresses", tuple(get("nodePortAddresses") or ()))
    put("masquerade_all", bool(get("iptables.masqueradeAll")))
    bit = get("iptables.masqueradeBit")
    put("masquerade_bit", 14 if bit is None else bit)
    localhost = get("iptables.localhostNodePorts")
    put("localhost_nodeports", True if localhost is None else localhost)
    # kube-proxy's v1alpha1 defaults: a zero (or absent) period means the default
    put("sync_period", get("iptables.syncPeriod") or 30.0)
    put("min_sync_period", get("iptables.minSyncPeriod") or 1.0)
    put("conntrack_tcp_be_liberal", bool(get("conntrack.tcpBeLiberal")))
    put("ipvs_scheduler", get("ipvs.scheduler") or "")
    put("ipvs_sync_period", get("ipvs.syncPeriod") or 30.0)  # v1alpha1 default; no min default
    put("ipvs_min_sync_period", get("ipvs.minSyncPeriod") or 0.0)
    put("ipvs_exclude_cidrs", tuple(get("ipvs.excludeCIDRs") or ()))
    put("ipvs_strict_arp", bool(get("ipvs.strictARP")))
    put("ipvs_tcp_timeout", get("ipvs.tcpTimeout") or 0.0)
    put("ipvs_tcp_fin_timeout", get("ipvs.tcpFinTimeout") or 0.0)
    put("ipvs_udp_timeout", get("ipvs.udpTimeout") or 0.0)
    if settings["mode"] == "ipvs":  # kube-proxy's IPVS proxier syncs with the ipvs periods
        settings["sync_period"] = settings["ipvs_sync_period"]
        settings["min_sync_period"] = settings["ipvs_min_sync_period"]
        origins["sync_period"] = origins["ipvs_sync_period"]
        origins["min_sync_period"] = origins["ipvs_min_sync_period"]

    bind = get("bindAddress") or "0.0.0.0"
    parsed_bind = canonical_ip(bind)
    if parsed_bind is None:
        raise reader.error("bindAddress", f"{bind!r} is not a valid IP address")
    ipv6 = parsed_bind[1] == "IPv6"
    if parsed_bind[0] not in ("0.0.0.0", "::"):
        put("node_ips", (parsed_bind[0],))  # kube-proxy: overrides the node's primary IP
    healthz = get("healthzBindAddress") or ("[::]" if ipv6 else "0.0.0.0")
    metrics = get("metricsBindAddress") or ("[::1]" if ipv6 else "127.0.0.1")
    put("healthz_bind_address", append_port_if_needed(healthz, HEALTHZ_PORT))
    put("metrics_bind_address", append_port_if_needed(metrics, METRICS_PORT))

    config = ProxyConfig().with_overrides(**settings)
    config = replace(config, origins=origins)
    validate_config(config)
    return config


def _validate_ignored(values: Mapping[str, Any], reader: _Reader) -> None:
    """kube-proxy's validation of the fields minikproxy does not act on."""

    def get(path: str) -> Any:
        return _get(values, path)

    def at_least(path: str, minimum: float, strictly: bool = False) -> None:
        value = get(path)
        if value is None:
            return
        if value < minimum or (strictly and value == minimum):
            op = ">" if strictly else ">="
            shown = format_duration(value) if SCHEMA_KIND.get(path) == _D else value
            raise reader.error(path, f"must be {op} {minimum:g}, got {shown}")

    for path in (
        "conntrack.maxPerCore",
        "conntrack.min",
        "conntrack.tcpEstablishedTimeout",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.udpTimeout",
        "conntrack.udpStreamTimeout",
        "clientConnection.burst",
        "configSyncPeriod",  # zero means the default (15m): only negatives are wrong
        "logging.verbosity",
    ):
        at_least(path, 0)
    oom = get("oomScoreAdj")
    if oom is not None and not -1000 <= oom <= 1000:
        raise reader.error("oomScoreAdj", f"must be in -1000..1000, got {oom}")
    bit = get("nftables.masqueradeBit")
    if bit is not None and not 0 <= bit <= 31:
        raise reader.error("nftables.masqueradeBit", f"must be in 0..31, got {bit}")
    fmt = get("logging.format")
    if fmt not in (None, "", "text", "json"):
        raise reader.error("logging.format", f"must be text or json, got {fmt!r}")
    port_range = get("portRange") or ""
    if port_range and not _valid_port_range(port_range):
        raise reader.error("portRange", f"{port_range!r} is not a port range (e.g. 300-2000)")
    version = get("showHiddenMetricsForVersion") or ""
    if version and not re.fullmatch(r"\d+\.\d+", version):
        raise reader.error("showHiddenMetricsForVersion", f"{version!r} is not MAJOR.MINOR")


SCHEMA_KIND = {
    f"{section}.{key}": kind
    for section, sub in SCHEMA.items()
    if isinstance(sub, Mapping)
    for key, kind in sub.items()
} | {key: kind for key, kind in SCHEMA.items() if not isinstance(kind, Mapping)}


def _valid_port_range(text: str) -> bool:
    match = re.fullmatch(r"(\d+)(?:([-+])(\d+))?", text.strip())
    if match is None:
        return False
    base = int(match.group(1))
    if match.group(2) is None:
        return base <= 65535
    other = int(match.group(3))
    last = base + other if match.group(2) == "+" else other
    return base <= last <= 65535


# --- validation of the merged settings (file and flags) ------------------------------------


def append_port_if_needed(address: str, port: int) -> str:
    """kube-proxy's ``AppendPortIfNeeded``: a bare IP gets ``port`` (IPv6 in brackets)."""
    parsed = canonical_ip(address.strip("[]"))
    if parsed is None or (":" in address and parsed[1] == "IPv4"):
        return address
    host = f"[{parsed[0]}]" if parsed[1] == "IPv6" else parsed[0]
    return f"{host}:{port}"


def check_host_port(address: str) -> str | None:
    """Why ``address`` is not ``IP:port`` (kube-proxy's ``validateHostPort``), or None.

    Port 0 (an ephemeral port) is accepted too, for tests.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return f"{address!r} must be IP:port"
    if host.startswith("["):
        if not host.endswith("]"):
            return f"{address!r} must be IP:port"
        host = host[1:-1]
    elif ":" in host:
        return f"{address!r} must be IP:port (IPv6 addresses in brackets)"
    if canonical_ip(host) is None:
        return f"{host!r} in {address!r} is not a valid IP address"
    if not port.isdigit() or int(port) > 65535:
        return f"port {port!r} in {address!r} is not a valid port"
    return None


def validate_config(config: ProxyConfig) -> None:
    """kube-proxy's validation of the settings minikproxy uses; errors name their origin."""

    def fail(name: str, message: str) -> ConfigError:
        return ConfigError(f"{config.where(name)}: {message}")

    if config.mode not in PROXY_MODES:
        raise fail(
            "mode", f"unsupported proxy mode {config.mode!r} (one of {', '.join(PROXY_MODES)})"
        )
    if config.sync_period <= 0:
        shown = format_duration(config.sync_period)
        raise fail("sync_period", f"must be greater than 0, got {shown}")
    if config.min_sync_period < 0:
        raise fail(
            "min_sync_period", f"must be 0 or more, got {format_duration(config.min_sync_period)}"
        )
    if config.min_sync_period > config.sync_period:
        raise fail(
            "min_sync_period",
            f"{format_duration(config.min_sync_period)} must not be greater than "
            f"{config.where('sync_period')} ({format_duration(config.sync_period)})",
        )
    if not 0 <= config.masquerade_bit <= 31:
        raise fail("masquerade_bit", f"must be in 0..31, got {config.masquerade_bit}")
    for name in ("healthz_bind_address", "metrics_bind_address"):
        address = getattr(config, name)
        if address and (problem := check_host_port(address)):
            raise fail(name, problem)
    if config.detect_local_mode not in DETECT_LOCAL_MODES:
        raise fail(
            "detect_local_mode",
            f"unknown mode {config.detect_local_mode!r} (one of {', '.join(DETECT_LOCAL_MODES)})",
        )
    if config.detect_local_mode == "BridgeInterface" and not config.bridge_interface:
        raise fail("bridge_interface", "must not be empty with detectLocalMode BridgeInterface")
    if config.detect_local_mode == "InterfaceNamePrefix" and not config.interface_name_prefix:
        raise fail(
            "interface_name_prefix", "must not be empty with detectLocalMode InterfaceNamePrefix"
        )
    if config.detect_local_mode == "ClusterCIDR" and config.cluster_cidr:
        cidrs = [c.strip() for c in config.cluster_cidr.split(",")]
        families = []
        for cidr in cidrs:
            parsed = canonical_cidr(cidr) if cidr else None
            if parsed is None:
                raise fail("cluster_cidr", f"{cidr!r} is not a valid CIDR")
            families.append(parsed[1])
        if len(cidrs) > 2 or len(set(families)) != len(families):
            raise fail(
                "cluster_cidr",
                f"{config.cluster_cidr!r} must be one CIDR or a dual-stack pair (IPv4,IPv6)",
            )
    addresses = config.nodeport_addresses
    for i, text in enumerate(addresses):
        if text == "primary":
            if len(addresses) != 1:
                raise fail("nodeport_addresses", "cannot use both 'primary' and CIDRs")
        elif canonical_cidr(text) is None:
            raise fail("nodeport_addresses", f"[{i}] {text!r} is not a valid CIDR")
    for text in config.node_ips:
        if canonical_ip(text) is None:
            raise fail("node_ips", f"{text!r} is not a valid IP address")
    _validate_ipvs(config, fail)


def _validate_ipvs(config: ProxyConfig, fail: Callable[[str, str], ConfigError]) -> None:
    """kube-proxy's validation of the ipvs section (``validateKubeProxyIPVSConfiguration``)."""
    if config.ipvs_scheduler and config.ipvs_scheduler not in IPVS_SCHEDULERS:
        raise fail(
            "ipvs_scheduler",
            f"unknown scheduler {config.ipvs_scheduler!r}: must be one of "
            f"{', '.join(IPVS_SCHEDULERS)}, blank means the default (rr)",
        )
    if config.ipvs_sync_period <= 0:
        raise fail(
            "ipvs_sync_period",
            f"must be greater than 0, got {format_duration(config.ipvs_sync_period)}",
        )
    for name in (
        "ipvs_min_sync_period",
        "ipvs_tcp_timeout",
        "ipvs_tcp_fin_timeout",
        "ipvs_udp_timeout",
    ):
        value = getattr(config, name)
        if value < 0:
            raise fail(name, f"must be 0 or more, got {format_duration(value)}")
    if config.ipvs_min_sync_period > config.ipvs_sync_period:
        raise fail(
            "ipvs_min_sync_period",
            f"{format_duration(config.ipvs_min_sync_period)} must not be greater than "
            f"{config.where('ipvs_sync_period')} ({format_duration(config.ipvs_sync_period)})",
        )
    for i, text in enumerate(config.ipvs_exclude_cidrs):
        if canonical_cidr(text) is None:
            raise fail("ipvs_exclude_cidrs", f"[{i}] {text!r} is not a valid CIDR")


def load_config(path: str | Path) -> ProxyConfig:
    """Read a KubeProxyConfiguration YAML file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}:{line}: invalid YAML: {problem}") from None
    return config_from_mapping(doc or {}, source)


__all__ = [
    "API_VERSION",
    "IGNORED_FIELDS",
    "KIND",
    "PROXY_MODES",
    "SCHEMA",
    "ConfigError",
    "ProxyConfig",
    "append_port_if_needed",
    "check_host_port",
    "config_from_mapping",
    "load_config",
    "parse_duration",
    "validate_config",
]
