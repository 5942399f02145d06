"""``fedforget withdraw``, ``fedforget withdrawal-service`` and ``fedforget enroll``.

``withdraw_app`` is a sub-application (``fedforget withdraw request|status``);
``serve_command`` and ``enroll_command`` are plain commands for the main
application. Heavy imports (grpc, the server package) happen inside the
commands so ``--help`` and bad input stay fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail

if TYPE_CHECKING:
    from fedforget.client.withdraw import WithdrawalError

__all__ = ["enroll_command", "serve_command", "withdraw_app"]

withdraw_app = typer.Typer(
    help="Withdraw your organisation's consent: one signed request to the federation's withdrawal service.",
    invoke_without_command=True,
)

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):\d{1,5}$")
_UNREACHABLE = {"UNAVAILABLE", "TIMEOUT", "BUSY", "INTERNAL"}


def _withdrawal_exit(exc: WithdrawalError) -> ExitCode:
    """Unreachable service: 4; our own CA or key file unusable: 3; the service said no: 1."""
    if exc.code in _UNREACHABLE:
        return ExitCode.UNAVAILABLE
    if exc.code == "BAD_INPUT":
        return ExitCode.BAD_FILE
    return ExitCode.CHECK_FAILED


@withdraw_app.callback()
def withdraw_callback(
    ctx: typer.Context,
    server: Annotated[Optional[str], typer.Option(help="The withdrawal service, HOST:PORT.")] = None,
    ca: Annotated[Optional[Path], typer.Option(help="PEM CA certificate that signed the service's TLS certificate.")] = None,
    key: Annotated[Optional[Path], typer.Option(help="Your organisation's OpenSSH private key (the SuperNode's key).")] = None,
    client: Annotated[Optional[str], typer.Option(help="Your client id, as enrolled with the federation.")] = None,
    federation: Annotated[Optional[str], typer.Option(help="The federation id you withdraw from.")] = None,
    reason: Annotated[str, typer.Option(help="Why you withdraw (stored with the request).")] = "",
) -> None:
    """Withdraw consent (``fedforget withdraw --server ... --client ...``), or follow a request (``status``)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{name}" for name, value in
               (("server", server), ("ca", ca), ("key", key), ("client", client), ("federation", federation))
               if value is None]
    if missing:
        if len(missing) == 5:
            typer.echo(ctx.get_help())
            raise typer.Exit(code=0)
        fail(f"withdrawing needs {', '.join(missing)}", ExitCode.USAGE)
    request_command(server, ca, key, client, federation, reason)  # type: ignore[arg-type]


