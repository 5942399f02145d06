"""``fedforget client``: what a withdrawn client runs to check what the server says it did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail

__all__ = ["client_app"]

client_app = typer.Typer(help="What a client runs: check what the server says it did.", no_args_is_help=True)

_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@client_app.command("verify-certificate")
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

    Prints VALID or INVALID, the signer fingerprint, what the certificate attests and what it does not.
    Exit code 0 if valid, 1 if invalid, 3 if an input cannot be read.
    """
    from fedforget.client.certificate_check import CertificateCheckError, verify_certificate

    try:
        report = verify_certificate(cert, server_key)
    except CertificateCheckError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    if not report.valid:
        typer.echo(f"INVALID: {report.reason}")
        typer.echo(f"checked against server key {report.signer_fingerprint}")
        raise typer.Exit(code=int(ExitCode.CHECK_FAILED))
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


@client_app.command("verify")
def client_verify(
    model: Annotated[Path, typer.Option(help="The published model (.npz of named arrays).")],
    data: Annotated[Path, typer.Option(help="Your own training data: .npz with x and y.")],
    holdout: Annotated[Path, typer.Option(help="Data of the same kind nobody trained on: .npz with x and y.")],
    dataset: Annotated[
        Optional[str],
        typer.Option(help="Built-in architecture: digits, mnist or fashion-mnist.", show_default="none"),
    ] = None,
    model_factory: Annotated[
        Optional[str],
        typer.Option(
            help="Another architecture instead: a built-in name (resnet-small) or your package.module:function "
            "returning the nn.Module.", show_default="none"
        ),
    ] = None,
    trigger_target: Annotated[
        Optional[int],
        typer.Option(help="Your canary's target class (measures backdoor success).", show_default="no canary"),
    ] = None,
    trigger_size: Annotated[int, typer.Option(help="Your canary's square size in pixels.")] = 3,
    trigger_corner: Annotated[
        str, typer.Option(help="Your canary's corner: top-left, top-right, bottom-left or bottom-right.")
    ] = "top-left",
    output: Annotated[
        Optional[Path], typer.Option(help="Also write the figures as JSON here.", show_default="none")
    ] = None,
) -> None:
    """Check, with your own data only, whether a published model still remembers it."""
    if (dataset is None) == (model_factory is None):
        fail("give exactly one of --dataset (a built-in architecture) or --model-factory", ExitCode.USAGE)
    if trigger_corner not in _CORNERS:
        fail(f"--trigger-corner {trigger_corner!r} is not known; choose one of: {', '.join(_CORNERS)}", ExitCode.USAGE)
    for option, path in (("--model", model), ("--data", data), ("--holdout", holdout)):
        if not path.is_file():
            fail(f"{option} {path}: no such file", ExitCode.BAD_FILE)
    from fedforget.client.verify import load_examples, model_factory as factory_of, verify_published_model
    from fedforget.evidence.backdoor import Trigger

    try:
        build = factory_of(dataset or model_factory or "")
        trigger = (
            None if trigger_target is None
            else Trigger(target_class=trigger_target, size=trigger_size, corner=trigger_corner)
        )
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    try:
        figures = verify_published_model(model, build, load_examples(data), load_examples(holdout), trigger)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    out = console()
    for name, value in figures.items():
        out.print(f"{name:>22}: {'-' if value is None else f'{value:.4f}'}")
    out.print(
        "A membership AUC near 0.5 and a backdoor success rate near the natural target rate are what a "
        "model that never saw your data shows; compare with the server's retrain figures."
    )
    if output is not None:
        output.write_text(json.dumps(figures, indent=2) + "\n")
