"""Everything a federation needs to run encrypted and authenticated, in one directory.

``fedforget certs`` makes a CA and a server certificate for the SuperLink and
the withdrawal service, the federation's signing key (certificates of
unlearning), and one ECDSA P-384 key pair per organisation in the OpenSSH
format Flower's SuperNode authentication takes. Private keys are mode 0600.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedforget.errors import FedforgetError
from fedforget.identity import generate_keypair
from fedforget.pki import ServerTLS, create_server_tls

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CredentialsError(FedforgetError):
    """The credentials cannot be made as asked; nothing was overwritten."""


@dataclass(frozen=True)
class FederationCredentials:
    """Where each credential was written."""

    tls: ServerTLS
    federation_key: Path
    federation_public_key: Path
    organisations: dict[str, tuple[Path, Path]]


def make_credentials(directory: Path, *, hosts: list[str], organisations: list[str]) -> FederationCredentials:
    """Write a CA, a server certificate for ``hosts``, the federation key and each organisation's keys."""
    if not hosts:
        raise CredentialsError("give at least one --host (a DNS name or IP address the server is reached at)")
    bad = [name for name in organisations if not _NAME.match(name)]
    if bad:
        raise CredentialsError(f"organisation names must be letters, digits, '.', '_' or '-': {bad}")
    if len(set(organisations)) != len(organisations):
        raise CredentialsError("an organisation is named more than once")
    planned = [directory / n for n in ("ca.crt", "ca.key", "server.pem", "server.key", "federation.key", "federation.pub")]
    planned += [directory / "orgs" / f"{name}.{ext}" for name in organisations for ext in ("key", "pub")]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        raise CredentialsError(
            f"refusing to overwrite existing credentials: {', '.join(existing)}; choose another --out"
        )
    tls = create_server_tls(directory, hosts)
    generate_keypair(directory / "federation.key", directory / "federation.pub", comment="federation signing key")
    keys = {}
    for name in organisations:
        private, public = directory / "orgs" / f"{name}.key", directory / "orgs" / f"{name}.pub"
        generate_keypair(private, public, comment=name)
        keys[name] = (private, public)
    return FederationCredentials(tls, directory / "federation.key", directory / "federation.pub", keys)
