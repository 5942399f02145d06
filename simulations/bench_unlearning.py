"""``fedforget bench unlearning``: every strategy against exact retraining, side by side.

Per seed, one simulation session trains a federation with history, then
unlearns the same (backdoored) client with every strategy in turn, each from
the same recorded history, each into a trajectory of its own; exact retraining
is one of them and the yardstick. Figures are ratios and gaps to the retrain
of the same seed, so machine noise and drift hit both sides alike.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console
from rich.table import Table

from fedforget.client.app import make_client_app, model_arrays
from fedforget.files import ensure_writable_dir, write_json_atomic
from fedforget.server.rounds.loop import FederatedRun, RunSettings
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import data_settings, quiet_engines
from fedforget.simulations.task import SimulationTask
from fedforget.simulations.verification import evidence_data, model_figures, model_from_arrays
from fedforget.evidence.distance import mean_js_divergence, parameter_l2
from fedforget.strategies.registry import STRATEGY_NAMES, UnlearningOptions, make_unlearner

METRICS = (
    "speedup_vs_retrain",
    "client_epochs_ratio",
    "accuracy_gap_pts",
    "forget_accuracy_gap_pts",
    "backdoor_asr",
    "retrain_backdoor_asr",
    "mia_auc",
    "retrain_mia_auc",
    "l2_to_retrain",
    "js_to_retrain",
    "seconds",
    "client_epochs",
)


@dataclass(frozen=True)
class BenchSettings:
    """The federation every strategy unlearns from, and which client withdraws."""

    config: SimulationConfig
    client: str
    options: UnlearningOptions
    seeds: int = 3

    @classmethod
    def quick(cls) -> BenchSettings:
        """Digits, ten clients, one backdoored client withdrawn after 15 rounds: a few minutes."""
        config = SimulationConfig(dataset="digits", clients=10, rounds=15, backdoors=("3",), shadows=0,
                                  retention_interval=2)
        return cls(config=config, client="3", options=config.unlearning_options())

    @classmethod
    def headline(cls) -> BenchSettings:
        """MNIST, ten clients: the published comparison (tens of minutes per seed on 2 cores)."""
        config = SimulationConfig(dataset="mnist", clients=10, rounds=20, local_epochs=1.0, lr=0.05,
                                  batch_size=32, backdoors=("3",), shadows=0, retention_interval=2)
        return cls(config=config, client="3", options=config.unlearning_options())


def _unlearn_every_way(settings: BenchSettings, config: SimulationConfig, out: Path) -> dict[str, dict[str, object]]:
    """Train once with history, then unlearn the same client with every strategy (one session)."""
    from flwr.simulation import run_simulation

    initial = model_arrays(build_model(config.dataset, seed=config.seed))
    results: dict[str, dict[str, object]] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        with HistoryStore.create(
            out / "store", federation_id=f"bench-{config.seed}", model_spec=ModelSpec.from_arrays(initial),
            retention_interval=config.retention_interval,
        ) as store:
            strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
            run = FederatedRun(
                grid, store, strategy, make_unlearner("retrain", settings.options),
                RunSettings(
                    num_rounds=config.rounds,
                    train_config={"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size},
                    seed=config.seed,
                    expected_clients=config.clients,
                ),
            )
            run.execute(initial)
            source = store.current_trajectory()
            strategy.exclude([settings.client])
            for name in STRATEGY_NAMES:
                outcome, seconds, trajectory = run.run_unlearner(
                    make_unlearner(name, settings.options), [settings.client], config.rounds, source
                )
                results[name] = {"seconds": seconds, "client_epochs": outcome.client_epochs, "trajectory": trajectory}
            store.switch_trajectory(source)

    run_simulation(
        server_app=app,
        client_app=make_client_app(SimulationTask(data_settings(config), model_seed=config.seed)),
        num_supernodes=config.clients,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "log_to_driver": False}},
    )
    if set(results) != set(STRATEGY_NAMES):
        raise RuntimeError(f"the benchmark session ended early; strategies measured: {sorted(results)}")
    return results


def _figures(settings: BenchSettings, config: SimulationConfig, out: Path, runs: dict[str, dict[str, object]]) -> dict[str, dict[str, float]]:
    """Every strategy's figures relative to the exact retrain of the same seed."""
    data = evidence_data(data_settings(config), [settings.client], {settings.client})
    trigger = config.trigger() if config.backdoors else None
    with HistoryStore.open(out / "store") as store:
        models = {name: store.reader(int(run["trajectory"])).model(config.rounds) for name, run in runs.items()}  # type: ignore[arg-type]
    modules = {name: model_from_arrays(config.dataset, arrays) for name, arrays in models.items()}
    figures = {name: model_figures(module, data, trigger, [])[0] for name, module in modules.items()}
    retrain, retrain_run = figures["retrain"], runs["retrain"]
    table: dict[str, dict[str, float]] = {}
    for name in STRATEGY_NAMES:
        mine, run = figures[name], runs[name]
        table[name] = {
            "speedup_vs_retrain": float(retrain_run["seconds"]) / float(run["seconds"]),  # type: ignore[arg-type]
            "client_epochs_ratio": float(run["client_epochs"]) / float(retrain_run["client_epochs"]),  # type: ignore[arg-type]
            "accuracy_gap_pts": 100 * (float(retrain["test_accuracy"]) - float(mine["test_accuracy"])),  # type: ignore[arg-type]
            "forget_accuracy_gap_pts": 100 * (float(retrain["forget_accuracy"]) - float(mine["forget_accuracy"])),  # type: ignore[arg-type]
            "backdoor_asr": float(mine["backdoor_asr"] or 0.0),
            "retrain_backdoor_asr": float(retrain["backdoor_asr"] or 0.0),
            "mia_auc": float(mine["mia_auc"]),  # type: ignore[arg-type]
            "retrain_mia_auc": float(retrain["mia_auc"]),  # type: ignore[arg-type]
            "l2_to_retrain": parameter_l2(models[name], models["retrain"]),
            "js_to_retrain": mean_js_divergence(modules[name], modules["retrain"], data.test[0]),
            "seconds": float(run["seconds"]),  # type: ignore[arg-type]
            "client_epochs": float(run["client_epochs"]),  # type: ignore[arg-type]
        }
    return table


