"""The ServerApp ``flwr run`` starts: fedforget on a real SuperLink.

Flower runs it in a process of its own that knows only the run config, so
everything lasting goes to the configured state directory: the history
store, the consent registry the withdrawal service fills, the ledger, the
certificates and ``report.json``. A run killed at any point is continued by
``flwr run`` with ``resume=true``: the store says which rounds are complete,
the registry which requests are still open.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedforget.files import ensure_writable_dir, write_json_atomic
from fedforget.run_config import DeploymentConfig
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.app import ServerSetup, run_federation, run_sharded_federation
from fedforget.server.withdrawal.consent import ConsentSource, RegistryConsent, ShardConsent
from fedforget.server.withdrawal.registry import ConsentRegistry
from fedforget.server.rounds.client_identity import ClientIdResolver
from fedforget.server.rounds.grids import PromptGrid
from fedforget.server.state_dir import StateDir
from fedforget.sharding import (
    SHARD_META,
    SHARDS_FILE,
    ShardAssignment,
    assign_shards,
    load_assignment,
    settle_assignment,
    shard_dir,
)
from fedforget.server.store.errors import FedforgetError, StoreError
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.rounds.loop import RunOutcome, RunSettings
from fedforget.strategies.registry import StrategyChoice
from fedforget.strategies.settings import UnlearningContext

app = ServerApp()

NODE_WAIT_SECONDS = 300.0
"""How long a sharded run's first start waits for ``min-nodes`` nodes before it forms the shards."""


class LoggedProgress:
    """Run progress in the ServerApp's log, which ``flwr run --stream`` and ``flwr log`` show."""

    def run_started(self, first_round: int, num_rounds: int) -> None:
        log(logging.INFO, "fedforget: rounds %s..%s", first_round, num_rounds)

    def round_starting(self, server_round: int) -> None:
        log(logging.INFO, "fedforget: round %s starting", server_round)

    def round_finished(self, entry: dict[str, object]) -> None:
        accuracy = entry.get("test_accuracy")
        shown = "" if accuracy is None else f", test accuracy {float(accuracy):.3f}"  # type: ignore[arg-type]
        log(
            logging.INFO,
            "fedforget: round %s done in %.1f s with %s%s",
            entry["round"],
            float(entry.get("seconds", 0.0)),  # type: ignore[arg-type]
            ", ".join(entry.get("participants", [])),  # type: ignore[arg-type]
            shown,
        )

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None:
        log(logging.INFO, "fedforget: unlearning %s with %s before round %s", ", ".join(clients), strategy, before_round)

    def unlearning_step(self, step: str) -> None:
        log(logging.INFO, "fedforget: unlearning: %s", step)

    def unlearning_finished(self, event: dict[str, object]) -> None:
        log(
            logging.INFO,
            "fedforget: unlearned %s in %.1f s; certificates: %s",
            ", ".join(event["clients"]),  # type: ignore[arg-type]
            float(event["seconds"]),  # type: ignore[arg-type]
            event.get("certificates"),
        )


def deployment_setup(config: DeploymentConfig) -> ServerSetup:
    """The server's setup for a deployed run: state on disk, withdrawals from the consent registry."""
    _check_signing_key(config)
    ensure_writable_dir(config.state_dir)
    holds_store = (config.state.store / "store.json").exists()
    if holds_store and not config.resume and _holds_rounds(config.state.store):
        raise FedforgetError(
            f"state-dir {config.state_dir} already holds a run: continue it with --run-config \"... resume=true\", "
            "or give another state-dir"
        )
    if config.resume and not holds_store:
        raise FedforgetError(f"resume=true, but state-dir {config.state_dir} holds no run to continue")
    _open_registry(config)
    return _server_setup(config, config.state, RegistryConsent(config.state.registry), resume=config.resume)


def sharded_deployment_setups(config: DeploymentConfig, assignment: ShardAssignment) -> list[ServerSetup]:
    """One setup per shard: its own store, ledger and certificates under ``state-dir/shards/shard-<i>``.

    The withdrawal service and its registry are the federation's; each
    shard's loop sees only its own clients' requests (:class:`ShardConsent`).
    """
    _check_signing_key(config)
    _open_registry(config)
    setups = []
    for index, members in enumerate(assignment.shards):
        state = StateDir(shard_dir(config.state_dir, index))
        clients = frozenset(members)
        setup = _server_setup(
            config, state, ShardConsent(RegistryConsent(config.state.registry), clients),
            resume=config.resume and (state.store / "store.json").exists(),
            shard=assignment.scope(index),
        )
        setups.append(replace(setup, clients=clients, settings=replace(setup.settings, expected_clients=len(clients))))
    return setups


