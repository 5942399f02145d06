"""``fedforget unlearn``: act on a client's withdrawal request, or erase a client on the operator's word."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail
from fedforget.server.state_dir import StateDir
from fedforget.strategy_options import with_strategy_options

__all__ = ["unlearn_command"]

SIMULATION_SIGNING_KEY = Path("keys") / "server.key"
"""Where ``fedforget simulate`` keeps the federation's signing key, under its output directory."""


@with_strategy_options
def unlearn_command(
    client: Annotated[str, typer.Option(help="The client to unlearn (its id in the history).")],
    state: Annotated[
        Optional[Path],
        typer.Option(help="A federation's state directory: act on the client's accepted withdrawal request."),
    ] = None,
    store: Annotated[
        Optional[Path],
        typer.Option(help="Any history store: erase the client on the operator's word (needs --reason)."),
    ] = None,
    reason: Annotated[Optional[str], typer.Option(help="Why the operator erases the client (with --store).")] = None,
    strategy: Annotated[
        str,
        typer.Option(help="A strategy that needs no client work: fedrecovery, or subtract with --recovery-rounds 0."),
    ] = "fedrecovery",
    signing_key: Annotated[
        Optional[Path],
        typer.Option(
            help="The federation's signing key (deployment: federation.key). Default: DIR/keys/server.key, "
            "DIR being the state directory (or the store's parent), if it exists."
        ),
    ] = None,
    strategy_settings: dict[str, object] | None = None,
) -> None:
    """Unlearn a client now, while no run is active (strategies without client work).

    With --state, act on the client's own signed withdrawal request. With
    --store and --reason, erase the client on the operator's word: no request
    is needed, and the ledger and certificate record it as operator-initiated.
    """
    from fedforget.errors import FedforgetError
    from fedforget.server.unlearning.coordinator import UnlearningError
    from fedforget.server.unlearning.offline import OfflineUnlearningError, erase, unlearn_requested
    from fedforget.strategies.registry import StrategyChoice
    from fedforget.strategies.settings import SettingsError

    if (state is None) == (store is None):
        fail("give --state (a client's withdrawal request) or --store with --reason (an operator's erasure)", ExitCode.USAGE)
    if store is not None and reason is None:
        fail("--store erases a client on the operator's word: say why with --reason \"...\"", ExitCode.USAGE)
    if state is not None and reason is not None:
        fail("--reason goes with --store: a client's request carries its own reason", ExitCode.USAGE)
    root = state if state is not None else Path(store).resolve().parent  # type: ignore[arg-type]
    key = signing_key
    if key is None and (root / SIMULATION_SIGNING_KEY).is_file():
        key = root / SIMULATION_SIGNING_KEY
    try:
        choice = StrategyChoice(strategy, dict(strategy_settings or {}))
        if state is not None:
            if key is None:
                fail(
                    f"give the federation's signing key with --signing-key (none at {root / SIMULATION_SIGNING_KEY})",
                    ExitCode.USAGE,
                )
            event = unlearn_requested(state=StateDir(state), client=client, strategy=choice, signing_key=key)
            origin = "at its request"
        else:
            event = erase(store_dir=store, client=client, strategy=choice, reason=reason or "", signing_key=key)
            origin = "on the operator's word (operator-initiated)"
    except (OfflineUnlearningError, UnlearningError, SettingsError, ValueError) as exc:  # a strategy, client or input that cannot be used so
        fail(str(exc), ExitCode.USAGE)
    except FedforgetError as exc:  # a broken store, ledger or key
        fail(str(exc), ExitCode.BAD_FILE)
    certificate = dict(event.get("certificates", {})).get(client)
    proof = f"certificate: {certificate}" if certificate else "no signing key: no ledger entry and no certificate"
    console().print(
        f"client {client} unlearned {origin} by {event['strategy']} in {float(event['seconds']):.2f} s; "
        f"data key destroyed; {proof}"
    )
