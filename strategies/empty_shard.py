"""Exact unlearning of a shard's last clients: the shard is emptied and leaves the served ensemble.

In a sharded (SISA) federation each shard's model is trained by its own
clients only. When every client a shard still has withdraws, retraining the
shard without them means training it with nobody: FedAvg over no client
leaves every round's model as it was, so the shard holds the model from
before the clients' first round (the initial model when they took part from
round 1). That model has learnt nothing; the federation serves the other
shards' ensemble from then on (the Flower layer leaves a shard with no
client out of it).

It is chosen by the round loop, never by the user: whatever the run's
strategy, a shard with no client left cannot run an approximate strategy's
recovery rounds, and needs none, since nothing is left to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedforget.strategies.base import Federation, HistoryView, UnlearningOutcome, UnlearningRequest, Unlearner
from fedforget.strategies.settings import StrategySettings
from fedforget.strategies.toolkit import exact_base_version


@dataclass(frozen=True)
class EmptyShardSettings(StrategySettings):
    """Nothing to tune: nobody is left to train."""

    strategy: ClassVar[str] = "empty-shard"


class EmptyShard(Unlearner):
    """Fork before the clients' first round and record every later round with no participant."""

    name: ClassVar[str] = "empty-shard"
    exact: ClassVar[bool] = True
    Settings: ClassVar[type[StrategySettings]] = EmptyShardSettings

    @property
    def needs_client_work(self) -> bool:
        return False

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        base_version = exact_base_version(history, request)
        federation.start_trajectory(base_version, {"strategy": self.name, "clients": sorted(request.clients)})
        model = history.model(base_version)
        for server_round in range(base_version + 1, request.completed_rounds + 1):
            federation.record_round(server_round, model, [])
        return UnlearningOutcome(
            model=model, rounds_replayed=request.completed_rounds - base_version, base_version=base_version
        )