def deployment_assignment(grid: Grid, config: DeploymentConfig) -> ShardAssignment:
    """The run's shards: saved in ``state-dir/shards.json`` by its first run, read back by every resume.

    The first run waits for ``min-nodes`` nodes and splits the organisations
    connected then (by their registered names) with the seeded rule of
    :mod:`fedforget.sharding`; an organisation that joins later is in no shard
    and receives nothing.
    """
    path = config.state_dir / SHARDS_FILE
    if config.resume:
        if not path.exists():
            raise FedforgetError(f"resume=true, but state-dir {config.state_dir} holds no sharded run ({path} is missing)")
        saved = load_assignment(path)
        if saved.count != config.shards:
            raise FedforgetError(
                f"shards={config.shards}, but the run in {config.state_dir} has {saved.count} shards ({path}): "
                f"resume with shards={saved.count}"
            )
        return saved
    if path.exists():
        raise FedforgetError(
            f"state-dir {config.state_dir} already holds a sharded run: continue it with --run-config "
            "\"... resume=true\", or give another state-dir"
        )
    ensure_writable_dir(config.state_dir)
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(list(grid.get_node_ids())) < config.min_nodes:
        if time.monotonic() > deadline:
            raise FedforgetError(
                f"only {len(list(grid.get_node_ids()))} of min-nodes={config.min_nodes} nodes connected within "
                f"{NODE_WAIT_SECONDS:.0f} s: the shards cannot be formed"
            )
        time.sleep(0.2)
    node_ids = list(grid.get_node_ids())
    clients = sorted(ClientIdResolver().resolve(grid, node_ids).values())
    assignment = assign_shards(clients, config.shards, config.seed)
    settle_assignment(path, assignment)
    log(logging.INFO, "fedforget: shards %s (saved in %s)", [list(s) for s in assignment.shards], path)
    return assignment


def _check_signing_key(config: DeploymentConfig) -> None:
    if not config.signing_key.is_file():
        raise FedforgetError(
            f"signing-key {config.signing_key} does not exist: make it with `fedforget certs` "
            "(federation.key) and give its absolute path"
        )


def _open_registry(config: DeploymentConfig) -> None:
    config.state.registry.parent.mkdir(parents=True, exist_ok=True)
    # The withdrawal service may not have created the registry yet; the loop reads it every round.
    ConsentRegistry.open(config.state.registry).close()


