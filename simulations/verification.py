"""Evidence of forgetting for every unlearning of a simulated run.

For each unlearning the figures are measured on three models of the same run:
the *original* global model (before the withdrawal, still holding the client),
the *unlearned* one the strategy produced, and the *exact retrain* (the same
federation replayed without the client), which is the only fair reference. A
figure for the unlearned model means little on its own; its distance to the
retrain's is what says whether forgetting happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedforget.arrays import Arrays, save_arrays
from fedforget.evidence.backdoor import Trigger, attack_success_rate, natural_target_rate
from fedforget.evidence.distance import accuracy, mean_js_divergence, parameter_l2
from fedforget.evidence.forgetting import class_accuracy, over_forgetting_of
from fedforget.ensemble import model_from_served_arrays
from fedforget.evidence.membership import (
    AttackResult,
    lira_offline,
    population_attack,
    train_shadow_models,
)
from fedforget.server.store.history_store import HistoryStore
from fedforget.simulations.config import NUM_CLASSES, SimulationConfig
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.learning import evidence_problem
from fedforget.simulations.models import build_model
from fedforget.simulations.run_dir import clients_label
from fedforget.simulations.task import DataSettings, clean_client_arrays, mislabelled_canaries, unseen_mislabelled

MODEL_ROLES = ("original", "unlearned", "retrain")
SHADOW_POOL_LIMIT = 4000
"""Shadow models train on at most this many pooled examples (keeps MNIST affordable)."""


@dataclass(frozen=True)
class EvidenceData:
    """Who is forgotten, what they trained on, and what nobody trained on."""

    members: tuple[np.ndarray, np.ndarray]
    nonmembers: tuple[np.ndarray, np.ndarray]
    remaining: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    canaries: tuple[np.ndarray, np.ndarray] | None = None
    """The forgotten clients' mislabelled canaries, under the labels they trained them with (None: none planted)."""
    unseen_canaries: tuple[np.ndarray, np.ndarray] | None = None
    """Test examples under wrong labels drawn alike: the canaries' non-members."""


def model_from_arrays(spec: str, arrays: Arrays) -> nn.Module:
    """The model ``arrays`` hold, in eval mode: one ``spec`` model, or a sharded federation's ensemble of them."""
    return model_from_served_arrays(arrays, lambda: build_model(spec, seed=0))


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def evidence_data(settings: DataSettings, forgotten: list[str], withdrawn_so_far: set[str]) -> EvidenceData:
    """Members: the forgotten clients' genuine training examples; non-members: held-out test data.

    A client's canaries, backdoored or mislabelled, are left out of the
    membership and accuracy figures: a clean model misclassifies them, which
    would read as "not a member" for the wrong reason. A backdoor is measured
    by its attack success rate; mislabelled canaries by attacks of their own,
    against test examples given wrong labels the same way.
    """
    data = load_dataset(settings.dataset)
    members = _concat([clean_client_arrays(settings, int(c)) for c in forgotten])
    staying = [c for c in range(settings.num_clients) if str(c) not in withdrawn_so_far]
    remaining = _concat([clean_client_arrays(settings, c) for c in staying])
    test = (np.array(data.x_test), np.array(data.y_test))
    if not settings.canaries:
        return EvidenceData(members=members, nonmembers=test, remaining=remaining, test=test)
    canaries = _concat([mislabelled_canaries(settings, int(c)) for c in forgotten])
    return EvidenceData(
        members=members, nonmembers=test, remaining=remaining, test=test,
        canaries=canaries, unseen_canaries=unseen_mislabelled(settings),
    )


