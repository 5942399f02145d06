"""Builders for in-process federations over the LocalGrid (no simulation engine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from local_grid import LocalGrid

from flwr.clientapp.typing import Mod

from fedforget.arrays import Arrays
from fedforget.privacy import PrivacySettings
from fedforget.client.app import make_client_app, model_arrays
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.rounds.loop import FederatedRun, RunObserver, RunSettings, Withdrawal
from fedforget.server.withdrawal.consent import ConsentSource
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import make_evaluate_fn
from fedforget.simulations.task import DataSettings, SimulationTask
from fedforget.strategies.base import Unlearner
from fedforget.strategies.retrain import Retrain

TRAIN_CONFIG = {"local-epochs": 1.0, "lr": 0.05, "batch-size": 32}


def initial_model() -> Arrays:
    return model_arrays(build_model("digits", seed=0))


@dataclass
class LocalFederation:
    grid: LocalGrid
    store: HistoryStore
    strategy: RecordingFedAvg
    run: FederatedRun


def local_federation(
    store_dir: Path,
    *,
    clients: int = 4,
    rounds: int = 3,
    withdrawals: Sequence[Withdrawal] = (),
    unlearner: Unlearner | None = None,
    observer: RunObserver | None = None,
    store: HistoryStore | None = None,
    evaluate: bool = False,
    consent: ConsentSource | None = None,
    accountability: Accountability | None = None,
    reference_retrain: bool = False,
    fraction_train: float = 1.0,
    privacy: PrivacySettings | None = None,
    mods: Sequence[Mod] = (),
    train_fraction: float = 1.0,
) -> LocalFederation:
    """A digits federation of ``clients`` real fedforget ClientApps in this process.

    ``fraction_train`` < 1 samples that share of the clients per round, seeded (seed 0) as a run's is.
    ``train_fraction`` < 1 hands the clients a seeded subsample of digits, for
    tests that check what is recorded rather than how well the model learns.
    """
    task = SimulationTask(DataSettings(dataset="digits", num_clients=clients, seed=0, train_fraction=train_fraction))
    grid = LocalGrid(make_client_app(task, mods), clients)
    if store is None:
        store = HistoryStore.create(
            store_dir, federation_id="test-federation", model_spec=ModelSpec.from_arrays(initial_model())
        )
    strategy = RecordingFedAvg(
        store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, fraction_train=fraction_train,
        sampling_seed=0, privacy=privacy,
    )
    run = FederatedRun(
        grid,
        store,
        strategy,
        unlearner or Retrain(),
        RunSettings(num_rounds=rounds, train_config=dict(TRAIN_CONFIG), expected_clients=clients),
        withdrawals=withdrawals,
        evaluate_fn=make_evaluate_fn("digits", 0) if evaluate else None,
        observer=observer,
        consent=consent,
        accountability=accountability,
        reference_retrain=reference_retrain,
    )
    return LocalFederation(grid=grid, store=store, strategy=strategy, run=run)
