"""``fedforget simulate --shards K``: a sharded (SISA-style) federation on Flower's simulation engine.

The clients are split into K shards (:mod:`fedforget.sharding`). Each shard is
a complete federation of its own under ``OUT/shards/shard-<i>/``, in the state
directory layout every fedforget command reads (history store, consent
registry, ledger, certificates, report): its rounds involve only its clients
(:class:`~fedforget.server.rounds.grids.ShardGrid`), and a withdrawal is
unlearned in the withdrawing client's shard alone, by the run's strategy,
through the same coordinator as an unsharded run; it never touches the other
shards. An exact strategy (``retrain``) thus
retrains one shard, from its model before the client's first round, with the
shard's remaining clients.

The shards train in lockstep in one simulation session
(:class:`~fedforget.server.rounds.shards.ShardedRun`: round t of every shard
before round t+1 of any), each over its own clients. The served model
is the prediction ensemble of the shard models (:mod:`fedforget.ensemble`);
``OUT/report.json`` gives its accuracy per round, and the evidence of every
unlearning is measured on the ensemble, with the other shards' models the
same in the original, unlearned and retrained ensembles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedforget.arrays import Arrays
from fedforget.client.training import evaluate
from fedforget.ensemble import ensemble_arrays
from fedforget.evidence.membership import AttackResult
from fedforget.server.app import run_sharded_federation
from fedforget.server.rounds.loop import RunObserver, RunOutcome
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.events import completed_unlearnings, emptied
from fedforget.sharding import SHARDS_DIR, SHARDS_FILE, ShardAssignment, assign_shards, settle_assignment, shard_dir
from fedforget.simulations.config import NUM_CLASSES, SimulationConfig
from fedforget.simulations.learning import training_problem
from fedforget.simulations.ray_engine import run_on_ray
from fedforget.simulations.run_dir import REPORT_FILE, STORE_DIR
from fedforget.simulations.runner import (
    PreparedFederation,
    data_settings,
    federation_id,
    federation_report,
    prepare_federation_run,
    simulation_client_app,
)
from fedforget.simulations.task import client_partitions, test_dataset
from fedforget.simulations.verification import events_of, event_models, model_from_arrays, verify_events

def shard_federation_id(config: SimulationConfig, index: int) -> str:
    """The shard's federation id: every ledger entry and certificate of the shard names it."""
    return f"{federation_id(config)}-shard{index}of{config.shards}"


def shard_assignment(config: SimulationConfig) -> ShardAssignment:
    """The shards of ``config``'s clients, balanced by the examples each holds (loads the dataset)."""
    sizes = {str(client): len(part) for client, part in enumerate(client_partitions(data_settings(config)))}
    return assign_shards([str(c) for c in range(config.clients)], config.shards, config.seed, sizes)


def run_sharded(
    config: SimulationConfig,
    out: Path,
    *,
    resume: bool,
    observer: RunObserver | None,
    verbose: bool,
    ray_address: str | None,
    say: Callable[[str], None],
) -> dict[str, object]:
    """Train every shard not finished yet, then write ``OUT/report.json`` for the ensemble."""
    started = time.perf_counter()
    assignment = settle_assignment(out / SHARDS_FILE, shard_assignment(config))
    reports: dict[int, dict[str, object]] = {}
    pending: list[tuple[int, PreparedFederation]] = []
    try:
        for index, members in enumerate(assignment.shards):
            directory = shard_dir(out, index)
            if resume and (directory / REPORT_FILE).exists():
                reports[index] = json.loads((directory / REPORT_FILE).read_text())
                continue
            prepared = prepare_federation_run(
                config, directory, resume=resume and (directory / STORE_DIR / "store.json").exists(),
                observer=observer, clients=frozenset(members), federation=shard_federation_id(config, index),
                shard=assignment.scope(index),
            )
            pending.append((index, prepared))
        outcomes = _train_shards(config, assignment, pending, verbose=verbose, ray_address=ray_address, say=say)
    finally:
        for _, prepared in pending:
            if prepared.service is not None:
                prepared.service.stop()
    for index, prepared in pending:
        outcome, seconds = outcomes[index]
        reports[index] = federation_report(prepared, outcome, wall_seconds=seconds)
    return ensemble_report(config, out, assignment, reports, wall_seconds=time.perf_counter() - started)


def _train_shards(
    config: SimulationConfig,
    assignment: ShardAssignment,
    pending: Sequence[tuple[int, PreparedFederation]],
    *,
    verbose: bool,
    ray_address: str | None,
    say: Callable[[str], None],
) -> dict[int, tuple[RunOutcome, float]]:
    """Run the pending shards in lockstep in one simulation session (wall time: the session's, for each)."""
    outcomes: dict[int, tuple[RunOutcome, float]] = {}
    if not pending:
        return outcomes
    app = ServerApp()

    @app.main()
    def main(grid: Grid, _: Context) -> None:
        say(
            f"{len(pending)} shard(s) in lockstep, each round printed once per shard in this order: "
            + "; ".join(f"shard {index}: clients {', '.join(assignment.shards[index])}" for index, _ in pending)
        )
        started = time.perf_counter()
        finished = run_sharded_federation(grid, [prepared.setup for _, prepared in pending])
        seconds = time.perf_counter() - started
        outcomes.update({index: (outcome, seconds) for (index, _), outcome in zip(pending, finished)})

    run_on_ray(
        server_app=app, client_app=simulation_client_app(config), num_supernodes=config.clients,
        verbose=verbose, address=ray_address, say=say,
    )
    missing = [index for index, _ in pending if index not in outcomes]
    if missing:
        raise RuntimeError(
            f"the simulation ended before shard(s) {missing} finished their rounds; their history stores under "
            f"{pending[0][1].out.parent} are intact: rerun with --resume to continue"
        )
    return outcomes