def model_figures(
    model: nn.Module,
    data: EvidenceData,
    trigger: Trigger | None,
    shadows: list[nn.Module],
) -> tuple[dict[str, object], dict[str, AttackResult]]:
    """The figures of one model, plus the attack results (with ROC curves) for the plots.

    ``class_accuracy`` (test accuracy per class) and ``remaining_accuracy``
    (on the staying clients' data) are what over-forgetting is judged by.
    """
    population = population_attack(model, data.members, data.nonmembers)
    attacks = {"population": population}
    figures: dict[str, object] = {
        "test_accuracy": accuracy(model, *data.test),
        "class_accuracy": class_accuracy(model, *data.test, NUM_CLASSES),
        "forget_accuracy": accuracy(model, *data.members),
        "remaining_accuracy": accuracy(model, *data.remaining),
        "backdoor_asr": None if trigger is None else attack_success_rate(model, *data.test, trigger),
        "natural_target_rate": None if trigger is None else natural_target_rate(model, *data.test, trigger),
        "mia_auc": population.auc,
        "mia_advantage": population.advantage,
        "mia_tpr_at_1pct_fpr": population.tpr_at_1pct_fpr,
        "lira_auc": None,
        "lira_tpr_at_1pct_fpr": None,
    }
    if shadows:
        lira = lira_offline(model, shadows, data.members, data.nonmembers)
        attacks["lira"] = lira
        figures["lira_auc"] = lira.auc
        figures["lira_tpr_at_1pct_fpr"] = lira.tpr_at_1pct_fpr
    if data.canaries is not None and data.unseen_canaries is not None:
        figures.update(_canary_figures(model, data.canaries, data.unseen_canaries, shadows, attacks))
    return figures, attacks


def _canary_figures(
    model: nn.Module,
    canaries: tuple[np.ndarray, np.ndarray],
    unseen: tuple[np.ndarray, np.ndarray],
    shadows: list[nn.Module],
    attacks: dict[str, AttackResult],
) -> dict[str, object]:
    """How much the model memorised the forgotten clients' mislabelled canaries, and how well attacks find them.

    ``canary_fit`` is the share of canaries the model predicts with the wrong
    label they were trained under: only memorisation gets there, so a model
    that never saw them stays near chance (1/9 of the other classes at most).
    """
    population = population_attack(model, canaries, unseen)
    attacks["canary-population"] = population
    figures: dict[str, object] = {
        "canary_fit": accuracy(model, *canaries),
        "canary_mia_auc": population.auc,
        "canary_mia_tpr_at_1pct_fpr": population.tpr_at_1pct_fpr,
        "canary_lira_auc": None,
        "canary_lira_tpr_at_1pct_fpr": None,
    }
    if shadows:
        lira = lira_offline(model, shadows, canaries, unseen)
        attacks["canary-lira"] = lira
        figures["canary_lira_auc"] = lira.auc
        figures["canary_lira_tpr_at_1pct_fpr"] = lira.tpr_at_1pct_fpr
    return figures


def verify_run(
    config: SimulationConfig, settings: DataSettings, out: Path, report: dict[str, object]
) -> tuple[dict[str, object], dict[str, dict[str, dict[str, AttackResult]]]]:
    """Measure every unlearning of the run in ``out``; publish the models for client-side checks.

    Returns the verification document and, per unlearning, the attack results
    with their ROC curves (for plots).
    """
    with HistoryStore.open(out / "store") as store:
        return verify_events(config, settings, out, events_of(report), lambda event: event_models(store, event))


ModelsOfEvent = Callable[[dict[str, object]], dict[str, Arrays]]
"""The original, unlearned and retrained served model of one unlearning event, by role."""


def event_models(store: HistoryStore, event: dict[str, object]) -> dict[str, Arrays]:
    """The three models of ``event`` as ``store`` holds them, at the version before the withdrawal."""
    version = int(event["round"]) - 1  # type: ignore[call-overload]
    original = store.reader(int(event["source_trajectory"])).model(version)  # type: ignore[call-overload]
    unlearned = store.reader(int(event["trajectory"])).model(version)  # type: ignore[call-overload]
    # An exact strategy (retrain, emptying a shard): its unlearned model *is* the retrained one.
    reference = event.get("reference_trajectory")
    if reference is None and not event.get("exact", event["strategy"] == "retrain"):
        raise ValueError(
            f"the {event['strategy']} unlearning of client(s) {event['clients']} has no reference retrain "
            "to be judged against; run it with reference_retrain enabled"
        )
    retrain = unlearned if reference is None else store.reader(int(reference)).model(version)  # type: ignore[call-overload]
    return {"original": original, "unlearned": unlearned, "retrain": retrain}


