"""kube-proxy's chain-name hashes: golden vectors and the fast base32 against the reference."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minikproxy.compile.names import _hash16, endpoint_chain, is_service_chain, service_chains
from minikproxy.model.names import ServicePortName


@pytest.mark.parametrize(
    ("namespace", "name", "port", "protocol", "chain"),
    [
        ("default", "kubernetes", "https", "TCP", "KUBE-SVC-NPX46M4PTMTKRN6Y"),
        ("kube-system", "kube-dns", "dns", "UDP", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
        ("kube-system", "kube-dns", "dns-tcp", "TCP", "KUBE-SVC-ERIFXISQEP7F7OF4"),
        ("kube-system", "kube-dns", "metrics", "TCP", "KUBE-SVC-JD5MR3NA4I4DYORP"),
    ],
)
def test_golden_service_chain_names(
    namespace: str, name: str, port: str, protocol: str, chain: str
) -> None:
    chains = service_chains(ServicePortName(namespace, name, port, protocol))  # type: ignore[arg-type]
    assert chains.cluster == chain
    suffix = chain.removeprefix("KUBE-SVC-")
    assert chains == (
        f"KUBE-SVC-{suffix}",
        f"KUBE-SVL-{suffix}",
        f"KUBE-EXT-{suffix}",
        f"KUBE-FW-{suffix}",
    )


def test_endpoint_chain_hashes_name_protocol_and_address() -> None:
    name = ServicePortName("ns4", "svc4", "p80", "TCP")
    # From kube-proxy's TestOverallIPTablesRules.
    assert endpoint_chain(name, "10.180.0.4:80") == "KUBE-SEP-UKSFD7AGPMPPLUHC"
    assert endpoint_chain(name, "10.180.0.5:80") == "KUBE-SEP-C6EBXVWJJZMIWKLZ"


@given(st.text())
def test_fast_base32_matches_the_reference(text: str) -> None:
    reference = base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()
    assert _hash16(text) == reference


def test_service_chain_prefixes() -> None:
    assert is_service_chain("KUBE-SEP-ABC") and is_service_chain("KUBE-FW-ABC")
    assert not is_service_chain("KUBE-SERVICES") and not is_service_chain("KUBE-MARK-MASQ")


def test_hash8_is_the_first_8_base32_characters_of_sha256() -> None:
    import base64
    import hashlib

    from minikproxy.compile.names import hash8

    for text in ["", "ns1/svc1/tcp/p80", "x" * 300, *map(str, range(500))]:
        digest = hashlib.sha256(text.encode()).digest()
        assert hash8(text) == base64.b32encode(digest)[:8].decode()
