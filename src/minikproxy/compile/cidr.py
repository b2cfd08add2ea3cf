"""Address checks the compilers share."""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=4096)
def cidr_contains(cidr: str, ip: str) -> bool:
    """Whether ``ip`` is in ``cidr`` (host bits allowed); False when either does not parse."""
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
