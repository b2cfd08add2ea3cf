"""kube-proxy's iptables chain names: a prefix plus 16 base32 characters of a SHA-256 hash.

``KUBE-SVC-``/``KUBE-SVL-``/``KUBE-EXT-``/``KUBE-FW-`` hash ``str(ServicePortName)`` followed by
the lower-cased protocol; ``KUBE-SEP-`` also appends the endpoint's ``ip:port``. So
``default/kubernetes:https`` + ``tcp`` is ``KUBE-SVC-NPX46M4PTMTKRN6Y``, as on any cluster.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, NamedTuple

from minikproxy.model.names import ServicePortName

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_FIREWALL = "KUBE-FIREWALL"  # kubelet's; we fill it only for localhost NodePorts
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# 10 bits -> 2 base32 characters; 16 characters are the first 80 bits of the digest.
_B32_PAIRS = tuple(_B32[i >> 5] + _B32[i & 31] for i in range(1024))


def hash8(text: str, _sha256: Any = hashlib.sha256, _pairs: tuple[str, ...] = _B32_PAIRS) -> str:
    """The first 8 characters of base32(sha256(text)): kube-proxy's nftables chain hash.

    Equal to ``base64.b32encode(digest)[:8]`` (40 bits through the pair table, as
    :func:`_hash16`), without base64's pure-Python loop over all 32 bytes.
    """
    n = int.from_bytes(_sha256(text.encode()).digest()[:5], "big")
    return _pairs[n >> 30] + _pairs[(n >> 20) & 1023] + _pairs[(n >> 10) & 1023] + _pairs[n & 1023]


def _hash16(text: str, _sha256: Any = hashlib.sha256, _pairs: tuple[str, ...] = _B32_PAIRS) -> str:
    """The first 16 characters of base32(sha256(text)) (standard alphabet).

    Equal to ``base64.b32encode(digest)[:16]``, which is pure Python before 3.13 and ~20x
    slower: chain names are hashed for every endpoint, so this is on the hot path. The 80
    bits are turned into 8 pairs of characters through a 1024-entry table, unrolled (half
    the cost of a loop).
    """
    n = int.from_bytes(_sha256(text.encode()).digest()[:10], "big")
    return (
        _pairs[n >> 70]
        + _pairs[(n >> 60) & 1023]
        + _pairs[(n >> 50) & 1023]
        + _pairs[(n >> 40) & 1023]
        + _pairs[(n >> 30) & 1023]
        + _pairs[(n >> 20) & 1023]
        + _pairs[(n >> 10) & 1023]
        + _pairs[n & 1023]
    )


class ServiceChains(NamedTuple):
    """The per-service-port chain names."""

    cluster: str  # KUBE-SVC-: endpoints for Cluster policy
    local: str  # KUBE-SVL-: endpoints for Local policy
    external: str  # KUBE-EXT-: entry for NodePort / external IP / LB traffic
    firewall: str  # KUBE-FW-: loadBalancerSourceRanges


@lru_cache(maxsize=1 << 16)
def service_chains(name: ServicePortName) -> ServiceChains:
    """The SVC/SVL/EXT/FW chain names of a service port."""
    h = _hash16(f"{name}{name.protocol.lower()}")
    return ServiceChains(f"KUBE-SVC-{h}", f"KUBE-SVL-{h}", f"KUBE-EXT-{h}", f"KUBE-FW-{h}")


def endpoint_chain(name: ServicePortName, address: str) -> str:
    """The KUBE-SEP- chain name of one endpoint (``address`` is ``ip:port``/``[ip]:port``)."""
    return endpoint_chain_for_key(f"{name}{name.protocol.lower()}", address)


# Sized for 30k Services x 10 endpoints plus churn: a smaller cache thrashes at that scale.
@lru_cache(maxsize=1 << 19)
def endpoint_chain_for_key(key: str, address: str) -> str:
    """``endpoint_chain`` given ``key`` = ``str(name) + protocol.lower()`` (hot-path form)."""
    return f"KUBE-SEP-{_hash16(key + address)}"


def is_service_chain(chain: str) -> bool:
    """True for per-service chains minikproxy (and kube-proxy) own and may delete."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)