@withdraw_app.command("request")
def request_command(
    server: Annotated[str, typer.Option(help="The withdrawal service, HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="PEM CA certificate that signed the service's TLS certificate.")],
    key: Annotated[Path, typer.Option(help="Your organisation's OpenSSH private key (the SuperNode's key).")],
    client: Annotated[str, typer.Option(help="Your client id, as enrolled with the federation.")],
    federation: Annotated[str, typer.Option(help="The federation id you withdraw from.")],
    reason: Annotated[str, typer.Option(help="Why you withdraw (stored with the request).")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each attempt.")] = 10.0,
) -> None:
    """Withdraw consent: sign a request, send it over TLS, print the request id."""
    from fedforget.client.withdraw import WithdrawalClient, WithdrawalError, build_request
    from fedforget.identity import IdentityError, load_private_key

    try:
        signed = build_request(load_private_key(key), client, federation, reason)
        with WithdrawalClient(server, ca, timeout=timeout) as service:
            reply = service.submit(signed)
    except WithdrawalError as exc:
        fail(str(exc), _withdrawal_exit(exc))
    except IdentityError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    typer.echo(reply.request_id)
    follow = f"fedforget withdraw status {reply.request_id} --server {escape(server)} --ca {escape(str(ca))}"
    if reply.status == "already-withdrawn":
        console(stderr=True).print(
            f"{escape(client)} was already unlearned from {escape(federation)}: nothing more will be done. "
            f"Its original certificate is named by: {follow}"
        )
    else:
        console(stderr=True).print(
            f"withdrawal of {escape(client)} from {escape(federation)} accepted. Follow it with: {follow}"
        )


@withdraw_app.command("status")
def status_command(
    request_ids: Annotated[list[str], typer.Argument(help="Request ids printed by 'fedforget withdraw request'.")],
    server: Annotated[str, typer.Option(help="The withdrawal service, HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="PEM CA certificate that signed the service's TLS certificate.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the answers as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
) -> None:
    """Show where withdrawal requests stand: received, unlearning, done (with certificate) or failed."""
    from fedforget.client.withdraw import WithdrawalError, query_status

    try:
        answers = query_status(server, ca, request_ids, timeout=timeout)
    except WithdrawalError as exc:
        fail(str(exc), _withdrawal_exit(exc))
    if as_json:
        typer.echo(json.dumps(answers, indent=2))
    else:
        out = console()
        for answer in answers:
            if not answer["found"]:
                out.print(f"{escape(answer['request_id'])}  [red]unknown[/]")
                continue
            detail = answer["certificate"] or answer["reason"] or ""
            out.print(
                f"{escape(answer['request_id'])}  [bold]{answer['status']}[/]  client {escape(answer['client_id'])}  "
                f"received {answer['received_at']}  updated {answer['updated_at']}"
                + (f"  {escape(detail)}" if detail else "")
            )
    unknown = [a["request_id"] for a in answers if not a["found"]]
    if unknown:
        fail(f"the service knows no request with id {', '.join(unknown)}", ExitCode.CHECK_FAILED)


def serve_command(
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0 picks a free one).")] = "0.0.0.0:9094",
    registry: Annotated[Path, typer.Option(help="Consent registry (SQLite; created if missing).")] = Path(
        "consent.db"
    ),
    federation: Annotated[str, typer.Option(help="The federation id requests must name.")] = "",
    cert: Annotated[Optional[Path], typer.Option(help="The service's PEM TLS certificate (chain).")] = None,
    key: Annotated[Optional[Path], typer.Option(help="The service's PEM TLS private key.")] = None,
    skew: Annotated[float, typer.Option(help="Allowed clock difference for request timestamps, seconds.")] = 300.0,
) -> None:
    """Run the withdrawal service (TLS only) beside the SuperLink, until Ctrl-C or SIGTERM."""
    if not _ADDRESS.match(address):
        fail(f"--address {address!r} must be HOST:PORT (PORT 0 picks a free one)", ExitCode.USAGE)
    if not federation:
        fail("give the federation id with --federation", ExitCode.USAGE)
    if cert is None or key is None:
        fail("the withdrawal service only runs over TLS: give --cert and --key", ExitCode.USAGE)
    if skew <= 0:
        fail(f"--skew must be positive, got {skew}", ExitCode.USAGE)
    from fedforget.server.withdrawal.registry import ConsentRegistryError
    from fedforget.server.withdrawal.service import WithdrawalServiceError, main

    try:
        main(
            address,
            registry_path=registry,
            federation_id=federation,
            cert=cert,  # type: ignore[arg-type]
            key=key,  # type: ignore[arg-type]
            skew=skew,
            announce=typer.echo,
        )
    except (ConsentRegistryError, WithdrawalServiceError) as exc:  # a certificate, key, registry or address
        fail(str(exc), ExitCode.BAD_FILE)


def enroll_command(
    name: Annotated[str, typer.Argument(help="The client id the organisation will use.")],
    public_key: Annotated[Path, typer.Argument(help="The organisation's OpenSSH public key file (KEY.pub).")],
    registry: Annotated[Path, typer.Option(help="Consent registry (SQLite; created if missing).")] = Path(
        "consent.db"
    ),
    replace: Annotated[bool, typer.Option(help="Replace the key of an already enrolled client.")] = False,
) -> None:
    """Enrol a client with its public key so the withdrawal service accepts its signed requests."""
    from fedforget.identity import IdentityError, fingerprint, load_public_key, public_key_openssh
    from fedforget.server.withdrawal.registry import ConsentRegistry, ConsentRegistryError, EnrollmentConflictError

    try:
        key = load_public_key(public_key)
        with ConsentRegistry.open(registry) as consent:
            changed = consent.enroll(name, public_key_openssh(key), replace=replace)
    except EnrollmentConflictError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (IdentityError, ConsentRegistryError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    what = "enrolled" if changed else "already enrolled with this key:"
    typer.echo(f"{what} {name} ({fingerprint(key)}) in {registry}")