def served_models(out: Path, shards: int, version: int) -> dict[int, Arrays]:
    """Each served shard's model at ``version`` in the trajectory it continued with (what the run serves), by shard.

    A shard every client of which withdrew is not served: it holds a model
    that learnt nothing (:mod:`fedforget.strategies.empty_shard`).
    """
    models = {}
    for index in range(shards):
        with HistoryStore.open(shard_dir(out, index) / STORE_DIR, readonly=True) as store:
            if not emptied(completed_unlearnings(store)):
                models[index] = store.read_model(version)
    return models


def ensemble_accuracy(model_spec: str, dataset: str, shard_models: Sequence[Arrays]) -> dict[str, float | None]:
    """Test accuracy and loss of the prediction ensemble of ``shard_models``, as the server evaluates a model.

    None for both when no shard is served (every client withdrew): there is no model to evaluate.
    """
    if not shard_models:
        return {"test_accuracy": None, "test_loss": None}
    ensemble = model_from_arrays(model_spec, ensemble_arrays(shard_models))
    result = evaluate(ensemble, test_dataset(dataset))
    return {"test_accuracy": result.accuracy, "test_loss": result.loss}


def ensemble_report(
    config: SimulationConfig,
    out: Path,
    assignment: ShardAssignment,
    reports: dict[int, dict[str, object]],
    *,
    wall_seconds: float,
) -> dict[str, object]:
    """``OUT/report.json`` of a sharded run: the ensemble per round, the shards, and every unlearning."""
    rounds = [
        {"round": version, **ensemble_accuracy(config.model_spec, config.dataset, list(served.values()))}
        for version in range(1, config.rounds + 1)
        for served in [served_models(out, assignment.count, version)]
    ]
    unlearning = [
        {**entry, "shard": index, "shard_dir": str(shard_dir(out, index))}
        for index in sorted(reports)
        for entry in reports[index]["unlearning"]  # type: ignore[attr-defined]
    ]
    stores = [reports[index]["store"] for index in sorted(reports)]
    return {
        "config": config.to_json(),
        "federation_id": federation_id(config),
        "served_model": "prediction ensemble: mean of the shard models' softmax outputs",
        "assignment": str(out / SHARDS_FILE),
        "shards": [
            {
                "index": index,
                "clients": list(assignment.shards[index]),
                "examples": sum(assignment.examples[c] for c in assignment.shards[index]),
                "federation_id": reports[index]["federation_id"],
                "dir": str(shard_dir(out, index)),
                "final_test_accuracy": reports[index]["final_test_accuracy"],
                "served": not emptied(reports[index]["unlearning"]),  # type: ignore[arg-type]
                "wall_seconds": reports[index]["wall_seconds"],
            }
            for index in sorted(reports)
        ],
        "rounds": rounds,
        "final_test_accuracy": rounds[-1]["test_accuracy"],
        "store": {
            "path": str(out / SHARDS_DIR),
            "bytes": sum(int(s["bytes"]) for s in stores),  # type: ignore[index]
            "client_rounds": sum(int(s["client_rounds"]) for s in stores),  # type: ignore[index]
        },
        "unlearning": unlearning,
        "wall_seconds": wall_seconds,
        "training_problem": training_problem(rounds, NUM_CLASSES),
    }


def verify_sharded(
    config: SimulationConfig, out: Path, report: dict[str, object]
) -> tuple[dict[str, object], dict[str, dict[str, dict[str, AttackResult]]]]:
    """The evidence of every unlearning, measured on the served ensemble.

    In all three ensembles of an unlearning the other shards hold the models
    the run finally serves at that version; only the withdrawing client's
    shard differs (its original, unlearned and retrained model).
    """
    events = [
        {**event, "shard": int(event["shard"])}  # type: ignore[call-overload]
        for event in events_of({"unlearning": _renumbered(report["unlearning"])})  # type: ignore[arg-type]
    ]

    def models_of(event: dict[str, object]) -> dict[str, Arrays]:
        shard = int(event["shard"])  # type: ignore[call-overload]
        version = int(event["round"]) - 1  # type: ignore[call-overload]
        others = {i: m for i, m in served_models(out, config.shards, version).items() if i != shard}
        with HistoryStore.open(shard_dir(out, shard) / STORE_DIR, readonly=True) as store:
            own = event_models(store, event)
        leaves = emptied([event])  # its last clients withdrew: the unlearned and retrained ensembles do without it

        def ensemble(role: str, model: Arrays) -> Arrays:
            members = dict(others) if leaves and role != "original" else {**others, shard: model}
            return ensemble_arrays([members[i] for i in sorted(members)])

        return {role: ensemble(role, model) for role, model in own.items()}

    return verify_events(config, data_settings(config), out, events, models_of)


def _renumbered(entries: list[dict[str, object]]) -> list[dict[str, object]]:
    """Report entries with unlearning indices unique across shards (each counts from 0), in round order."""

    def key(entry: dict[str, object]) -> tuple[int, int, int]:
        return int(entry["round"]), int(entry["shard"]), int(entry["unlearning_index"])  # type: ignore[call-overload]

    number = {k: i for i, k in enumerate(sorted({key(e) for e in entries}))}
    return [{**e, "unlearning_index": number[key(e)]} for e in entries]
