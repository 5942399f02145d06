"""``fedforget bench unlearning``: every strategy against exact retraining, side by side, judged by what a user pays.

Per (dataset, partition, seed), one simulation session trains a federation
with history, then unlearns the same backdoored client with every variant in
turn, each from the same recorded history into a trajectory of its own;
exact retraining is one of them and the yardstick. Figures are ratios and
gaps to the retrain of the same run, so machine noise and drift hit both
sides alike.

Cost is judged as a deployed user pays it. What a deployed federation waits
for is round trips (about 10 s each, however short the clients' training:
`fedforget bench deployment`), so besides client epochs the bench counts
round trips and models the deployed wall time of every variant as
``round_trips × round_cost + server_seconds``, with the server's own
computation measured in this run.

Every tunable setting of every strategy was chosen on digits (the quick
run); MNIST and Fashion-MNIST are held out, measured by the full run.

``--store-dtype`` (e.g. ``int8``, ``topk:0.05``) and ``--retention-interval``
record the history as a deployment with that setting would, so the figures
say what a lossy or thinned history costs every strategy that reads it
(retrain reads nothing, so its figures are the same yardstick); ``store``
in ``bench.json`` gives the update bytes per client-round against the fp32
model's bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.table import Table

from fedforget.client.app import make_client_app, model_arrays
from fedforget.evidence.distance import mean_js_divergence, parameter_l2
from fedforget.evidence.forgetting import CLASS_DROP_PTS, FORGET_GAP_PTS, over_forgetting_of
from fedforget.files import ensure_writable_dir, write_bytes_atomic, write_json_atomic
from fedforget.server.rounds.loop import FederatedRun, RunSettings
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.simulations.bench_markdown import TARGETS, bench_markdown
from fedforget.simulations.config import NUM_CLASSES, SimulationConfig
from fedforget.simulations.models import build_model
from fedforget.simulations.ray_engine import quiet_engines, run_on_ray
from fedforget.simulations.runner import data_settings, privacy_report
from fedforget.simulations.task import SimulationTask
from fedforget.simulations.verification import evidence_data, model_figures, model_from_arrays
from fedforget.strategies.registry import StrategyChoice

DEPLOYED_ROUND_SECONDS = 9.7
"""A deployed round trip with 3 organisations over TLS, measured by ``fedforget bench deployment``
(9.56 s and 9.78 s in two runs on a 2-core machine); ``--round-cost`` overrides it."""

METRICS = (
    "round_trips_ratio",
    "client_epochs_ratio",
    "modelled_deployment_speedup",
    "speedup_vs_retrain",
    "accuracy_gap_pts",
    "forget_accuracy_gap_pts",
    "remaining_accuracy_gap_pts",
    "worst_class_drop_pts",
    "backdoor_asr",
    "retrain_backdoor_asr",
    "mia_auc",
    "retrain_mia_auc",
    "mia_auc_gap",
    "l2_to_retrain",
    "js_to_retrain",
    "round_trips",
    "client_epochs",
    "seconds",
    "server_seconds",
)


@dataclass(frozen=True)
class Variant:
    """One strategy with settings, under the label the bench reports it by."""

    label: str
    choice: StrategyChoice

    @classmethod
    def of(cls, label: str, strategy: str, **settings: object) -> Variant:
        return cls(label, StrategyChoice(strategy, {k.replace("_", "-"): v for k, v in settings.items()}))


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant.of("retrain", "retrain"),
    Variant.of("subtract", "subtract"),
    Variant.of("subtract-2", "subtract", recovery_rounds=2),
    Variant.of("replay", "replay"),
    Variant.of("replay-lbfgs", "replay", estimate="lbfgs", warmup_rounds=2),
    Variant.of("replay-crab", "replay", select_fraction=0.5),
    Variant.of("calibrated", "calibrated"),
    Variant.of("fedrecovery", "fedrecovery"),
    Variant.of("gradient-ascent", "gradient-ascent"),
    Variant.of("relabel", "relabel"),
    Variant.of("misdirect", "misdirect"),
)
"""Every strategy with its defaults, plus the variants the README's tables discuss."""

