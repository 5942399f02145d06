"""``fedforget simulate``: a federation with withdrawals on Flower's simulation engine.

Everything is validated before the first byte is written; the history store
under ``OUT/store`` is the run's durable state, so an interrupted run resumes
from its last completed round, and ``OUT/report.json`` is written last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fedforget.arrays import Arrays
from fedforget.sharding import SHARD_META
from fedforget.client.app import load_weights, make_client_app, model_arrays
from fedforget.client.training import evaluate
from fedforget.files import write_json_atomic
from fedforget.server.app import ServerSetup, make_server_app
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.unlearning.events import completed_unlearnings
from fedforget.server.withdrawal.consent import RegistryConsent
from fedforget.privacy import PrivacySettings
from fedforget.server.rounds.privacy_accounting import privacy_account
from fedforget.server.rounds.loop import RunObserver, RunOutcome, RunSettings, SilentObserver
from fedforget.server.withdrawal.service import WithdrawalServer, serve
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.simulations.config import NUM_CLASSES, ConfigError, SimulationConfig
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.learning import training_problem
from fedforget.simulations.models import build_model
from fedforget.simulations.plots import write_plots
from fedforget.simulations.ray_engine import quiet_engines, run_on_ray
from fedforget.simulations.run_dir import (
    REPORT_FILE,
    STORE_DIR,
    VERIFICATION_FILE,
    check_fresh,
    record_settings,
    run_dirs,
    saved_config,
    writable,
)
from fedforget.simulations.task import DataSettings, SimulationTask, mislabelled_canaries, test_dataset
from fedforget.simulations.verification import aggregate_seeds, verify_run
from fedforget.simulations.withdrawing_clients import FederationPaths, WithdrawingClients, prepare_federation

CONFIG_META = "simulation_config"
EVIDENCE_RETENTION = dt.timedelta(days=1)
"""How long a simulation keeps the old global models a withdrawn client trained, for its evidence.

