"""Options for the nftables compilers, resolved from configuration and the Node."""

from __future__ import annotations

import pytest

from minikproxy.compile.nftables_options import LocalMatch
from minikproxy.config import ConfigError, ProxyConfig
from minikproxy.model.parse import NodeInfo
from minikproxy.nodeopts import nftables_options

NODE = NodeInfo("node-a", addresses=("10.0.0.5", "fd00::5"), pod_cidrs=("10.244.1.0/24",))


def test_nodeports_default_to_the_primary_ip_as_in_kube_proxys_nftables_mode() -> None:
    options = nftables_options(ProxyConfig(), NODE, "IPv4")
    assert options.nodeport_addresses == ("10.0.0.5",)
    assert nftables_options(ProxyConfig(), NODE, "IPv6").nodeport_addresses == ("fd00::5",)


def test_service_cidrs_are_kept_per_family() -> None:
    cidrs = ["10.96.0.0/16", "fd00:96::/112"]
    assert nftables_options(ProxyConfig(), NODE, "IPv4", service_cidrs=cidrs).service_cidrs == (
        "10.96.0.0/16",
    )
    assert nftables_options(ProxyConfig(), NODE, "IPv6", service_cidrs=cidrs).nft_family == "ip6"
    with pytest.raises(ConfigError, match="--service-cidr"):
        nftables_options(ProxyConfig(), NODE, "IPv4", service_cidrs=["10.96.0.0/33"])


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (ProxyConfig(cluster_cidr="10.244.0.0/16"), LocalMatch("saddr", "10.244.0.0/16")),
        (ProxyConfig(detect_local_mode="NodeCIDR"), LocalMatch("saddr", "10.244.1.0/24")),
        (
            ProxyConfig(detect_local_mode="BridgeInterface", bridge_interface="cbr0"),
            LocalMatch("iifname", "cbr0"),
        ),
        (
            ProxyConfig(detect_local_mode="InterfaceNamePrefix", interface_name_prefix="veth"),
            LocalMatch("iifname", "veth*"),
        ),
    ],
)
def test_local_traffic_match(config: ProxyConfig, expected: LocalMatch) -> None:
    local = nftables_options(config, NODE, "IPv4").local
    assert local is not None
    assert (local.kind, local.value) == (expected.kind, expected.value)


def test_no_local_match_without_a_cidr_of_the_family() -> None:
    config = ProxyConfig(cluster_cidr="10.244.0.0/16")
    assert nftables_options(config, NODE, "IPv6").local is None
