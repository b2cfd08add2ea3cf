"""Test certificates made with the ``openssl`` command: a CA, and server certificates it signs.

What a cluster's API server has: a CA certificate (the service account's ``ca.crt``) and a
serving certificate naming the host clients connect to. Uses ECDSA P-256 keys (fast to make).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from tempfile import NamedTemporaryFile

__all__ = ["CertificateAuthority", "ServerCertificate", "make_ca"]

_KEY_OPTS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


@dataclass(frozen=True)
class ServerCertificate:
    """A serving certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    """A self-signed CA (PEM certificate and key) that issues server certificates."""

    cert: Path
    key: Path

    def issue(self, directory: Path, name: str, hosts: list[str]) -> ServerCertificate:
        """Sign a server certificate for ``hosts`` (DNS names or IP addresses) in ``directory``.

        The first host is also the subject's common name.
        """
        sans = []
        for host in hosts:
            try:
                ip_address(host)
                sans.append(f"IP:{host}")
            except ValueError:
                sans.append(f"DNS:{host}")
        cert, key, csr = (directory / f"{name}{ext}" for ext in (".crt", ".key", ".csr"))
        _openssl("req", "-new", *_KEY_OPTS, "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={hosts[0]}")  # fmt: skip
        with NamedTemporaryFile("w", suffix=".ext", dir=directory) as ext:
            ext.write(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "authorityKeyIdentifier=keyid\n"
                f"subjectAltName={','.join(sans)}\n"
            )
            ext.flush()
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert),
                     "-CAkey", str(self.key), "-CAcreateserial", "-days", "2",
                     "-out", str(cert), "-extfile", ext.name)  # fmt: skip
        csr.unlink()
        return ServerCertificate(cert, key)


def make_ca(directory: Path, name: str = "ca") -> CertificateAuthority:
    """Make a CA certificate and key in ``directory`` (``NAME.crt``, ``NAME.key``)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", *_KEY_OPTS, "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return CertificateAuthority(cert, key)