The verification after the run compares the original model (of the history the
client was removed from) with the unlearned one; the certificate and the
ledger say they are kept until then, and they are shredded at the next run,
round or unlearning after it."""


@dataclass(frozen=True)
class SimulationResult:
    """What ``simulate`` wrote: the report and, if anything was unlearned, the verification."""

    report: dict[str, object]
    verification: dict[str, object] | None


def data_settings(config: SimulationConfig) -> DataSettings:
    return DataSettings(
        dataset=config.dataset,
        num_clients=config.clients,
        partition=config.partition,
        alpha=config.alpha,
        classes_per_partition=config.classes_per_partition,
        seed=config.seed,
        train_fraction=config.train_fraction,
        backdoor_clients=tuple(sorted(int(c) for c in config.backdoors)),
        backdoor_fraction=config.backdoor_fraction,
        trigger=config.trigger(),
        canary_clients=tuple(sorted(int(w.client_id) for w in config.withdrawals)) if config.canaries else (),
        canaries=config.canaries,
    )


def federation_id(config: SimulationConfig) -> str:
    """A name for the simulated federation, fixed by who holds which data."""
    holdings = {
        "dataset": config.dataset,
        "clients": config.clients,
        "partition": config.partition,
        "alpha": config.alpha,
        "classes_per_partition": config.classes_per_partition,
        "seed": config.seed,
    }
    if config.train_fraction < 1.0:
        holdings["train_fraction"] = config.train_fraction
    identity = json.dumps(holdings, sort_keys=True).encode()
    return f"sim-{config.dataset}-{hashlib.sha256(identity).hexdigest()[:12]}"


def make_evaluate_fn(dataset: str, model_seed: int, model: str | None = None):  # type: ignore[no-untyped-def]
    """Central evaluation of a global model on the dataset's held-out test set.

    ``model`` is the architecture (see ``build_model``); by default the dataset's own.
    """
    test = test_dataset(dataset)
    spec = model or dataset

    def evaluate_global(arrays: Arrays) -> dict[str, float]:
        model = build_model(spec, seed=model_seed)
        load_weights(model, arrays)
        result = evaluate(model, test)
        return {"test_accuracy": result.accuracy, "test_loss": result.loss}

    return evaluate_global


STRATEGY_FIELDS = ("strategy", "strategy_settings")
"""Settings a resume may change while no unlearning has completed: e.g. to retrain after ``subtract`` refused."""


def _check_resumable(config: SimulationConfig, out: Path) -> bool:
    """Refuse to resume a run written with other settings, for another federation or model.

    Returns whether the unlearning strategy changed, which is allowed only
    before any unlearning completed (none has used the old one yet).
    """
    saved = saved_config(out).to_json()
    wanted = config.to_json()
    changed = {k for k, v in wanted.items() if saved.get(k) != v}

    def refuse(keys: set[str], hint: str = "") -> ConfigError:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {wanted[k]!r}" for k in sorted(keys))
        return ConfigError(f"--resume: the settings differ from the interrupted run's ({diffs}){hint}. "
                           "Resume with the same settings, or start a new run with another --out.")

    if changed - set(STRATEGY_FIELDS):
        raise refuse(changed)
    unlearned = False
    for seeded, run_dir in run_dirs(config, out):
        if (run_dir / STORE_DIR / "store.json").exists():
            spec = ModelSpec.from_arrays(model_arrays(build_model(seeded.model_spec, seed=seeded.seed)))
            with HistoryStore.open(run_dir / STORE_DIR) as store:
                store.check_compatible(federation_id=federation_id(seeded), model_spec=spec)
                unlearned = unlearned or bool(completed_unlearnings(store))
    if changed and unlearned:
        raise refuse(changed, " (the strategy can change only until a first unlearning completes)")
    return bool(changed)


def check_model_fits(config: SimulationConfig) -> None:
    """Refuse your own model if it cannot classify the dataset's images, before anything is written."""
    if config.model is None:
        return  # the built-in models are made for their datasets
    data = load_dataset(config.dataset)
    try:
        model = build_model(config.model_spec, seed=config.seed)
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor(data.x_test[:2]))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"--model {config.model}: cannot classify {config.dataset} images of shape "
            f"{data.input_shape}: {exc}"
        ) from exc
    if tuple(logits.shape) != (2, data.num_classes):
        raise ConfigError(
            f"--model {config.model}: for a batch of 2 {config.dataset} images it returned shape "
            f"{tuple(logits.shape)}; it must return (batch, {data.num_classes}) class scores"
        )


def check_canaries_fit(config: SimulationConfig) -> None:
    """Refuse ``--canaries K`` that a withdrawing client cannot plant in its own data, before anything is written."""
    if not config.canaries:
        return
    for seed in range(config.seed, config.seed + config.seeds):
        settings = data_settings(replace(config, seed=seed))
        for client in settings.canary_clients:
            try:
                mislabelled_canaries(settings, client)
            except ValueError as exc:
                raise ConfigError(f"--canaries {config.canaries}: client {client} (seed {seed}): {exc}") from None


def prepare_output(config: SimulationConfig, out: Path, resume: bool) -> Path:
    """Check ``OUT`` can take this run, then record its settings (the only write before training)."""
    out = writable(out)
    if resume:
        if _check_resumable(config, out):
            record_settings(config, out)  # the new strategy is what the run goes on with
        return out
    check_fresh(config, out)
    record_settings(config, out)
    return out


