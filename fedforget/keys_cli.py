"""CLI pieces for organisation keys and certificate checks.

``keys_app`` is a Typer group (``generate``); ``verify_certificate_command`` is
a plain function the main CLI registers as a command. Both follow the main
CLI's conventions: problems print "error: ..." on stderr and exit with code 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["keys_app", "verify_certificate_command"]

keys_app = typer.Typer(
    help="Organisation key pairs (ECDSA P-384, OpenSSH format): the same key authenticates a "
    "Flower SuperNode and signs withdrawal requests and certificates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


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
        str | None, typer.Option(help="Comment at the end of the public key line (default: NAME).")
    ] = None,
) -> None:
    """Create a new ECDSA P-384 key pair NAME: NAME.key (OpenSSH, mode 0600) and NAME.pub; never overwrites."""
    from fedforget.identity import IdentityError, fingerprint, generate_keypair, load_public_key

    if not _NAME.match(name):
        _fail(f"key name {name!r} must be letters, digits, '.', '_' or '-' (not starting with '.' or '-')")
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    try:
        generate_keypair(private_path, public_path, comment=name if comment is None else comment)
        print_fingerprint = fingerprint(load_public_key(public_path))
    except IdentityError as exc:
        _fail(str(exc))
    typer.echo(f"private key: {private_path} (mode 0600; keep it secret)")
    typer.echo(f"public key:  {public_path}")
    typer.echo(f"fingerprint: {print_fingerprint}")
    typer.echo(
        f"To authenticate a SuperNode with it: flwr supernode register {public_path} <connection> --name {name}"
    )


def verify_certificate_command(
    cert: Annotated[Path, typer.Argument(help="The certificate JSON file to check.")],
    server_key: Path = typer.Option(
        ...,
        "--server-key",
        help="The federation server's public key (OpenSSH .pub file), obtained from the federation "
        "independently of the certificate.",
    ),
) -> None:
    """Check the unlearning certificate CERT (JSON) offline against the server's public key.

    Prints VALID or INVALID, the signer fingerprint, what the certificate attests and what it does not. Exit code 0 if valid, 1 if invalid, 2 if an input cannot be read.
    """
    from fedforget.client.certificate_check import CertificateCheckError, verify_certificate

    try:
        report = verify_certificate(cert, server_key)
    except CertificateCheckError as exc:
        _fail(str(exc))
    if not report.valid:
        typer.echo(f"INVALID: {report.reason}")
        typer.echo(f"checked against server key {report.signer_fingerprint}")
        raise typer.Exit(code=1)
    summary = report.summary
    typer.echo("VALID")
    typer.echo(f"signer: {report.signer_fingerprint}")
    typer.echo(f"federation: {summary.get('federation_id')}  issued: {summary.get('issued_at')}")
    typer.echo("attests:")
    for statement in report.attests:
        typer.echo(f"  - {statement}")
    typer.echo("does not attest:")
    for statement in report.does_not_attest:
        typer.echo(f"  - {statement}")