def run_unlearning_benchmark(settings: BenchSettings, out: Path, console: Console | None = None) -> dict[str, object]:
    """Measure every strategy over ``settings.seeds`` seeds; write ``OUT/bench.json`` and a plot."""
    console = console or Console(width=170)  # the comparison table is wide
    settings.config.validate()
    out = ensure_writable_dir(out)
    quiet_engines()
    per_seed: list[dict[str, dict[str, float]]] = []
    for index in range(settings.seeds):
        config = replace(settings.config, seed=settings.config.seed + index)
        console.print(f"[bold]seed {config.seed}[/] ({index + 1} of {settings.seeds}): train, then unlearn client "
                      f"{settings.client} with {', '.join(STRATEGY_NAMES)}")
        workdir = Path(tempfile.mkdtemp(prefix=f"fedforget-bench-{config.seed}-", dir=out))
        runs = _unlearn_every_way(settings, config, workdir)
        per_seed.append(_figures(settings, config, workdir, runs))
    summary = {
        name: _mean_std([seed[name] for seed in per_seed]) for name in STRATEGY_NAMES
    }
    document = {
        "config": settings.config.to_json(),
        "client": settings.client,
        "options": settings.options.to_json(),
        "seeds": [settings.config.seed + i for i in range(settings.seeds)],
        "strategies": summary,
        "per_seed": per_seed,
    }
    write_json_atomic(out / "bench.json", document)
    _print_table(console, summary, len(per_seed))
    _plot(out / "bench.png", summary)
    console.print(f"bench: {out / 'bench.json'}, plot: {out / 'bench.png'}")
    return document


def _mean_std(values: list[dict[str, float]]) -> dict[str, float]:
    result: dict[str, float] = {}
    for key in values[0]:
        array = np.asarray([v[key] for v in values], dtype=float)
        result[key] = float(array.mean())
        result[f"{key}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return result


def _print_table(console: Console, summary: dict[str, dict[str, float]], seeds: int) -> None:
    table = Table(title=f"Unlearning vs exact retraining (mean ± std over {seeds} seeds)")
    columns = (
        ("speedup_vs_retrain", "speed-up", "{:.1f}x"),
        ("client_epochs_ratio", "client epochs / retrain", "{:.2f}"),
        ("accuracy_gap_pts", "acc gap (pts)", "{:+.2f}"),
        ("backdoor_asr", "ASR", "{:.3f}"),
        ("retrain_backdoor_asr", "retrain ASR", "{:.3f}"),
        ("mia_auc", "MIA AUC", "{:.3f}"),
        ("retrain_mia_auc", "retrain MIA AUC", "{:.3f}"),
        ("l2_to_retrain", "L2 to retrain", "{:.3f}"),
        ("js_to_retrain", "JS to retrain", "{:.4f}"),
    )
    table.add_column("strategy")
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for name, figures in summary.items():
        table.add_row(name, *(f"{fmt.format(figures[key])} ± {fmt.format(figures[key + '_std']).lstrip('+')}"
                              for key, _, fmt in columns))
    console.print(table)


def _plot(path: Path, summary: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title) in zip(
        axes,
        (("speedup_vs_retrain", "wall-time speed-up vs retrain"), ("accuracy_gap_pts", "test-accuracy gap to retrain (pts)"),
         ("backdoor_asr", "backdoor attack success rate")),
        strict=True,
    ):
        ax.bar(names, [summary[n][key] for n in names], yerr=[summary[n][f"{key}_std"] for n in names], capsize=4,
               color="#2980b9")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

