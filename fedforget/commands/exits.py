"""Exit codes of the ``fedforget`` command, and the one way a command fails.

Each code means one thing, so a script can tell a wrong command line from a
certificate that does not verify or a dataset that is not installed. The
README's "Exit codes" table documents the same values.
"""

from __future__ import annotations

import traceback
from enum import IntEnum
from typing import NoReturn

import typer
from rich.markup import escape

from fedforget.commands.consoles import console


class ExitCode(IntEnum):
    """What a ``fedforget`` process's exit status says."""

    OK = 0
    CHECK_FAILED = 1
    """The command worked and the answer is no: an invalid certificate, a tampered ledger,
    a request the service refused or does not know."""
    USAGE = 2
    """The command line is wrong (an unknown option or value, a setting out of range); nothing was done.
    Also ``simulate``'s strategy refusing a withdrawal: the training is kept for ``--resume`` with another."""
    BAD_FILE = 3
    """A file, directory or address the command was given cannot be used: missing, unreadable,
    not writable, corrupt (a broken ledger or history store included) or already in use."""
    UNAVAILABLE = 4
    """Something the command needs is not installed or not reachable: a dataset, the withdrawal
    service, the simulation engine."""
    NOT_LEARNED = 5
    """``simulate`` finished, but its model never learned (the loss diverged or accuracy stayed
    near chance); the results are written and marked as such."""
    INTERNAL = 70
    """A bug in fedforget: the traceback is printed; please report it."""
    INTERRUPTED = 130
    """Stopped with Ctrl-C."""


def fail(message: str, code: ExitCode) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=int(code))


def run(app: typer.Typer, prog_name: str, args: list[str] | None = None) -> None:
    """Run ``app`` as a console script (on ``args``, default ``sys.argv``); an unhandled exception is a bug and says so."""
    try:
        app(args=args, prog_name=prog_name)
    except Exception:  # noqa: BLE001 - every error fedforget expects is handled by its command
        traceback.print_exc()
        console(stderr=True).print(
            "[bold red]internal error:[/] this is a bug in fedforget; please report it with the traceback above."
        )
        raise SystemExit(int(ExitCode.INTERNAL)) from None