def verify_events(
    config: SimulationConfig,
    settings: DataSettings,
    out: Path,
    events: list[dict[str, object]],
    models_of: ModelsOfEvent,
) -> tuple[dict[str, object], dict[str, dict[str, dict[str, AttackResult]]]]:
    """Measure each unlearning in ``events`` on the served models ``models_of`` gives (one model or an ensemble)."""
    torch.set_num_threads(1)
    trigger = config.trigger() if config.backdoors else None
    entries: list[dict[str, object]] = []
    curves: dict[str, dict[str, dict[str, AttackResult]]] = {}
    withdrawn: set[str] = set()
    for event in events:
        forgotten = list(event["clients"])  # type: ignore[call-overload]
        withdrawn.update(forgotten)
        arrays = models_of(event)
        label = clients_label(forgotten)
        for role, model_arrays in arrays.items():
            save_arrays(out / "models" / f"{role}-client{label}-round{event['round']}.npz", model_arrays)
        data = evidence_data(settings, forgotten, withdrawn)
        _export_client_files(out, settings, forgotten, data.nonmembers)
        shadow_seconds, shadows = _shadows(config, data)
        started = time.perf_counter()
        modules = {role: model_from_arrays(config.model_spec, model_arrays) for role, model_arrays in arrays.items()}
        figures: dict[str, object] = {}
        curves[label] = {}
        for role, module in modules.items():
            figures[role], curves[label][role] = model_figures(module, data, trigger, shadows)
        entry = {
            "client": label,
            "clients": forgotten,
            "round": event["round"],
            "strategy": event["strategy"],
            "backdoored": [c for c in forgotten if c in config.backdoors],
            "meaningless": evidence_problem(
                {role: figures[role]["test_accuracy"] for role in MODEL_ROLES}, NUM_CLASSES  # type: ignore[index]
            ),
            **figures,
            # Under-forgetting shows in the backdoor ASR and membership AUC; forgetting too much shows here.
            "over_forgetting": over_forgetting_of(figures["unlearned"], figures["retrain"]).to_json(),  # type: ignore[arg-type]
            "distance_to_retrain": {
                "l2": _l2_between_served(arrays["unlearned"], arrays["retrain"]),
                "js": mean_js_divergence(modules["unlearned"], modules["retrain"], data.test[0]),
                "original_l2": _l2_between_served(arrays["original"], arrays["retrain"]),
                "original_js": mean_js_divergence(modules["original"], modules["retrain"], data.test[0]),
            },
            "evidence_seconds": time.perf_counter() - started,
            "shadow_models": len(shadows),
            "shadow_training_seconds": shadow_seconds,
            "members": int(len(data.members[1])),
            "canaries": 0 if data.canaries is None else int(len(data.canaries[1])),
            "nonmembers": int(len(data.nonmembers[1])),
        }
        if "shard" in event:
            entry["shard"] = event["shard"]
        entries.append(entry)
    document = {
        "seed": config.seed,
        "trigger": None if trigger is None else trigger.__dict__,
        "backdoor_clients": list(config.backdoors),
        "unlearning": entries,
    }
    return document, curves


def _export_client_files(
    out: Path, settings: DataSettings, clients: list[str], holdout: tuple[np.ndarray, np.ndarray]
) -> None:
    """Each simulated client's own copy of its data, for ``fedforget client verify``."""
    for client in clients:
        x, y = clean_client_arrays(settings, int(client))
        save_arrays(out / "clients" / client / "train.npz", {"x": x, "y": y})
        save_arrays(out / "clients" / client / "holdout.npz", {"x": holdout[0], "y": holdout[1]})


def _l2_between_served(a: Arrays, b: Arrays) -> float | None:
    """Parameter distance, or None between ensembles of different shards (an emptied shard left one of them).

    Such models have no parameters in common to compare; their outputs still
    are (the JS divergence beside it).
    """
    if set(a) != set(b) and all(name.startswith("shard") for name in [*a, *b]):
        return None
    return parameter_l2(a, b)