def _server_setup(
    config: DeploymentConfig,
    state: StateDir,
    consent: ConsentSource,
    *,
    resume: bool,
    shard: dict[str, object] | None = None,
) -> ServerSetup:
    """The run's settings, keeping its history store, ledger and certificates in ``state``.

    ``shard``: the scope of one shard of a sharded run, kept in its store's meta for its ledger to state.
    """
    from fedforget.client.app import model_arrays
    from fedforget.simulations.models import SeededModelFactory, build_model
    from fedforget.simulations.runner import make_evaluate_fn

    context = UnlearningContext(
        local_epochs=config.local_epochs,
        retention_interval=config.retention_interval,
        model_factory=SeededModelFactory(config.model_spec, seed=config.seed),
    )
    return ServerSetup(
        store_dir=state.store,
        federation_id=config.federation_id,
        initial_model=model_arrays(build_model(config.model_spec, seed=config.seed)),
        settings=RunSettings(
            num_rounds=config.num_rounds,
            train_config={"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size},
            seed=config.seed,
            round_timeout=config.round_timeout,
            expected_clients=config.min_nodes,
        ),
        strategy=StrategyChoice(config.strategy, dict(config.unlearning)),
        unlearning_context=context,
        retention_interval=config.retention_interval,
        update_dtype=config.store_dtype,
        resume=resume,
        evaluate_fn=make_evaluate_fn(config.dataset, config.seed, config.model_spec) if config.evaluate else None,
        observer=LoggedProgress(),
        fedavg_options={"fraction_train": config.fraction_train},
        privacy=config.privacy(),
        consent=consent,
        accountability=Accountability(
            ledger_path=state.ledger,
            server_key=config.signing_key,
            certificates_dir=state.certificates,
            federation_id=config.federation_id,
            old_models_retention=dt.timedelta(days=config.audit_retention_days) if config.audit_retention_days else None,
        ),
        metadata={} if shard is None else {SHARD_META: shard},
    )


def _holds_rounds(store_dir: Path) -> bool:
    """Whether the store recorded a round; one that did not (its run failed before round 1) is replaced.

    A store that cannot be opened counts as holding rounds: it is never replaced.
    """
    try:
        with HistoryStore.open(store_dir) as store:
            return any(store.reader(t.id).last_round() > 0 for t in store.trajectories())
    except StoreError:
        return True


def deployment_report(config: DeploymentConfig, outcome: RunOutcome, wall_seconds: float) -> dict[str, object]:
    """What the run did, for the operator: rounds, unlearnings and where their certificates are."""
    return {
        "federation_id": config.federation_id,
        "strategy": config.strategy,
        "resumed_from_round": outcome.resumed_from,
        "rounds": [
            {k: entry.get(k) for k in ("round", "trajectory", "participants", "seconds", "test_accuracy")}
            for entry in outcome.timeline
        ],
        "unlearning": [
            {k: event.get(k) for k in ("clients", "round", "strategy", "seconds", "client_epochs",
                                       "test_accuracy_before", "test_accuracy_after", "certificates")}
            for event in outcome.unlearning
        ],
        "ledger": str(config.state.ledger),
        "store": str(config.state.store),
        "wall_seconds": wall_seconds,
        "privacy": _privacy(config),
    }


def _privacy(config: DeploymentConfig) -> dict[str, object] | None:
    """The (ε, δ) spent, from the store's record of its noised rounds (None without DP)."""
    settings = config.privacy()
    if settings is None:
        return None
    from fedforget.server.rounds.privacy_accounting import privacy_account

    with HistoryStore.open(config.state.store, readonly=True) as store:
        return privacy_account(store, settings).to_json()


def sharded_report(
    config: DeploymentConfig, assignment: ShardAssignment, outcomes: list[RunOutcome], wall_seconds: float
) -> dict[str, object]:
    """The federation's report: the shards, each shard's own report, and the served ensemble's accuracy."""
    report: dict[str, object] = {
        "federation_id": config.federation_id,
        "strategy": config.strategy,
        "served_model": "prediction ensemble: mean of the shard models' softmax outputs",
        "assignment": str(config.state_dir / SHARDS_FILE),
        "shards": [
            {
                "index": index, "clients": list(members), "served": outcome.served,
                "report": str(StateDir(shard_dir(config.state_dir, index)).report),
            }
            for (index, members), outcome in zip(enumerate(assignment.shards), outcomes)
        ],
        "unlearning": [
            {"shard": index, **entry}
            for index, outcome in enumerate(outcomes)
            for entry in deployment_report(config, outcome, wall_seconds)["unlearning"]  # type: ignore[attr-defined]
        ],
        "wall_seconds": wall_seconds,
    }
    if config.evaluate:
        from fedforget.simulations.sharded import ensemble_accuracy

        served = ensemble_accuracy(config.model_spec, config.dataset, [o.model for o in outcomes if o.served])
        report["final_test_accuracy"] = served["test_accuracy"]
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train (or resume), acting on signed withdrawals between rounds; write ``report.json``."""
    config = DeploymentConfig.from_run_config(context.run_config)
    run_deployment(PromptGrid(grid), config)
    log(logging.INFO, "fedforget: run complete; report in %s", config.state.report)


def run_deployment(grid: Grid, config: DeploymentConfig) -> None:
    """The deployed run on ``grid``: one federation, or ``shards`` of them in lockstep; writes the reports."""
    started = time.perf_counter()
    if config.shards == 1:
        outcome = run_federation(grid, deployment_setup(config))
        write_json_atomic(config.state.report, deployment_report(config, outcome, time.perf_counter() - started))
        return
    assignment = deployment_assignment(grid, config)
    outcomes = run_sharded_federation(grid, sharded_deployment_setups(config, assignment))
    seconds = time.perf_counter() - started
    for index, outcome in enumerate(outcomes):
        shard = replace(config, state_dir=shard_dir(config.state_dir, index))
        write_json_atomic(shard.state.report, deployment_report(shard, outcome, seconds))
    write_json_atomic(config.state.report, sharded_report(config, assignment, outcomes, seconds))
