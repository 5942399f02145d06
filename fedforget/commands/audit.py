"""``fedforget audit``: verify the ledger and the history store, save checkpoints, and ask which models hold a client.

Registered by ``fedforget/cli.py`` as ``app.add_typer(audit_app, name="audit")``.
Exit codes (``fedforget.commands.exits``): 0 when the check passed, 1 when it
found a problem (tampering, a rewritten or truncated ledger, a store that
disagrees with it), 2 for a wrong command line, 3 for a key or file to check
with that cannot be read.
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

from fedforget.commands.exits import ExitCode, fail

from fedforget.errors import FedforgetError
from fedforget.server.ledger.entries import LedgerBrokenError
from fedforget.server.ledger.log import Ledger
from fedforget.server.ledger.queries import ClientAudit, client_history
from fedforget.server.state_dir import StateDir
from fedforget.sharding import SHARDS_FILE, ClientInNoShardError, ShardingError, load_assignment, shard_dir

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="Audit the ledger and the history store: signed heads, consistency, which models contain a client.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

LedgerOption = Annotated[Path, typer.Option("--ledger", help="The ledger file (JSON lines).")]
ServerKeyOption = Annotated[
    Path,
    typer.Option(
        "--server-key",
        help="The federation's public signing key (OpenSSH .pub), obtained independently of the files checked.",
    ),
]


def _parse_anchor(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text.strip())
    if match is None:
        raise ValueError(f"--anchor must be COUNT:HASH as printed by an earlier verify (COUNT:64 hex digits), got {text!r}")
    return int(match.group(1)), match.group(2)


def _public_key(path: Path):  # type: ignore[no-untyped-def]
    from fedforget.identity import IdentityError, load_public_key

    try:
        return load_public_key(path)
    except IdentityError as exc:
        fail(f"cannot use the federation's public key: {exc}", ExitCode.BAD_FILE)


@audit_app.command("verify")
def verify(
    ledger: LedgerOption,
    server_key: ServerKeyOption,
    store: Annotated[
        Optional[Path],
        typer.Option("--store", help="Also check the history store against the ledger, both ways (read-only, no lock)."),
    ] = None,
    key_file: Annotated[
        Optional[Path], typer.Option("--key-file", help="The store's federation key, if not where store.json says.")
    ] = None,
    checkpoint: Annotated[
        Optional[list[Path]],
        typer.Option("--checkpoint", help="A head saved by `fedforget audit checkpoint`: the ledger must extend it (repeatable)."),
    ] = None,
    certificate: Annotated[
        Optional[list[Path]],
        typer.Option("--certificate", help="An unlearning certificate: valid, and the ledger must extend its head (repeatable)."),
    ] = None,
    anchor: Annotated[
        Optional[str],
        typer.Option("--anchor", help="COUNT:HASH from an earlier verify: the ledger must still hold those entries."),
    ] = None,
) -> None:
    """Check the ledger's chain and signed heads, heads held elsewhere, and (with --store) the whole history.

    Prints every problem found, with where it is; exit code 1 if there is one. Changes no file.
    """
    from fedforget.server.ledger.audit import audit

    key = _public_key(server_key)
    try:
        expected = None if anchor is None else _parse_anchor(anchor)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    if not ledger.is_file():
        fail(f"no ledger at {ledger}", ExitCode.BAD_FILE)
    for path in [*(checkpoint or []), *(certificate or [])]:
        if not path.is_file():
            fail(f"no file at {path}", ExitCode.BAD_FILE)
    if store is not None and not store.is_dir():
        fail(f"no history store at {store} (not a directory)", ExitCode.BAD_FILE)
    report = audit(
        ledger, key, store=store, key_file=key_file, checkpoints=checkpoint or [], certificates=certificate or [],
        anchor=expected,
    )  # fmt: skip
    for finding in report.findings.items:
        typer.echo(str(finding))
    if not report.ok:
        typer.echo(f"FAILED: {len(report.findings.errors)} problem(s) found in {ledger}" + (f" and {store}" if store else ""))
        raise typer.Exit(code=int(ExitCode.CHECK_FAILED))
    head = report.head.head if report.head else None
    line = f"OK: {report.entries} entries, hash chain intact"
    if head is not None:
        line += f"; head {report.entries}:{head.last_entry_hash}; Merkle root {head.root_hash}, signed by {head.signer}"
    if checkpoint or certificate:
        line += f"; extends {len(checkpoint or []) + len(certificate or [])} head(s) held elsewhere"
    if store is not None:
        line += f"; the history store {store} agrees with the ledger"
    typer.echo(line)


@audit_app.command("checkpoint")
def checkpoint_command(
    ledger: LedgerOption,
    server_key: ServerKeyOption,
    out: Annotated[Path, typer.Option("--out", help="Where to save the checkpoint (JSON).")],
) -> None:
    """Save the ledger's current signed head to OUT, after checking the ledger: keep it somewhere else.

    Whoever holds it can later run `fedforget audit verify --checkpoint OUT` to
    show that the ledger still contains exactly those entries.
    """
    from fedforget.server.ledger.audit import audit
    from fedforget.server.ledger.heads import write_checkpoint

    key = _public_key(server_key)
    if not ledger.is_file():
        fail(f"no ledger at {ledger}", ExitCode.BAD_FILE)
    report = audit(ledger, key)
    for finding in report.findings.items:
        typer.echo(str(finding))
    if not report.ok or report.head is None:
        fail(f"the ledger {ledger} does not verify; no checkpoint written", ExitCode.CHECK_FAILED)
    try:
        write_checkpoint(out, report.head)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", ExitCode.BAD_FILE)
    head = report.head.head
    typer.echo(f"checkpoint of {head.tree_size} entries (root {head.root_hash}, signed {head.timestamp}) saved to {out}")


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
            shard = entry.get("shard")
            why.append(
                f"removed by unlearning entry {entry['index']} ({entry['strategy']}) before round {entry['round']}, "
                f"forked from trajectory {entry['source_trajectory']}" + ("" if base is None else f" at version {base}")
                + ("" if not isinstance(shard, dict) else f", in shard {shard.get('index')} of {shard.get('count')} only")
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


def _client_ledger(state: Path, name: str) -> tuple[Path, dict[str, object] | None]:
    """The ledger that records ``name`` in the run kept in ``state``, and, in a sharded run, its shard's scope.

    A sharded run (``state/shards.json``) keeps one ledger per shard; only the
    client's own shard ever held its contributions, so only that ledger can
    say anything about it.
    """
    assignment_file = state / SHARDS_FILE
    if not assignment_file.exists():
        return StateDir(state).ledger, None
    assignment = load_assignment(assignment_file)
    index = assignment.shard_of(name)
    return StateDir(shard_dir(state, index)).ledger, assignment.scope(index)


def _print_shard(name: str, ledger: Path, scope: dict[str, object]) -> None:
    others = int(scope["count"]) - 1  # type: ignore[call-overload]
    typer.echo(
        f"client {name!r} trains in shard {scope['index']} of {scope['count']} "
        f"(clients {', '.join(map(str, scope['clients']))}; ledger {ledger}); "  # type: ignore[call-overload]
        f"the other {others} shard(s) never received its updates."
    )


@audit_app.command("client")
def client(
    name: Annotated[str, typer.Argument(help="The client id, as the ledger records it.")],
    ledger: Annotated[
        Optional[Path], typer.Option("--ledger", help="The ledger file (JSON lines); or give --state.")
    ] = None,
    state: Annotated[
        Optional[Path],
        typer.Option(
            "--state",
            help="The run's state directory (simulate's --out, a deployment's state-dir): its ledger, or in a "
            "sharded run the ledger of the client's shard.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON instead of a table.")] = False,
) -> None:
    """List which model versions contain NAME's contribution, and which no longer do."""
    if (ledger is None) == (state is None):
        fail("give the ledger with --ledger FILE or the run's directory with --state DIR (one of them)", ExitCode.USAGE)
    scope = None
    try:
        if state is not None:
            ledger, scope = _client_ledger(state, name)
        assert ledger is not None
        with Ledger.open(ledger, readonly=True) as led:
            audit = client_history(led, name)
    except LedgerBrokenError as exc:
        fail(str(exc), ExitCode.CHECK_FAILED)
    except ClientInNoShardError as exc:
        fail(str(exc), ExitCode.USAGE)
    except ShardingError as exc:  # shards.json unreadable
        fail(str(exc), ExitCode.BAD_FILE)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (FedforgetError, OSError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    if as_json:
        typer.echo(json.dumps({**audit.to_dict(), "ledger": str(ledger), "shard": scope}, indent=2))
    else:
        if scope is not None:
            _print_shard(name, ledger, scope)
        _print_audit(audit, Console())


@audit_app.command("repair")
def repair(
    ledger: LedgerOption,
    signing_key: Annotated[
        Optional[Path],
        typer.Option("--signing-key", help="The federation's private signing key: sign a head over the repaired ledger."),
    ] = None,
) -> None:
    """Drop an incomplete last line left by a crash mid-append, and record the repair in the ledger.

    Any other damage is refused: it is reported, never rewritten. With
    --signing-key the repaired ledger gets a signed head at once (otherwise the
    server signs one when it next runs).
    """
    try:
        entry = Ledger.repair(ledger)
        if signing_key is not None:
            from fedforget.server.ledger.heads import sign_latest

            sign_latest(ledger, signing_key)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (FedforgetError, OSError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    if entry is None:
        typer.echo(f"nothing to repair: {ledger} ends with a complete entry")
    else:
        typer.echo(
            f"dropped an incomplete last line of {entry.body['dropped_bytes']} bytes; "
            f"recorded as entry {entry.index} (ledger-repair)"
        )
