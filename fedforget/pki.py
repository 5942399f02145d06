"""A small certificate authority for TLS on loopback and in deployments.

The withdrawal service (and, in a deployment, the SuperLink) speaks TLS only;
this makes the CA and server certificates they need, with private keys that
are never world-readable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedforget.files import write_bytes_atomic

VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class ServerTLS:
    """Paths of a server's TLS material and of the CA that clients trust."""

    ca_certificate: Path
    certificate: Path
    private_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_server_tls(directory: Path, hosts: list[str], *, ca_name: str = "fedforget CA") -> ServerTLS:
    """A fresh CA and a server certificate for ``hosts`` (DNS names or IP addresses) in ``directory``."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    tls = ServerTLS(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    write_bytes_atomic(tls.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", ca_key)
    write_bytes_atomic(tls.certificate, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(tls.private_key, server_key)
    return tls
