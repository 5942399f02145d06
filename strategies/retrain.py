"""Exact unlearning: retrain without the withdrawn clients.

The yardstick every faster strategy is judged against. It restarts from the
last global model that holds none of the withdrawn clients' contributions —
the model before the first round any of them took part in, or any client an
earlier approximate unlearning removed — and replays every round since with
the remaining clients, so the result is what the federation would hold had
those clients never joined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedforget.strategies.base import (
    Federation,
    HistoryView,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.settings import StrategySettings
from fedforget.strategies.toolkit import earliest_participation


@dataclass(frozen=True)
class RetrainSettings(StrategySettings):
    """Exact retraining has nothing to tune."""

    strategy: ClassVar[str] = "retrain"


class Retrain(Unlearner):
    """Replay rounds ``first .. completed`` without the withdrawn clients, every client training in each."""

    name: ClassVar[str] = "retrain"
    exact: ClassVar[bool] = True
    Settings: ClassVar[type[StrategySettings]] = RetrainSettings

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        first = earliest_participation(history, sorted(request.clients | request.residual_clients))
        # A client that never contributed leaves nothing to remove: the new
        # trajectory simply continues from the current model.
        base_version = request.completed_rounds if first is None else first - 1
        federation.start_trajectory(
            base_version,
            {"strategy": self.name, "clients": sorted(request.clients)},
        )
        model = history.model(base_version)
        for server_round in range(base_version + 1, request.completed_rounds + 1):
            model = federation.train_round(server_round, model).model_after
        return UnlearningOutcome(
            model=model,
            rounds_replayed=request.completed_rounds - base_version,
            base_version=base_version,
        )