def simulate(
    config: SimulationConfig,
    out: Path,
    *,
    resume: bool = False,
    observer: RunObserver | None = None,
    verbose: bool = False,
    progress: Callable[[str], None] | None = None,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run the simulation described by ``config``, then verify every unlearning it did.

    Writes ``OUT/store`` and ``OUT/report.json`` (one ``OUT/seed-S/`` each with
    ``--seeds``), and with any unlearning ``OUT/verification.json``, the
    published models under ``OUT/models`` and plots under ``OUT/plots``.
    ``ray_address`` names a Ray cluster to run on; by default a private Ray
    listens on loopback only (see :mod:`fedforget.simulations.ray_engine`).
    A model that did not learn is reported in ``report["training_problem"]``.
    """
    started = time.perf_counter()
    config.validate()
    load_dataset(config.dataset)  # a missing dataset fails here, before anything is written
    check_model_fits(config)
    check_canaries_fit(config)
    out = prepare_output(config, out, resume)
    quiet_engines(verbose)
    say = progress or (lambda message: None)
    reports: list[tuple[SimulationConfig, Path, dict[str, object]]] = []
    for index, (seeded, run_dir) in enumerate(run_dirs(config, out)):
        if config.seeds > 1:
            say(f"seed {seeded.seed} ({index + 1} of {config.seeds})")
        if resume and (run_dir / REPORT_FILE).exists():
            report = json.loads((run_dir / REPORT_FILE).read_text())
        else:
            if seeded.shards > 1:
                from fedforget.simulations.sharded import run_sharded

                report = run_sharded(
                    seeded, run_dir, resume=resume, observer=observer, verbose=verbose, ray_address=ray_address, say=say
                )
                write_json_atomic(run_dir / REPORT_FILE, report)
            else:
                resumes = resume and (run_dir / STORE_DIR / "store.json").exists()
                report = _run_federation(
                    seeded, run_dir, resume=resumes, observer=observer, verbose=verbose, ray_address=ray_address,
                    say=say,
                )
        reports.append((seeded, run_dir, report))
    verification = None
    if any(report["unlearning"] for _, _, report in reports):
        say("measuring the evidence of forgetting ...")
        verification = write_verification(config, out, reports)
    if config.seeds == 1:
        summary = dict(reports[0][2])
    else:
        problems = {str(c.seed): r["training_problem"] for c, _, r in reports if r.get("training_problem")}
        summary = {
            "config": config.to_json(),
            "runs": [{"seed": c.seed, "report": str(d / REPORT_FILE)} for c, d, _ in reports],
            "final_test_accuracy": float(np.mean([r["final_test_accuracy"] for _, _, r in reports])),
            "final_test_accuracy_std": float(np.std([r["final_test_accuracy"] for _, _, r in reports], ddof=1)),
            "training_problem": (
                None if not problems else "; ".join(f"seed {seed}: {text}" for seed, text in problems.items())
            ),
        }
    summary["wall_seconds_total"] = time.perf_counter() - started
    if verification is not None:
        summary["verification"] = str(out / VERIFICATION_FILE)
    write_json_atomic(out / REPORT_FILE, summary)
    return SimulationResult(report=summary, verification=verification)


@dataclass
class PreparedFederation:
    """One federation (or one shard of a sharded one) ready to run: its setup, files and withdrawal service."""

    config: SimulationConfig
    out: Path
    federation: str
    setup: ServerSetup
    paths: FederationPaths
    service: WithdrawalServer | None


def prepare_federation_run(
    config: SimulationConfig,
    out: Path,
    *,
    resume: bool,
    observer: RunObserver | None,
    clients: frozenset[str] | None = None,
    federation: str | None = None,
    shard: dict[str, object] | None = None,
) -> PreparedFederation:
    """Keys, TLS, the withdrawal service and the server's setup for a run in ``out``.

    ``clients`` restricts the run to one shard's clients (their withdrawals
    only); ``federation`` names it (by default :func:`federation_id`), and
    ``shard`` is that shard's scope, stated by its ledger's unlearnings. Stop
    the returned ``service`` when the run ends.
    """
    out.mkdir(parents=True, exist_ok=True)
    initial = model_arrays(build_model(config.model_spec, seed=config.seed))
    paths = FederationPaths(out)
    federation = federation or federation_id(config)
    withdrawals = [w for w in config.withdrawals if clients is None or w.client_id in clients]
    prepare_federation(paths, sorted({w.client_id for w in withdrawals}))
    accountability = Accountability(
        ledger_path=paths.ledger,
        server_key=paths.server_key,
        certificates_dir=paths.certificates,
        federation_id=federation,
        old_models_retention=EVIDENCE_RETENTION,
    )
    service = None
    consent = None
    if withdrawals:
        # The one path: clients sign requests, the service records them, the server reads the registry.
        tls = paths.tls()
        service = serve(
            "127.0.0.1:0", registry_path=paths.registry, federation_id=federation, cert=tls.certificate, key=tls.private_key
        )
        consent = RegistryConsent(paths.registry)
        observer = WithdrawingClients(observer or SilentObserver(), withdrawals, paths, service.address, federation)
    setup = ServerSetup(
        store_dir=out / STORE_DIR,
        federation_id=federation,
        initial_model=initial,
        settings=RunSettings(
            num_rounds=config.rounds,
            train_config={"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size},
            seed=config.seed,
            expected_clients=config.clients if clients is None else len(clients),
        ),
        strategy=config.strategy_choice(),
        unlearning_context=config.unlearning_context(),
        consent=consent,
        accountability=accountability,
        retention_interval=config.retention_interval,
        update_dtype=config.store_dtype,
        resume=resume,
        evaluate_fn=make_evaluate_fn(config.dataset, config.seed, config.model),
        observer=observer,
        reference_retrain=config.strategy != "retrain",
        metadata={CONFIG_META: config.to_json(), **({} if shard is None else {SHARD_META: shard})},
        clients=clients,
        fedavg_options={"fraction_train": config.fraction_train},
        privacy=config.privacy(),
    )
    return PreparedFederation(config, out, federation, setup, paths, service)


def federation_report(prepared: PreparedFederation, outcome: RunOutcome, *, wall_seconds: float) -> dict[str, object]:
    """Build and write ``report.json`` of one finished federation (or shard)."""
    paths = prepared.paths
    report = build_report(prepared.config, prepared.out, outcome, wall_seconds=wall_seconds)
    report["federation_id"] = prepared.federation
    report["ledger"] = str(paths.ledger)
    report["certificates"] = [
        {"client": client, "path": path, "server_key": str(paths.server_public_key)}
        for event in outcome.unlearning
        for client, path in dict(event.get("certificates", {})).items()  # type: ignore[arg-type]
    ]
    write_json_atomic(prepared.out / REPORT_FILE, report)
    return report


def _run_federation(
    config: SimulationConfig,
    out: Path,
    *,
    resume: bool,
    observer: RunObserver | None,
    verbose: bool,
    ray_address: str | None,
    say: Callable[[str], None],
) -> dict[str, object]:
    """One federated run on the simulation engine; writes ``out/store`` and ``out/report.json``."""
    started = time.perf_counter()
    prepared = prepare_federation_run(config, out, resume=resume, observer=observer)
    outcomes: list[RunOutcome] = []
    server_app = make_server_app(prepared.setup, on_finish=outcomes.append)
    try:
        run_on_ray(
            server_app=server_app,
            client_app=simulation_client_app(config),
            num_supernodes=config.clients,
            verbose=verbose,
            address=ray_address,
            say=say,
        )
    finally:
        if prepared.service is not None:
            prepared.service.stop()
    if not outcomes:
        raise RuntimeError(
            "the simulation ended without finishing its rounds; the history store in "
            f"{out / STORE_DIR} is intact: rerun with --resume to continue"
        )
    return federation_report(prepared, outcomes[0], wall_seconds=time.perf_counter() - started)


def simulation_client_app(config: SimulationConfig) -> object:
    """The simulated clients: each trains its own partition of the dataset."""
    return make_client_app(SimulationTask(data=data_settings(config), model_seed=config.seed, model=config.model))


def write_verification(
    config: SimulationConfig, out: Path, reports: list[tuple[SimulationConfig, Path, dict[str, object]]]
) -> dict[str, object]:
    """Measure every unlearning of every seed; write ``verification.json``, models and plots."""
    documents, curves = [], []
    for seeded, run_dir, report in reports:
        if seeded.shards > 1:
            from fedforget.simulations.sharded import verify_sharded

            document, attacks = verify_sharded(seeded, run_dir, report)
        else:
            document, attacks = verify_run(seeded, data_settings(seeded), run_dir, report)
        documents.append(document)
        curves.append(attacks)
    verification = aggregate_seeds(documents)
    write_json_atomic(out / VERIFICATION_FILE, verification)
    withdrawals = [(w.client_id, w.round) for w in config.withdrawals]
    write_plots(out / "plots", verification, [r["rounds"] for _, _, r in reports], curves[0], withdrawals)
    return verification


def build_report(
    config: SimulationConfig, out: Path, outcome: RunOutcome, *, wall_seconds: float
) -> dict[str, object]:
    """The run's results in the documented ``report.json`` format (extra keys are extensions)."""
    settings = config.privacy()
    with HistoryStore.open(out / STORE_DIR) as store:
        stats = store.stats()
        model_bytes = store.model_spec.nbytes
        privacy = None if settings is None else privacy_report(store, settings)
    unlearning = []
    for index, event in enumerate(outcome.unlearning):
        for client in event["clients"]:  # type: ignore[union-attr]
            unlearning.append(
                {
                    "client": client,
                    "round": event["round"],
                    "strategy": event["strategy"],
                    "exact": event.get("exact", event["strategy"] == "retrain"),
                    "seconds": event["seconds"],
                    "client_epochs": event["client_epochs"],
                    "test_accuracy_before": event["test_accuracy_before"],
                    "test_accuracy_after": event["test_accuracy_after"],
                    "unlearning_index": index,
                    "clients_unlearned_together": event["clients"],
                    "rounds_replayed": event["rounds_replayed"],
                    "base_version": event["base_version"],
                    "source_trajectory": event["source_trajectory"],
                    "trajectory": event["trajectory"],
                    "reference_trajectory": event.get("reference_trajectory"),
                    "retrain_seconds": event.get("retrain_seconds"),
                    "retrain_client_epochs": event.get("retrain_client_epochs"),
                }
            )
    rounds = [
        {k: entry.get(k) for k in ("round", "test_accuracy", "test_loss", "trajectory", "participants", "seconds")}
        for entry in outcome.timeline
    ]
    return {
        "config": config.to_json(),
        "federation_id": federation_id(config),
        "rounds": rounds,
        "final_test_accuracy": rounds[-1]["test_accuracy"] if rounds else None,
        "store": {
            "path": str(out / STORE_DIR),
            "bytes": stats.bytes,
            "client_rounds": stats.client_rounds,
            "retained_updates": stats.retained_updates,
            "update_blobs": stats.update_blobs,
            "model_bytes_fp32": model_bytes,
            "update_bytes": stats.update_bytes,
            "update_bytes_per_client_round": (
                stats.update_bytes / stats.update_blobs if stats.update_blobs else 0.0
            ),
        },
        "unlearning": unlearning,
        "resumed_from_round": outcome.resumed_from,
        "wall_seconds": wall_seconds,
        "training_problem": training_problem(rounds, NUM_CLASSES),
        "privacy": privacy,
    }


def privacy_report(store: HistoryStore, settings: PrivacySettings) -> dict[str, object]:
    """``report.json``'s ``privacy``: ε over every DP release, and over the original training alone."""
    report = privacy_account(store, settings).to_json()
    report["epsilon_original_training"] = privacy_account(store, settings, trajectories={1}).epsilon
    return report