CALIBRATED_GRID: tuple[Variant, ...] = tuple(
    Variant.of(f"calibrated-dt{dt}-r{r:g}", "calibrated", calibration_interval=dt, calibration_ratio=r)
    for dt in (1, 2)
    for r in (0.5, 1.0)
)
"""FedEraser's Δt × r trade-off (the quick run adds it)."""

PARTITIONS: tuple[tuple[str, float], ...] = (("iid", 0.5), ("dirichlet", 0.3))


@dataclass(frozen=True)
class BenchRun:
    """One federation every variant unlearns from, and which client withdraws."""

    config: SimulationConfig
    client: str = "3"

    @property
    def label(self) -> str:
        partition = self.config.partition if self.config.partition == "iid" else f"dirichlet α={self.config.alpha:g}"
        return f"{self.config.dataset}, {partition}"


def quick_run(partition: str = "iid", alpha: float = 0.5) -> BenchRun:
    """Digits, ten clients, one backdoored client withdrawn after 15 rounds: where settings are chosen."""
    return BenchRun(SimulationConfig(dataset="digits", clients=10, rounds=15, backdoors=("3",), shadows=0,
                                     partition=partition, alpha=alpha))


def held_out_run(dataset: str, partition: str = "iid", alpha: float = 0.5) -> BenchRun:
    """MNIST or Fashion-MNIST with the simulation's own training defaults for them, on a 40 % subsample.

    The training defaults (lr, batch size, local epochs) are the ones
    ``fedforget simulate`` uses, which were chosen without looking at MNIST
    or Fashion-MNIST. The subsample (20k of MNIST's 50k, 24k of
    Fashion-MNIST's 60k training images) keeps the full run to a few hours on
    2 cores; 15 rounds as in the quick run, so retraining replays 15 rounds.
    """
    config = SimulationConfig(dataset=dataset, clients=10, rounds=15, backdoors=("3",), shadows=0,
                              partition=partition, alpha=alpha, train_fraction=0.4)
    return BenchRun(config)


