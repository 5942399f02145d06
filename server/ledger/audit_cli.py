"""``fedforget audit``: check the ledger's hash chain, and which model versions hold a client's data.

Registered by ``fedforget/cli.py`` as ``app.add_typer(audit_app, name="audit")``.
Errors print ``error: ...`` on stderr and exit with status 2, like every other
fedforget command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedforget.errors import FedforgetError
from fedforget.server.ledger.log import ClientAudit, Ledger

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Audit the ledger: verify its hash chain, and which model versions contain a client's data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)

LedgerOption = Annotated[Path, typer.Option("--ledger", help="The ledger file (JSON lines).")]


def _fail(message: str) -> None:
    _err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _parse_anchor(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text.strip())
    if match is None:
        raise ValueError(f"--anchor must be COUNT:HASH as printed by an earlier verify (COUNT:64 hex digits), got {text!r}")
    return int(match.group(1)), match.group(2)


@audit_app.command("verify")
def verify(
    ledger: LedgerOption,
    store: Annotated[
        Optional[Path],
        typer.Option(
            "--store",
            help="Also check every round's and unlearning's model hash against this history store "
            "(opened like any store: not while a server is using it).",
        ),
    ] = None,
    anchor: Annotated[
        Optional[str],
        typer.Option(
            "--anchor",
            help="COUNT:HASH from an earlier verify: also detect entries removed from the ledger's end.",
        ),
    ] = None,
) -> None:
    """Check the ledger's hash chain; name the first broken entry if there is one."""
    try:
        expected = None if anchor is None else _parse_anchor(anchor)
        with Ledger.open(ledger, readonly=True) as led:
            count, head = led.head(anchor=expected)
            checked = None
            if store is not None:
                from fedforget.server.store.history_store import HistoryStore

                with HistoryStore.open(store) as history:
                    checked = led.verify_against_store(history)
    except (FedforgetError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    line = f"OK: {count} entries, hash chain intact; head {count}:{head}"
    if checked is not None:
        line += f"; {checked} model hashes match the history store {store}"
    typer.echo(line)


def _ranges(versions: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    if not versions:
        return "-"
    parts, start, prev = [], versions[0], versions[0]
    for v in versions[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def _print_audit(audit: ClientAudit, console: Console) -> None:
    trajectories = sorted({t for t, _ in audit.contained} | {t for t, _ in audit.not_contained})
    if not audit.participated and not audit.removed_by and not audit.withdrawal_requests:
        console.print(f"client {escape(repr(audit.client))} appears in no entry of the ledger.", highlight=False)
    table = Table(title=f"Model versions and client {escape(repr(audit.client))}", title_justify="left")
    table.add_column("trajectory", justify="right")
    table.add_column("contain its data")
    table.add_column("do not")
    table.add_column("why")
    removals = {entry["trajectory"]: entry for entry in audit.removed_by}
    for traj in trajectories:
        inside = [v for t, v in audit.contained if t == traj]
        outside = [v for t, v in audit.not_contained if t == traj]
        rounds = [r for t, r in audit.participated if t == traj]
        why = []
        if rounds:
            why.append(f"took part in rounds {_ranges(rounds)}")
        if traj in removals:
            entry = removals[traj]
            base = entry.get("base_version")
            why.append(
                f"removed by unlearning entry {entry['index']} ({entry['strategy']}) before round {entry['round']}, "
                f"forked from trajectory {entry['source_trajectory']}" + ("" if base is None else f" at version {base}")
            )
        table.add_row(str(traj), _ranges(inside), _ranges(outside), escape("; ".join(why)))
    if trajectories:
        console.print(table)
    for entry in audit.withdrawal_requests:
        console.print(
            escape(f"withdrawal request {entry['request_id']!r} recorded in entry {entry['index']} at {entry['timestamp']}"),
            highlight=False,
        )
    for entry in audit.keys_destroyed:
        console.print(
            escape(f"data key destroyed: entry {entry['index']} ({entry['kind']}) at {entry['timestamp']}"), highlight=False
        )
    if audit.clean_versions:
        clean = ", ".join(f"trajectory {t} from version {v}" for t, v in audit.clean_versions)
        console.print(f"produced without the client: {clean}", highlight=False)


@audit_app.command("client")
def client(
    name: Annotated[str, typer.Argument(help="The client id, as the ledger records it.")],
    ledger: LedgerOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON instead of a table.")] = False,
) -> None:
    """List which model versions contain NAME's contribution, and which no longer do."""
    try:
        with Ledger.open(ledger, readonly=True) as led:
            audit = led.client_history(name)
    except (FedforgetError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps(audit.to_dict(), indent=2))
    else:
        _print_audit(audit, Console())


@audit_app.command("repair")
def repair(ledger: LedgerOption) -> None:
    """Drop an incomplete last line left by a crash mid-append, and record the repair in the ledger.

    Any other damage is refused: it is reported, never rewritten.
    """
    try:
        entry = Ledger.repair(ledger)
    except (FedforgetError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    if entry is None:
        typer.echo(f"nothing to repair: {ledger} ends with a complete entry")
    else:
        typer.echo(
            f"dropped an incomplete last line of {entry.body['dropped_bytes']} bytes; "
            f"recorded as entry {entry.index} (ledger-repair)"
        )
