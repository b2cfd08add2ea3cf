"""Resolve configuration plus node facts into compiler options (done before compiling, never
during: compilers do no lookups)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from minikproxy.compile.iptables import IptablesOptions
from minikproxy.compile.ipvs import DEFAULT_SCHEDULER, IpvsOptions
from minikproxy.compile.localdetect import DetectLocalMode, make_local_detector
from minikproxy.compile.nftables_options import LocalMatch, NftablesOptions
from minikproxy.config import ConfigError, ProxyConfig
from minikproxy.model.names import IPV4, IPFamily
from minikproxy.model.parse import NodeInfo, canonical_cidr, canonical_ip

PRIMARY = "primary"


def split_list(value: str) -> tuple[str, ...]:
    """Split a comma-separated flag value, dropping blanks."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def primary_node_ips(config: ProxyConfig, node: NodeInfo, family: IPFamily) -> tuple[str, ...]:
    """The node's IPs in ``family``: ``--node-ip`` if given, else the Node's addresses."""
    ips: list[str] = []
    for text in config.node_ips:
        parsed = canonical_ip(text)
        if parsed is None:
            raise ConfigError(f"--node-ip: invalid IP address {text!r}")
        if parsed[1] == family:
            ips.append(parsed[0])
    return tuple(ips) if config.node_ips else node.addresses_of(family)


def primary_family(config: ProxyConfig, node: NodeInfo) -> IPFamily:
    """The node's primary IP family, as kube-proxy detects it: the family of the first node IP
    (``--node-ip``, else the Node's first InternalIP, else ExternalIP); IPv4 when none is
    known."""
    first = config.node_ips[0] if config.node_ips else (node.addresses[0] if node.addresses else "")
    parsed = canonical_ip(first) if first else None
    return parsed[1] if parsed is not None else IPV4


def nodeport_addresses(
    config: ProxyConfig, node: NodeInfo, family: IPFamily, node_addresses: Sequence[str]
) -> tuple[str, ...] | None:
    """The node IPs NodePorts answer on, or None for "every local address".

    Follows kube-proxy's ``--nodeport-addresses``: empty (or no CIDR of this family) means
    every local address; ``primary`` means the node's primary IPs; otherwise the addresses of
    ``node_addresses`` inside one of the CIDRs.
    """
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    primary = False
    for text in config.nodeport_addresses:
        if text == PRIMARY:
            primary = True
            continue
        parsed = canonical_cidr(text)
        if parsed is None:
            raise ConfigError(f"--nodeport-addresses: invalid CIDR {text!r}")
        if parsed[1] == family:
            cidrs.append(ipaddress.ip_network(parsed[0]))
    if primary:
        return primary_node_ips(config, node, family)[:1]
    if not cidrs:
        return None
    out: list[str] = []
    for text in node_addresses:
        parsed = canonical_ip(text)
        if parsed is None or parsed[1] != family:
            continue
        ip = ipaddress.ip_address(parsed[0])
        if any(ip in cidr for cidr in cidrs) and parsed[0] not in out:
            out.append(parsed[0])
    return tuple(out)