@dataclass(frozen=True)
class BenchPlan:
    """Which federations, which variants, how many seeds, and the deployed round cost to model with."""

    runs: tuple[BenchRun, ...]
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    seeds: int = 3
    round_cost: float = DEPLOYED_ROUND_SECONDS
    full: bool = False

    def with_history(self, store_dtype: str, retention_interval: int) -> BenchPlan:
        """The same plan recording every federation's history with this update encoding and Δt."""
        runs = tuple(
            replace(run, config=replace(run.config, store_dtype=store_dtype, retention_interval=retention_interval))
            for run in self.runs
        )
        return replace(self, runs=runs)

    @classmethod
    def quick(cls, seeds: int = 3) -> BenchPlan:
        return cls(runs=(quick_run(),), variants=DEFAULT_VARIANTS + CALIBRATED_GRID, seeds=seeds)

    @classmethod
    def full_plan(cls, seeds: int = 3, datasets: Sequence[str] = ("digits", "mnist", "fashion-mnist")) -> BenchPlan:
        runs = tuple(
            quick_run(partition, alpha) if dataset == "digits" else held_out_run(dataset, partition, alpha)
            for dataset in datasets
            for partition, alpha in PARTITIONS
        )
        return cls(runs=runs, seeds=seeds, full=True)

    def with_privacy(
        self, dp: str | None, noise_multiplier: float | None, clipping_norm: float | None,
        target_epsilon: float | None = None,
    ) -> BenchPlan:
        """The same plan trained with differential privacy: every variant, the retrain included, runs under it.

        The DP settings are :class:`SimulationConfig` fields, so the bench
        trains and retrains exactly as ``fedforget simulate --dp`` does and
        :meth:`check` validates them the same way.
        """
        return replace(self, runs=tuple(
            replace(run, config=replace(
                run.config, dp=dp, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                target_epsilon=target_epsilon,
            ))
            for run in self.runs
        ))

    def only(self, labels: Sequence[str]) -> BenchPlan:
        """The same plan with only the named variants (and retrain, the yardstick), in the plan's order."""
        known = [v.label for v in self.variants]
        unknown = [label for label in labels if label not in known]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; this plan has: {', '.join(known)}")
        wanted = {"retrain", *labels}
        return replace(self, variants=tuple(v for v in self.variants if v.label in wanted))

    def check(self) -> None:
        labels = [v.label for v in self.variants]
        if "retrain" not in labels:
            raise ValueError("the bench judges every variant against retrain: keep the retrain variant")
        if len(set(labels)) != len(labels):
            raise ValueError(f"variant labels must be unique, got {labels}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if not self.round_cost > 0:
            raise ValueError(f"--round-cost must be positive, got {self.round_cost}")
        for run in self.runs:
            run.config.validate()


# --------------------------------------------------------------------------- one session


def _unlearn_every_way(
    run: BenchRun, variants: Sequence[Variant], out: Path
) -> tuple[dict[str, dict[str, object]], dict[str, float]]:
    """Train once with history, then unlearn the same client with every variant (one simulation session).

    Returns each variant's measured cost, and the recorded history's size
    (:func:`_history_size`) before any unlearning added to it.
    """
    config = run.config
    initial = model_arrays(build_model(config.model_spec, seed=config.seed))
    context = config.unlearning_context()
    results: dict[str, dict[str, object]] = {}
    history: dict[str, float] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, _: Context) -> None:
        with HistoryStore.create(
            out / "store", federation_id=f"bench-{config.seed}", model_spec=ModelSpec.from_arrays(initial),
            retention_interval=config.retention_interval, update_dtype=config.store_dtype,
        ) as store:
            strategy = RecordingFedAvg(
                store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, privacy=config.privacy()
            )
            federated = FederatedRun(
                grid, store, strategy, StrategyChoice("retrain").build(context),
                RunSettings(
                    num_rounds=config.rounds,
                    train_config={"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size},
                    seed=config.seed,
                    expected_clients=config.clients,
                ),
            )
            federated.execute(initial)
            history.update(_history_size(store))
            source = store.current_trajectory()
            strategy.exclude([run.client])
            for variant in variants:
                outcome, seconds, trajectory = federated.run_unlearner(
                    variant.choice.build(context), [run.client], config.rounds, source
                )
                results[variant.label] = {
                    "seconds": seconds,
                    "server_seconds": outcome.server_seconds,
                    "client_epochs": outcome.client_epochs,
                    "round_trips": outcome.round_trips,
                    "trajectory": trajectory,
                }
            store.switch_trajectory(source)

    run_on_ray(
        server_app=app,
        client_app=make_client_app(SimulationTask(data_settings(config), model_seed=config.seed)),
        num_supernodes=config.clients,
        verbose=False,
    )
    missing = [v.label for v in variants if v.label not in results]
    if missing:
        raise RuntimeError(f"the benchmark session ended early; variants not measured: {missing}")
    return results, history


def _history_size(store: HistoryStore) -> dict[str, float]:
    """Stored update bytes per client-round (Δt's unstored rounds count as 0), and that over the fp32 model's bytes."""
    stats = store.stats()
    per_client_round = stats.update_bytes / max(stats.client_rounds, 1)
    return {
        "update_bytes_per_client_round": per_client_round,
        "fp32_model_bytes": float(store.model_spec.nbytes),
        "bytes_ratio_to_fp32": per_client_round / store.model_spec.nbytes,
        "client_rounds": float(stats.client_rounds),
        "retained_updates": float(stats.retained_updates),
    }


def _figures(
    run: BenchRun, out: Path, measured: dict[str, dict[str, object]], round_cost: float
) -> dict[str, dict[str, float]]:
    """Every variant's figures relative to the exact retrain of the same session."""
    config = run.config
    data = evidence_data(data_settings(config), [run.client], {run.client})
    trigger = config.trigger() if config.backdoors else None
    with HistoryStore.open(out / "store") as store:
        models = {
            label: store.reader(int(m["trajectory"])).model(config.rounds)  # type: ignore[call-overload]
            for label, m in measured.items()
        }
    modules = {label: model_from_arrays(config.model_spec, arrays) for label, arrays in models.items()}
    figures = {label: _model_figures(module, data, trigger) for label, module in modules.items()}
    retrain, base = figures["retrain"], _costs(measured["retrain"])

    def deployed(cost: dict[str, float]) -> float:
        return cost["round_trips"] * round_cost + cost["server_seconds"]

    table: dict[str, dict[str, float]] = {}
    for label, mine in figures.items():
        cost = _costs(measured[label])
        table[label] = {
            "round_trips_ratio": cost["round_trips"] / base["round_trips"],
            "client_epochs_ratio": cost["client_epochs"] / base["client_epochs"],
            "modelled_deployment_speedup": deployed(base) / deployed(cost),
            "speedup_vs_retrain": base["seconds"] / cost["seconds"],
            "accuracy_gap_pts": 100 * (float(retrain["test_accuracy"]) - float(mine["test_accuracy"])),  # type: ignore[arg-type]
            "forget_accuracy_gap_pts": 100 * (float(retrain["forget_accuracy"]) - float(mine["forget_accuracy"])),  # type: ignore[arg-type]
            "forget_accuracy": float(mine["forget_accuracy"]),  # type: ignore[arg-type]
            "retrain_forget_accuracy": float(retrain["forget_accuracy"]),  # type: ignore[arg-type]
            "remaining_accuracy_gap_pts": (
                100 * (float(retrain["remaining_accuracy"]) - float(mine["remaining_accuracy"]))  # type: ignore[arg-type]
            ),
            **_over_forgetting_figures(mine, retrain),
            "backdoor_asr": float(mine["backdoor_asr"] or 0.0),  # type: ignore[arg-type]
            "retrain_backdoor_asr": float(retrain["backdoor_asr"] or 0.0),  # type: ignore[arg-type]
            "mia_auc": float(mine["mia_auc"]),  # type: ignore[arg-type]
            "retrain_mia_auc": float(retrain["mia_auc"]),  # type: ignore[arg-type]
            "mia_auc_gap": float(mine["mia_auc"]) - float(retrain["mia_auc"]),  # type: ignore[arg-type]
            "l2_to_retrain": parameter_l2(models[label], models["retrain"]),
            "js_to_retrain": (
                mean_js_divergence(modules[label], modules["retrain"], data.test[0])
                if np.isfinite(float(mine["test_accuracy"])) else float("nan")  # type: ignore[arg-type]
            ),
            **cost,
        }
    return table


def _over_forgetting_figures(mine: dict[str, object], retrain: dict[str, object]) -> dict[str, float]:
    """The over-forgetting judgement of one seed: the two measures it uses, and the flag (1.0 or 0.0)."""
    judged = over_forgetting_of(mine, retrain)
    return {
        "worst_class_drop_pts": judged.worst_class_drop_pts,
        "class_accuracy_min": min((a for a in mine["class_accuracy"] if a is not None), default=float("nan")),  # type: ignore[attr-defined]
        "over_forgetting_seed": 1.0 if judged.flagged else 0.0,
    }


def _model_figures(module: object, data: object, trigger: object) -> dict[str, object]:
    """The evidence figures of one model; NaN throughout for a model whose weights diverged."""
    import torch

    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):  # type: ignore[attr-defined]
        nan = float("nan")
        return {"test_accuracy": nan, "forget_accuracy": nan, "remaining_accuracy": nan, "backdoor_asr": nan,
                "mia_auc": nan, "class_accuracy": [nan] * NUM_CLASSES}
    return model_figures(module, data, trigger, [])[0]  # type: ignore[arg-type]


