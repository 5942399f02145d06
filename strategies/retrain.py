"""Exact unlearning: retrain without the withdrawn clients.

The yardstick every faster strategy is judged against. It restarts from the
last global model that holds none of the withdrawn clients' contributions —
the model before the first round any of them took part in, or any client an
earlier approximate unlearning removed — and replays every round since, so
the result is what the federation would hold had those clients never joined.

Each round is replayed with the clients the history records for it, minus
the removed ones: under sampled participation a round's sample is
reproduced, not drawn again (a fresh draw would be another federation's
history, and could include clients that were not sampled then). A round
whose recorded participants were all removed trained nobody: it is recorded
with no participants and the model unchanged. A round the history holds no
participants for at all (one an approximate strategy computed) has no
sample to reproduce; it is trained as a live round is, by the federation's
own choice of clients.
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
from fedforget.strategies.toolkit import exact_base_version, walk


@dataclass(frozen=True)
class RetrainSettings(StrategySettings):
    """Exact retraining has nothing to tune."""

    strategy: ClassVar[str] = "retrain"


class Retrain(Unlearner):
    """Replay rounds ``first .. completed`` without the withdrawn clients, each with its recorded participants."""

    name: ClassVar[str] = "retrain"
    exact: ClassVar[bool] = True
    Settings: ClassVar[type[StrategySettings]] = RetrainSettings

    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        base_version = exact_base_version(history, request)
        federation.start_trajectory(
            base_version,
            {"strategy": self.name, "clients": sorted(request.clients)},
        )
        removed = request.clients | request.residual_clients
        model = history.model(base_version)
        for view in walk(history, base_version + 1, request.completed_rounds):
            recorded = [p.client_id for p in view.participants]
            staying = [client for client in recorded if client not in removed]
            if not recorded:
                model = federation.train_round(view.round, model).model_after
            elif staying:
                model = federation.train_round(view.round, model, clients=staying).model_after
            else:
                federation.record_round(view.round, model, [])
        return UnlearningOutcome(
            model=model,
            rounds_replayed=request.completed_rounds - base_version,
            base_version=base_version,
        )