def iptables_options(
    config: ProxyConfig,
    node: NodeInfo,
    family: IPFamily,
    *,
    node_addresses: Sequence[str] = (),
    random_fully: bool = True,
) -> IptablesOptions:
    """Compiler options for ``family`` on ``node``.

    ``node_addresses`` are the addresses NodePorts may be bound to when
    ``--nodeport-addresses`` lists CIDRs (the host's interface addresses when running, the
    Node's addresses or ``--node-addresses`` when rendering offline).
    """
    try:
        detector = make_local_detector(
            _detect_mode(config.detect_local_mode),
            family,
            cluster_cidrs=split_list(config.cluster_cidr),
            node_pod_cidrs=node.pod_cidrs,
            bridge_interface=config.bridge_interface,
            interface_name_prefix=config.interface_name_prefix,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    node_ips = primary_node_ips(config, node, family)
    return IptablesOptions(
        family=family,
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=detector,
        node_ip=node_ips[0] if node_ips else "",
        nodeport_addresses=nodeport_addresses(config, node, family, node_addresses or node_ips),
        localhost_nodeports=config.localhost_nodeports,
        random_fully=random_fully,
        conntrack_tcp_be_liberal=config.conntrack_tcp_be_liberal,
    )


def nodeport_address_setting(config: ProxyConfig) -> tuple[str, ...]:
    """``--nodeport-addresses`` as the mode applies it: nftables mode defaults to the node's
    primary IP (``primary``), iptables mode to every local address (empty)."""
    if config.mode == "nftables" and not config.nodeport_addresses:
        return (PRIMARY,)
    return tuple(config.nodeport_addresses)


def config_warnings(config: ProxyConfig) -> list[str]:
    """Settings the chosen mode ignores, to say so once at start-up."""
    warnings: list[str] = []
    if config.mode == "nftables":
        if config.localhost_nodeports and "localhost_nodeports" in config.origins:
            where = config.origins["localhost_nodeports"]
            warnings.append(
                "localhost NodePorts are not supported in nftables mode (as in kube-proxy); "
                f"{where} is ignored"
            )
        for text in config.nodeport_addresses:
            parsed = canonical_cidr(text) if text != PRIMARY else None
            if parsed is not None and ipaddress.ip_network(parsed[0]).overlaps(
                ipaddress.ip_network("127.0.0.0/8" if ":" not in parsed[0] else "::1/128")
            ):
                warnings.append(
                    f"--nodeport-addresses {text}: NodePorts on loopback addresses are not "
                    "supported in nftables mode (as in kube-proxy)"
                )
    return warnings


def nftables_options(
    config: ProxyConfig,
    node: NodeInfo,
    family: IPFamily,
    *,
    node_addresses: Sequence[str] = (),
    service_cidrs: Sequence[str] = (),
) -> NftablesOptions:
    """Compiler options for an nftables ruleset of ``family`` on ``node``.

    As in kube-proxy's nftables mode, an empty ``--nodeport-addresses`` means the node's
    primary IP (``primary``), not every local address. ``service_cidrs`` may mix families;
    only this family's are kept.
    """
    if not config.nodeport_addresses:  # nftables mode's default
        config = config.with_overrides(nodeport_addresses=(PRIMARY,))
    node_ips = primary_node_ips(config, node, family)
    cidrs: list[str] = []
    for text in service_cidrs:
        parsed = canonical_cidr(text)
        if parsed is None:
            raise ConfigError(f"--service-cidr: invalid CIDR {text!r}")
        if parsed[1] == family:
            cidrs.append(parsed[0])
    return NftablesOptions(
        family=family,
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local=_local_match(config, node, family),
        node_ip=node_ips[0] if node_ips else "",
        nodeport_addresses=nodeport_addresses(config, node, family, node_addresses or node_ips),
        service_cidrs=tuple(cidrs),
        conntrack_tcp_be_liberal=config.conntrack_tcp_be_liberal,
    )


def ipvs_options(
    config: ProxyConfig,
    node: NodeInfo,
    family: IPFamily,
    *,
    node_addresses: Sequence[str] = (),
    random_fully: bool = True,
) -> IpvsOptions:
    """Compiler options for an IPVS plan of ``family`` on ``node``.

    ``node_addresses`` are the node's addresses (the host's interface addresses other than
    ``kube-ipvs0`` when running; the Node's addresses or ``--node-addresses`` when rendering
    offline): as in kube-proxy's IPVS mode an empty ``--nodeport-addresses`` means a
    NodePort virtual server on each of them, and external IPs that are node addresses are
    not bound to ``kube-ipvs0``.
    """
    base = iptables_options(
        config, node, family, node_addresses=node_addresses, random_fully=random_fully
    )
    node_ips = primary_node_ips(config, node, family)
    own: list[str] = []
    for text in node_addresses or node_ips or node.addresses_of(family):
        parsed = canonical_ip(text)
        if parsed is not None and parsed[1] == family and parsed[0] not in own:
            own.append(parsed[0])
    excluded: list[str] = []
    for text in config.ipvs_exclude_cidrs:
        parsed = canonical_cidr(text)
        if parsed is None:
            raise ConfigError(f"--ipvs-exclude-cidrs: invalid CIDR {text!r}")
        if parsed[1] == family:
            excluded.append(parsed[0])
    return IpvsOptions(
        family=family,
        scheduler=config.ipvs_scheduler or DEFAULT_SCHEDULER,
        masquerade_bit=config.masquerade_bit,
        masquerade_all=config.masquerade_all,
        local_detector=base.local_detector,
        node_ip=base.node_ip,
        nodeport_addresses=base.nodeport_addresses,
        node_addresses=tuple(own),
        random_fully=random_fully,
        exclude_cidrs=tuple(excluded),
        strict_arp=config.ipvs_strict_arp,
        tcp_timeout=config.ipvs_tcp_timeout,
        tcp_fin_timeout=config.ipvs_tcp_fin_timeout,
        udp_timeout=config.ipvs_udp_timeout,
    )


def _local_match(config: ProxyConfig, node: NodeInfo, family: IPFamily) -> LocalMatch | None:
    mode = _detect_mode(config.detect_local_mode)
    if mode in ("ClusterCIDR", "NodeCIDR"):
        cidrs = split_list(config.cluster_cidr) if mode == "ClusterCIDR" else node.pod_cidrs
        for text in cidrs:
            parsed = canonical_cidr(text)
            if parsed is None:
                raise ConfigError(f"invalid CIDR {text!r} for --detect-local-mode={mode}")
            if parsed[1] == family:
                return LocalMatch("saddr", parsed[0], f"{mode}: pod traffic is from {parsed[0]}")
        return None
    if mode == "BridgeInterface":
        if not config.bridge_interface:
            raise ConfigError("--detect-local-mode=BridgeInterface needs --pod-bridge-interface")
        name = config.bridge_interface
        return LocalMatch("iifname", name, f"BridgeInterface: pod traffic enters via {name}")
    prefix = config.interface_name_prefix
    if not prefix:
        raise ConfigError(
            "--detect-local-mode=InterfaceNamePrefix needs --pod-interface-name-prefix"
        )
    return LocalMatch(
        "iifname", f"{prefix}*", f"InterfaceNamePrefix: pod traffic enters via {prefix}*"
    )


def _detect_mode(mode: str) -> DetectLocalMode:
    if mode not in ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"):
        raise ConfigError(f"--detect-local-mode: unknown mode {mode!r}")
    return mode  # type: ignore[return-value]