def _costs(measured: dict[str, object]) -> dict[str, float]:
    return {key: float(measured[key]) for key in ("round_trips", "client_epochs", "seconds", "server_seconds")}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the plan


@dataclass
class RunResult:
    """One federation's figures: mean ± std over seeds, and each seed's."""

    run: BenchRun
    summary: dict[str, dict[str, float]]
    per_seed: list[dict[str, dict[str, float]]] = field(default_factory=list)
    privacy: list[dict[str, object]] = field(default_factory=list)
    """Each seed's DP account (as ``report.json``'s ``privacy``); empty without ``--dp``."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Each seed's recorded history size (:func:`_history_size`)."""

    def to_json(self) -> dict[str, object]:
        return {
            "dataset": self.run.config.dataset,
            "partition": self.run.config.partition,
            "alpha": self.run.config.alpha if self.run.config.partition == "dirichlet" else None,
            "config": self.run.config.to_json(),
            "client": self.run.client,
            "strategies": self.summary,
            "per_seed": self.per_seed,
            "privacy": self.privacy or None,
            "store": {
                "update_encoding": self.run.config.store_dtype,
                "retention_interval": self.run.config.retention_interval,
                **(mean_std(self.history) if self.history else {}),
            },
        }


def run_unlearning_benchmark(plan: BenchPlan, out: Path, console: Console | None = None) -> dict[str, object]:
    """Measure every variant on every federation over ``plan.seeds`` seeds; write ``OUT/bench.json`` and plots."""
    console = console or Console(width=200)  # the comparison table is wide
    plan.check()
    out = ensure_writable_dir(out)
    quiet_engines()
    results: list[RunResult] = []
    for number, run in enumerate(plan.runs, start=1):
        per_seed: list[dict[str, dict[str, float]]] = []
        privacy: list[dict[str, object]] = []
        sizes: list[dict[str, float]] = []
        for index in range(plan.seeds):
            seeded = replace(run, config=replace(run.config, seed=run.config.seed + index))
            console.print(
                f"[bold]{run.label}[/] (federation {number} of {len(plan.runs)}), seed {seeded.config.seed} "
                f"({index + 1} of {plan.seeds}): train {run.config.rounds} rounds, then unlearn client {run.client} "
                f"{len(plan.variants)} ways"
            )
            workdir = Path(tempfile.mkdtemp(prefix=f"{run.config.dataset}-{run.config.partition}-{seeded.config.seed}-",
                                            dir=out))
            measured, size = _unlearn_every_way(seeded, plan.variants, workdir)
            sizes.append(size)
            per_seed.append(_figures(seeded, workdir, measured, plan.round_cost))
            settings = seeded.config.privacy()
            if settings is not None:
                with HistoryStore.open(workdir / "store") as store:
                    privacy.append(privacy_report(store, settings))
        result = RunResult(
            run, {label: summarise([s[label] for s in per_seed]) for label in per_seed[0]}, per_seed, privacy, sizes
        )
        results.append(result)
        print_table(console, result, plan.seeds)
        for account in privacy:
            console.print(f"DP {account['mechanism']}: ε = {account['epsilon_original_training']:.3g} over the original "
                          f"training, {account['epsilon']:.3g} over every release (δ = {account['delta']:g})")
        if plan.full and number < len(plan.runs):  # hours of work: keep what is measured if the run stops
            write_json_atomic(out / "bench.json", _document(plan, results, complete=False))
            console.print(f"bench so far ({number} of {len(plan.runs)} federations): {out / 'bench.json'}")
    document = _document(plan, results, complete=True)
    write_json_atomic(out / "bench.json", document)
    write_bytes_atomic(out / "bench.md", bench_markdown(document).encode())
    plot_path = out / ("pareto.png" if plan.full else "bench.png")
    plot_pareto(plot_path, results)
    console.print(f"bench: {out / 'bench.json'}, tables: {out / 'bench.md'}, plot: {plot_path}")
    return document


