"""One recorded FedAvg round driven by fedforget itself, outside Flower's ``Strategy.start``.

The round loop and the unlearning strategies' replays need rounds one at a
time, with fedforget's own round numbers and work between them; this makes
the same ``configure_train`` / ``send_and_receive`` / ``aggregate_train``
calls as ``Strategy.start`` does for one round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedforget import wire
from fedforget.arrays import Arrays
from fedforget.errors import FedforgetError
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.strategies.base import RoundResult


class RunError(FedforgetError):
    """The federated run cannot continue: e.g. a round no client could train."""


def train_recorded_round(
    grid: Grid,
    strategy: RecordingFedAvg,
    server_round: int,
    model: Arrays,
    *,
    train_config: Mapping[str, int | float | str | bool],
    timeout: float,
    clients: Collection[str] | None = None,
) -> RoundResult:
    """Train round ``server_round`` from ``model`` and record it.

    Who trains: the consenting clients the strategy samples (all of them with
    ``fraction_train=1``), or exactly ``clients`` when given (a replay of a
    recorded round's participants, see :meth:`RecordingFedAvg.only`).
    """
    chosen = strategy.only(clients) if clients is not None else contextlib.nullcontext()
    with chosen:
        messages = list(
            strategy.configure_train(
                server_round, wire.record_from_arrays(model), ConfigRecord(dict(train_config)), grid
            )
        )
    if not messages:
        raise RunError(f"round {server_round}: no client is available to train")
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        reasons = sorted({str(msg.error.reason) for msg in replies if msg.has_error()})
        raise RunError(
            f"round {server_round}: none of the {len(messages)} clients returned a usable update "
            f"({len(replies)} replies; errors: {reasons or 'none, they timed out'})"
        )
    recorded = strategy.last_recorded
    assert recorded is not None and recorded.round == server_round
    if clients is not None and set(recorded.participants) != set(clients):
        silent = sorted(set(clients) - set(recorded.participants))
        raise RunError(
            f"round {server_round} was replayed with the clients that took part in it, but {', '.join(silent)} "
            "returned no usable update: the replay is not the round it reproduces (the unlearning is rolled back)"
        )
    return RoundResult(
        model_after=wire.arrays_from_record(arrays),
        participants=recorded.participants,
        client_epochs=recorded.client_epochs,
    )
