"""Local-traffic detection: which packets come from pods on this node (kube-proxy's
``--detect-local-mode``). Rendered as iptables match fragments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from minikproxy.model.names import IPFamily
from minikproxy.model.parse import canonical_cidr

DetectLocalMode = Literal["ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix"]
DETECT_LOCAL_MODES: tuple[DetectLocalMode, ...] = (
    "ClusterCIDR",
    "NodeCIDR",
    "BridgeInterface",
    "InterfaceNamePrefix",
)


@dataclass(frozen=True, slots=True)
class LocalTrafficDetector:
    """Match fragments for "from a local pod" and "not from a local pod".

    An unimplemented detector (no cluster CIDR, say) has empty fragments: kube-proxy then
    neither masquerades off-cluster ClusterIP traffic nor short-circuits pod traffic to
    external IPs.
    """

    if_local: str = ""
    if_not_local: str = ""
    description: str = "no local-traffic detection"

    @property
    def implemented(self) -> bool:
        """True when the detector can tell pod traffic apart."""
        return bool(self.if_local)


NO_LOCAL_DETECTOR = LocalTrafficDetector()


def make_local_detector(
    mode: DetectLocalMode,
    family: IPFamily,
    *,
    cluster_cidrs: Sequence[str] = (),
    node_pod_cidrs: Sequence[str] = (),
    bridge_interface: str = "",
    interface_name_prefix: str = "",
) -> LocalTrafficDetector:
    """Build the detector for ``mode`` in ``family``; raise ValueError on bad input."""
    if mode in ("ClusterCIDR", "NodeCIDR"):
        cidrs = cluster_cidrs if mode == "ClusterCIDR" else node_pod_cidrs
        for text in cidrs:
            parsed = canonical_cidr(text)
            if parsed is None:
                raise ValueError(f"invalid CIDR {text!r} for --detect-local-mode={mode}")
            if parsed[1] == family:
                cidr = parsed[0]
                return LocalTrafficDetector(
                    f"-s {cidr}", f"! -s {cidr}", f"{mode}: pod traffic is from {cidr}"
                )
        return NO_LOCAL_DETECTOR
    if mode == "BridgeInterface":
        if not bridge_interface:
            raise ValueError("--detect-local-mode=BridgeInterface needs --pod-bridge-interface")
        return LocalTrafficDetector(
            f"-i {bridge_interface}",
            f"! -i {bridge_interface}",
            f"BridgeInterface: pod traffic enters via {bridge_interface}",
        )
    if mode == "InterfaceNamePrefix":
        if not interface_name_prefix:
            raise ValueError(
                "--detect-local-mode=InterfaceNamePrefix needs --pod-interface-name-prefix"
            )
        return LocalTrafficDetector(
            f"-i {interface_name_prefix}+",
            f"! -i {interface_name_prefix}+",
            f"InterfaceNamePrefix: pod traffic enters via {interface_name_prefix}*",
        )
    raise ValueError(f"unknown --detect-local-mode {mode!r}")