def _document(plan: BenchPlan, results: list[RunResult], complete: bool) -> dict[str, object]:
    """``bench.json``: the plan and every federation measured so far (``complete`` once all are)."""
    document: dict[str, object] = {
        "complete": complete,
        "seeds": plan.seeds,
        "round_cost_seconds": plan.round_cost,
        "variants": {v.label: v.choice.to_json() for v in plan.variants},
        "chosen_on": "digits",
        "held_out": sorted({r.run.config.dataset for r in results} - {"digits"}),
    }
    if plan.full:
        document["runs"] = [r.to_json() for r in results]
    else:
        (only,) = results
        document.update(only.to_json())
    return document


def summarise(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean ± std over seeds, and the over-forgetting verdict on those means.

    ``over_forgetting`` (a bool in ``bench.json``) judges the mean forget-set
    gap and the mean worst-class drop against the thresholds of
    :mod:`fedforget.evidence.forgetting`; ``over_forgetting_seeds`` counts
    the seeds flagged on their own.
    """
    summary: dict[str, object] = dict(mean_std(per_seed))
    flagged = [s.get("over_forgetting_seed", 0.0) for s in per_seed]
    for key in ("over_forgetting_seed", "over_forgetting_seed_std"):
        summary.pop(key, None)
    summary["over_forgetting_seeds"] = int(sum(flagged))
    summary["over_forgetting"] = bool(
        summary["forget_accuracy_gap_pts"] > FORGET_GAP_PTS or summary["worst_class_drop_pts"] > CLASS_DROP_PTS  # type: ignore[operator]
    )
    return summary  # type: ignore[return-value]


def mean_std(values: list[dict[str, float]]) -> dict[str, float]:
    result: dict[str, float] = {}
    for key in values[0]:
        array = np.asarray([v[key] for v in values], dtype=float)
        result[key] = float(array.mean())
        result[f"{key}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return result


_COLUMNS = (
    ("round_trips", "round trips", "{:.1f}"),
    ("round_trips_ratio", "trips / retrain", "{:.2f}"),
    ("client_epochs_ratio", "epochs / retrain", "{:.2f}"),
    ("modelled_deployment_speedup", "deployed speed-up", "{:.1f}x"),
    ("accuracy_gap_pts", "acc gap (pts)", "{:+.2f}"),
    ("backdoor_asr", "ASR", "{:.3f}"),
    ("mia_auc_gap", "MIA AUC - retrain", "{:+.3f}"),
    ("l2_to_retrain", "L2 to retrain", "{:.2f}"),
)


def print_table(console: Console, result: RunResult, seeds: int) -> None:
    retrain = result.summary["retrain"]
    table = Table(
        title=f"{result.run.label}: unlearning vs exact retraining (mean ± std over {seeds} seed{'s' * (seeds > 1)}; "
        f"retrain ASR {retrain['backdoor_asr']:.3f}, MIA AUC {retrain['mia_auc']:.3f}, "
        f"{retrain['round_trips']:.0f} round trips)",
        caption=f"Targets for the best approximate strategy: {TARGETS}.",
    )
    table.add_column("variant")
    for _, title, _ in _COLUMNS:
        table.add_column(title, justify="right")
    for label, figures in result.summary.items():
        table.add_row(label, *(f"{fmt.format(figures[key])} ± {fmt.format(figures[key + '_std']).lstrip('+')}"
                               for key, _, fmt in _COLUMNS))
    console.print(table)
    if result.history:
        size = mean_std(result.history)
        console.print(
            f"history: updates stored as {result.run.config.store_dtype}, Δt {result.run.config.retention_interval}: "
            f"{size['update_bytes_per_client_round']:.0f} bytes per client-round = "
            f"{size['bytes_ratio_to_fp32']:.3f} x the fp32 model ({size['fp32_model_bytes']:.0f} bytes)"
        )


def plot_pareto(path: Path, results: list[RunResult]) -> None:
    """Client round trips against backdoor ASR and against the accuracy gap, one marker per variant and run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    markers = "osD^v<>Ph*X"
    labels = list(results[0].summary)
    colours = plt.get_cmap("tab20")
    for ax, key, title in (
        (axes[0], "backdoor_asr", "backdoor attack success rate (lower is better)"),
        (axes[1], "accuracy_gap_pts", "test-accuracy gap to retrain, points (lower is better)"),
    ):
        for r_index, result in enumerate(results):
            for v_index, label in enumerate(labels):
                figures = result.summary[label]
                ax.errorbar(
                    figures["round_trips_ratio"], figures[key], yerr=figures[f"{key}_std"],
                    marker=markers[r_index % len(markers)], color=colours(v_index % 20), capsize=3, linestyle="none",
                    label=label if r_index == 0 else None,
                )
        ax.axvline(0.25, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("client round trips / retrain's (lower is faster)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    handles, names = axes[0].get_legend_handles_labels()
    runs = ", ".join(f"{markers[i % len(markers)]} {r.run.label}" for i, r in enumerate(results))
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=8)
    fig.suptitle(f"Unlearning cost vs forgetting and accuracy (markers: {runs})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
