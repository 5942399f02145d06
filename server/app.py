"""The fedforget ServerApp: a recording FedAvg driven by the server's own round loop."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedforget.arrays import Arrays
from fedforget.privacy import PrivacySettings
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.withdrawal.consent import ConsentSource
from fedforget.server.rounds.loop import (
    EvaluateFn,
    FederatedRun,
    RunObserver,
    RunOutcome,
    RunSettings,
    Withdrawal,
)
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.client_identity import ClientIdResolver
from fedforget.server.rounds.grids import ShardGrid
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.rounds.shards import ShardedRun
from fedforget.strategies.registry import StrategyChoice
from fedforget.strategies.settings import UnlearningContext


@dataclass
class ServerSetup:
    """Everything the ServerApp needs to start or resume a run."""

    store_dir: Path
    federation_id: str
    initial_model: Arrays
    settings: RunSettings
    strategy: StrategyChoice = field(default_factory=StrategyChoice)
    unlearning_context: UnlearningContext | None = None
    """The federation's E, Δt and model factory for the strategy; by default E from ``settings`` and Δt below."""
    withdrawals: Sequence[Withdrawal] = ()
    retention_interval: int = 1
    update_dtype: str = "float32"
    key_file: Path | None = None
    resume: bool = False
    evaluate_fn: EvaluateFn | None = None
    observer: RunObserver | None = None
    fedavg_options: dict[str, object] = field(default_factory=dict)
    """Flower ``FedAvg`` settings over fedforget's defaults, e.g. ``fraction_train`` (sampled participation)."""
    consent: ConsentSource | None = None
    """Where withdrawals come from; ``withdrawals`` is the fixed-schedule alternative."""
    accountability: Accountability | None = None
    """Ledger, key destruction and certificates; None runs without them."""
    reference_retrain: bool = False
    """After an approximate unlearning, also retrain exactly (in a side trajectory) as its yardstick."""
    metadata: dict[str, object] = field(default_factory=dict)
    """Stored in the history store when it is created (e.g. the settings a resume must match)."""
    clients: frozenset[str] | None = None
    """Only these clients take part (one shard of a sharded federation); None: every connected client."""
    privacy: PrivacySettings | None = None
    """Differentially private training (Flower's DP wrappers and mods, recorded as the clients see it)."""


def open_history_store(setup: ServerSetup) -> HistoryStore:
    """Create the run's store, or open it for ``--resume`` after checking it is this federation's."""
    spec = ModelSpec.from_arrays(setup.initial_model)
    if setup.resume:
        store = HistoryStore.open(setup.store_dir, key_file=setup.key_file)
        store.check_compatible(federation_id=setup.federation_id, model_spec=spec)
        return store
    store = HistoryStore.create(
        setup.store_dir,
        federation_id=setup.federation_id,
        model_spec=spec,
        retention_interval=setup.retention_interval,
        update_dtype=setup.update_dtype,
        key_file=setup.key_file,
    )
    for key, value in setup.metadata.items():
        store.set_meta(key, value)
    return store


def run_federation(grid: Grid, setup: ServerSetup) -> RunOutcome:
    """Run (or resume) the federation described by ``setup`` on ``grid``."""
    _check_shard(setup)
    with open_history_store(setup) as store:
        return _federated_run(grid, setup, store).execute(setup.initial_model)


def run_sharded_federation(grid: Grid, shards: Sequence[ServerSetup]) -> list[RunOutcome]:
    """Run (or resume) the shards of one federation on ``grid`` in lockstep, one setup (with ``clients``) each."""
    unsharded = [setup.store_dir for setup in shards if setup.clients is None]
    if unsharded:
        raise ValueError(f"every shard's setup must name its clients; {unsharded[0]} does not")
    for setup in shards:
        _check_shard(setup)
    with contextlib.ExitStack() as stack:
        stores = [stack.enter_context(open_history_store(setup)) for setup in shards]
        runs = [_federated_run(grid, setup, store) for setup, store in zip(shards, stores)]
        return ShardedRun(runs).execute(shards[0].initial_model)


def _check_shard(setup: ServerSetup) -> None:
    """Refuse, before any file is written, a shard given another shard's withdrawals."""
    if setup.clients is None:
        return
    outside = sorted({w.client_id for w in setup.withdrawals} - setup.clients)
    if outside:
        raise ValueError(
            f"withdrawal(s) of client(s) {', '.join(outside)} given to the run of clients "
            f"{', '.join(sorted(setup.clients))}: give each shard only its own clients' withdrawals"
        )


def _federated_run(grid: Grid, setup: ServerSetup, store: HistoryStore) -> FederatedRun:
    """The round loop of ``setup`` on ``store``: over the setup's clients only, when it names them."""
    context = setup.unlearning_context or UnlearningContext(
        local_epochs=float(setup.settings.train_config.get("local-epochs", 1.0)),
        retention_interval=setup.retention_interval,
    )
    unlearner = setup.strategy.build(context)
    options: dict[str, object] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_available_nodes": 1,
    }
    options.update(setup.fedavg_options)
    identities = ClientIdResolver()
    if setup.clients is not None:
        grid = ShardGrid(grid, identities, setup.clients)
    # Seeded by the run's seed: with fraction_train < 1, a run and its resume sample the same clients.
    strategy = RecordingFedAvg(
        store, identities=identities, sampling_seed=setup.settings.seed, privacy=setup.privacy, **options
    )
    return FederatedRun(
        grid,
        store,
        strategy,
        unlearner,
        setup.settings,
        withdrawals=setup.withdrawals,
        evaluate_fn=setup.evaluate_fn,
        observer=setup.observer,
        reference_retrain=setup.reference_retrain,
        consent=setup.consent,
        accountability=setup.accountability,
    )


def make_server_app(
    setup: ServerSetup, on_finish: Callable[[RunOutcome], None] | None = None
) -> ServerApp:
    """A ServerApp whose ``main`` runs :func:`run_federation` and hands the outcome to ``on_finish``.

    The store is opened inside ``main`` because Flower runs it on its own
    thread (simulation) or process (deployment), and SQLite connections stay
    on the thread that opened them.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome = run_federation(grid, setup)
        if on_finish is not None:
            on_finish(outcome)

    return app
