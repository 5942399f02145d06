"""The ``fedforget`` command: each command group lives in :mod:`fedforget.commands`; this module routes them.

Importing it is cheap (typer, rich and the command modules, which import
torch, Flower and grpc only inside a command), so ``--help`` and bad input
answer at once. Every command exits with one of the codes in
:class:`fedforget.commands.exits.ExitCode` (the README's "Exit codes").
"""

from __future__ import annotations

import os

# gRPC's C core logs at INFO whenever Ray forks with gRPC threads running: noise to
# a user. It reads this once, when grpc is first imported, so it is set first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

import typer  # noqa: E402

from fedforget import __version__  # noqa: E402
from fedforget.commands.bench import bench_app  # noqa: E402
from fedforget.commands.client import client_app  # noqa: E402
from fedforget.commands.consoles import console  # noqa: E402
from fedforget.commands.credentials import certs_command, keys_app  # noqa: E402
from fedforget.commands.data import export_data_command  # noqa: E402
from fedforget.commands.exits import ExitCode, fail, run  # noqa: E402
from fedforget.commands.simulate import simulate_command  # noqa: E402
from fedforget.commands.unlearn import unlearn_command  # noqa: E402
from fedforget.commands.withdrawal import enroll_command, serve_command, withdraw_app  # noqa: E402
from fedforget.commands.audit import audit_app  # noqa: E402

app = typer.Typer(
    name="fedforget",
    help="Federated unlearning on Flower: record, withdraw, unlearn, prove.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate")(simulate_command)
app.add_typer(bench_app, name="bench")
app.add_typer(client_app, name="client")
app.add_typer(keys_app, name="keys", help="Organisation keys (ECDSA P-384, OpenSSH format, as Flower's node auth).")
app.add_typer(
    audit_app, name="audit",
    help="Verify the signed ledger and the history store; checkpoints; which models contain a client.",
)
app.add_typer(withdraw_app, name="withdraw", help="Withdraw consent with a signed request; follow its status.")
app.command("withdrawal-service")(serve_command)
app.command("enroll")(enroll_command)
app.command("certs")(certs_command)
app.command("export-data")(export_data_command)
app.command("unlearn")(unlearn_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedforget {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """Federated unlearning on Flower: record, withdraw, unlearn, prove."""


def main() -> None:
    """Console-script entry point."""
    run(app, prog_name="fedforget")


if __name__ == "__main__":
    sys.exit(main())
