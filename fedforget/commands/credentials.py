"""``fedforget certs`` and ``fedforget keys``: a federation's credentials and organisation key pairs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail

__all__ = ["certs_command", "keys_app"]

keys_app = typer.Typer(
    help="Organisation key pairs (ECDSA P-384, OpenSSH format): the same key authenticates a "
    "Flower SuperNode and signs withdrawal requests and certificates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@keys_app.callback()
def _keys() -> None:
    """Organisation key pairs: create them, show their fingerprints."""


@keys_app.command("generate")
def generate(
    name: Annotated[str, typer.Argument(help="Key name: writes NAME.key (private) and NAME.pub (public).")],
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory for the key files (created if missing).")
    ] = Path("."),
    comment: Annotated[
        Optional[str], typer.Option(help="Comment at the end of the public key line.", show_default="NAME")
    ] = None,
) -> None:
    """Create a new ECDSA P-384 key pair NAME: NAME.key (OpenSSH, mode 0600) and NAME.pub; never overwrites."""
    if not _NAME.match(name):
        fail(f"key name {name!r} must be letters, digits, '.', '_' or '-' (not starting with '.' or '-')", ExitCode.USAGE)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing:
        fail(f"{', '.join(existing)} already exists; choose another NAME or --dir (keys are never overwritten)",
             ExitCode.USAGE)
    from fedforget.identity import IdentityError, fingerprint, generate_keypair, load_public_key

    try:
        generate_keypair(private_path, public_path, comment=name if comment is None else comment)
        print_fingerprint = fingerprint(load_public_key(public_path))
    except IdentityError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    typer.echo(f"private key: {private_path} (mode 0600; keep it secret)")
    typer.echo(f"public key:  {public_path}")
    typer.echo(f"fingerprint: {print_fingerprint}")
    typer.echo(
        f"To authenticate a SuperNode with it: flwr supernode register {public_path} <connection> --name {name}"
    )


def certs_command(
    out: Annotated[Path, typer.Option(help="Directory to write the credentials into.")],
    host: Annotated[
        list[str], typer.Option(help="DNS name or IP address the server is reached at (repeatable).")
    ],
    org: Annotated[
        Optional[list[str]],
        typer.Option(help="An organisation to make a key pair for (repeatable).", show_default="none"),
    ] = None,
) -> None:
    """A CA, the server's TLS certificate, the federation's signing key and each organisation's keys."""
    from fedforget.certs import CredentialsError, make_credentials
    from fedforget.identity import IdentityError

    try:
        made = make_credentials(out, hosts=list(host), organisations=list(org or []))
    except (CredentialsError, ValueError) as exc:
        fail(str(exc), ExitCode.USAGE)
    except IdentityError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except OSError as exc:
        fail(f"cannot write the credentials into {out}: {exc.strerror or exc}", ExitCode.BAD_FILE)
    say = console().print
    say(f"CA certificate (give it to every organisation): {made.tls.ca_certificate}")
    say(f"server certificate and key (SuperLink, withdrawal service): {made.tls.certificate}, {made.tls.private_key}")
    say(f"federation signing key (certificates of unlearning): {made.federation_key}; public: {made.federation_public_key}")
    for name, (private, public) in made.organisations.items():
        say(f"organisation {name}: {private} (keep secret, 0600), {public} (register and enrol it)")