def events_of(report: dict[str, object]) -> list[dict[str, object]]:
    """One entry per unlearning (the report repeats it per client withdrawn together)."""
    seen: dict[int, dict[str, object]] = {}
    for entry in report["unlearning"]:  # type: ignore[union-attr]
        index = int(entry["unlearning_index"])
        seen.setdefault(index, {**entry, "clients": entry["clients_unlearned_together"]})
    return [seen[i] for i in sorted(seen)]


def _shadows(config: SimulationConfig, data: EvidenceData) -> tuple[float, list[nn.Module]]:
    """Offline-LiRA shadows trained centrally on the staying clients' data, never on members or test data."""
    if config.shadows == 0:
        return 0.0, []
    started = time.perf_counter()
    x, y = data.remaining
    if len(y) > SHADOW_POOL_LIMIT:
        pick = np.random.default_rng(config.seed).choice(len(y), SHADOW_POOL_LIMIT, replace=False)
        x, y = x[pick], y[pick]
    shadows = train_shadow_models(
        lambda: build_model(config.model_spec, seed=None),
        x,
        y,
        count=config.shadows,
        epochs=min(config.rounds * config.local_epochs, 20.0),
        lr=config.lr,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    return time.perf_counter() - started, shadows


def aggregate_seeds(documents: list[dict[str, object]]) -> dict[str, object]:
    """Mean and standard deviation over seeds of every figure (the retrain band)."""
    first = documents[0]
    entries = []
    for index, entry in enumerate(first["unlearning"]):  # type: ignore[arg-type]
        per_seed = [doc["unlearning"][index] for doc in documents]  # type: ignore[index]
        combined: dict[str, object] = {
            key: entry[key] for key in ("client", "clients", "round", "strategy", "backdoored", "shard") if key in entry
        }
        flagged = [(doc["seed"], e["meaningless"]) for doc, e in zip(documents, per_seed) if e.get("meaningless")]
        combined["meaningless"] = (
            "; ".join(text if len(documents) == 1 else f"seed {seed}: {text}" for seed, text in flagged) or None
        )
        for role in (*MODEL_ROLES, "distance_to_retrain"):
            combined[role] = _mean_std([seed_entry[role] for seed_entry in per_seed])
        # The verdict on the mean figures, like the bench's; and how many seeds were flagged on their own.
        verdict = over_forgetting_of(combined["unlearned"], combined["retrain"]).to_json()  # type: ignore[arg-type]
        verdict["seeds_flagged"] = sum(bool(e["over_forgetting"]["flagged"]) for e in per_seed)
        combined["over_forgetting"] = verdict
        # The counts a TPR at 1 % FPR is read against, beside the timings.
        for key in ("evidence_seconds", "shadow_training_seconds", "members", "canaries", "nonmembers"):
            if key in entry:
                combined.update(_mean_std([{key: seed_entry[key]} for seed_entry in per_seed]))
        entries.append(combined)
    return {
        "seeds": [doc["seed"] for doc in documents],
        "trigger": first["trigger"],
        "backdoor_clients": first["backdoor_clients"],
        "unlearning": entries,
        "per_seed": documents,
    }


def _mean_std(values: list[dict[str, object]]) -> dict[str, object]:
    """Mean and std of every figure over seeds; a list (per-class accuracy) element by element."""
    summary: dict[str, object] = {}
    for key in values[0]:
        if isinstance(values[0][key], list):
            columns = list(zip(*(v[key] for v in values)))  # type: ignore[call-overload]
            means = [_mean_std([{"x": n} for n in column]) for column in columns]
            summary[key] = [m["x"] for m in means]
            summary[f"{key}_std"] = [m["x_std"] for m in means]
            continue
        numbers = [v[key] for v in values]
        if any(n is None for n in numbers):
            summary[key] = summary[f"{key}_std"] = None
            continue
        array = np.asarray(numbers, dtype=float)
        summary[key] = float(array.mean())
        summary[f"{key}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return summary
