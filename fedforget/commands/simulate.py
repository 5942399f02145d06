"""``fedforget simulate``: a federation with withdrawals on Flower's simulation engine.

The arguments are parsed and checked, and ``--out`` is proved usable, before
torch or Flower is imported: bad input is refused in well under a second.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape

from fedforget.commands.consoles import console
from fedforget.commands.exits import ExitCode, fail
from fedforget.strategy_options import with_strategy_options
from fedforget.simulations.config import DATASET_TRAINING, ConfigError, SimulationConfig, parse_withdrawal
from fedforget.simulations.datasets import DatasetUnavailableError, check_available
from fedforget.simulations.run_dir import (
    RunDirectoryError,
    check_can_create,
    check_fresh,
    next_free_run_dir,
    saved_config,
)

__all__ = ["simulate_command"]

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(SimulationConfig)}


def _per_dataset(name: str) -> str:
    """``--help``'s default for a training setting: each dataset's value, and the model's override."""
    by_value: dict[object, list[str]] = {}
    for dataset, defaults in DATASET_TRAINING.items():
        by_value.setdefault(getattr(defaults, name), []).append(dataset)
    shown = "; ".join(f"{', '.join(datasets)} {value:g}" for value, datasets in by_value.items())  # type: ignore[str-format]
    return f"{shown}; or the --model's training_defaults"


@with_strategy_options
def simulate_command(
    ctx: typer.Context,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Directory for the history store and report.json.", show_default="a new runs/simulation-N"),
    ] = None,
    dataset: Annotated[str, typer.Option(help="digits (bundled), mnist or fashion-mnist.")] = _DEFAULTS["dataset"],
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Another model than the dataset's: a built-in name (resnet-small: ~1.2M parameters) or your "
            "own package.module:function returning an nn.Module; it may carry training_defaults "
            "(lr, batch_size, local_epochs).",
            show_default="the dataset's CNN",
        ),
    ] = None,
    clients: Annotated[int, typer.Option(help="Number of simulated clients (ids 0..N-1).")] = _DEFAULTS["clients"],
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _DEFAULTS["rounds"],
    local_epochs: Annotated[
        Optional[float], typer.Option(help="Local epochs per round.", show_default=_per_dataset("local_epochs"))
    ] = None,
    lr: Annotated[
        Optional[float],
        typer.Option(help="Client learning rate (SGD, momentum 0.9).", show_default=_per_dataset("lr")),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option(help="Client batch size.", show_default=_per_dataset("batch_size"))
    ] = None,
    partition: Annotated[str, typer.Option(help="iid, dirichlet or pathological.")] = _DEFAULTS["partition"],
    train_fraction: Annotated[
        float, typer.Option(help="Share of the training set the federation holds (a seeded subsample): faster runs.")
    ] = _DEFAULTS["train_fraction"],
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (with --partition dirichlet).")
    ] = _DEFAULTS["alpha"],
    classes_per_partition: Annotated[
        int, typer.Option(help="Labels per client (with --partition pathological).")
    ] = _DEFAULTS["classes_per_partition"],
    seed: Annotated[int, typer.Option(help="Seed for data split, model and training.")] = _DEFAULTS["seed"],
    withdraw: Annotated[
        Optional[list[str]],
        typer.Option(help="CLIENT@ROUND: the client withdraws before ROUND (repeatable).", show_default="none"),
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="Unlearning strategy: retrain (exact), subtract (the client's own contributions, in stages), "
            "replay (FedRecover: history replay with estimated updates), calibrated (FedEraser), fedrecovery "
            "(FedRecovery), gradient-ascent (Halimi et al.), relabel (fine-tuning with wrong labels), misdirect "
            "(RMU-style misdirection); their settings are under Strategy settings."
        ),
    ] = _DEFAULTS["strategy"],
    retention_interval: Annotated[
        int, typer.Option(help="Keep client updates every N rounds (FedEraser's Δt).")
    ] = _DEFAULTS["retention_interval"],
    store_dtype: Annotated[
        str, typer.Option(help="How stored updates are encoded: float32, float16, int8 or topk:F (keep a fraction F of each "
            "array, with error feedback), e.g. topk:0.05.")
    ] = _DEFAULTS["store_dtype"],
    backdoor: Annotated[
        Optional[list[str]],
        typer.Option(help="CLIENT plants a backdoor canary in its data (repeatable).", show_default="none"),
    ] = None,
    backdoor_fraction: Annotated[
        float, typer.Option(help="Share of a backdoored client's examples that carry the trigger.")
    ] = _DEFAULTS["backdoor_fraction"],
    backdoor_target: Annotated[int, typer.Option(help="Class the trigger relabels to.")] = _DEFAULTS["backdoor_target"],
    canaries: Annotated[
        int,
        typer.Option(
            help="Each withdrawing client relabels this many of its examples to a wrong class: canaries that only "
            "memorisation fits, attacked on their own (a DP audit, Jagielski et al. 2020)."
        ),
    ] = _DEFAULTS["canaries"],
    shadows: Annotated[
        int, typer.Option(help="Shadow models for the per-example membership attack (0 skips it).")
    ] = _DEFAULTS["shadows"],
    seeds: Annotated[int, typer.Option(help="Repeat over this many seeds: mean ± std.")] = _DEFAULTS["seeds"],
    shards: Annotated[
        int,
        typer.Option(
            help="Split the clients into K isolated shards, one model each, served as their ensemble: "
            "a withdrawal retrains only its shard (1: unsharded)."
        ),
    ] = _DEFAULTS["shards"],
    fraction_train: Annotated[
        float,
        typer.Option(
            help="Share of the clients sampled for each round (Flower's own sampling, seeded by --seed and the "
            "round); 1 trains every client in every round."
        ),
    ] = _DEFAULTS["fraction_train"],
    dp: Annotated[
        Optional[str],
        typer.Option(
            help="Differentially private training with Flower's DP: central-fixed, central-adaptive or local "
            "(needs --noise-multiplier or --target-epsilon, and --clipping-norm).",
            show_default="none",
        ),
    ] = None,
    noise_multiplier: Annotated[
        Optional[float],
        typer.Option(
            help="DP noise multiplier z (noise std / one client's sensitivity).", show_default="none (needed with --dp)"
        ),
    ] = None,
    clipping_norm: Annotated[
        Optional[float],
        typer.Option(
            help="DP clipping norm C of each update (the initial one if adaptive).", show_default="none (needed with --dp)"
        ),
    ] = None,
    target_epsilon: Annotated[
        Optional[float],
        typer.Option(
            help="Instead of --noise-multiplier: the epsilon (delta 1e-5) a client in every round may spend over "
            "--rounds; z is derived with dp-accounting (every client in every round: not with --fraction-train).",
            show_default="none",
        ),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out (give --out).")] = False,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            help="Run on this Ray cluster (Ray's address, e.g. HOST:6379 or auto).",
            show_default="a private Ray on 127.0.0.1, no dashboard",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    strategy_settings: dict[str, object] | None = None,
) -> None:
    """Run a federation on Flower's simulation engine, with withdrawals and unlearning.

    Each strategy's own settings are options too (under Strategy settings, with each owner's default).
    """
    given: dict[str, Any] = {
        "dataset": dataset, "model": model, "clients": clients, "rounds": rounds,
        "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size, "partition": partition, "alpha": alpha,
        "classes_per_partition": classes_per_partition, "seed": seed, "strategy": strategy,
        "retention_interval": retention_interval, "store_dtype": store_dtype,
        "backdoor_fraction": backdoor_fraction, "backdoor_target": backdoor_target, "shadows": shadows,
        "canaries": canaries,
        "seeds": seeds, "shards": shards, "train_fraction": train_fraction,
        "fraction_train": fraction_train, "withdrawals": withdraw, "backdoors": backdoor,
        "dp": dp, "noise_multiplier": noise_multiplier, "clipping_norm": clipping_norm,
        "target_epsilon": target_epsilon,
    }
    option_of = {"withdrawals": "withdraw", "backdoors": "backdoor"}
    if resume:
        if out is None:
            fail("--resume continues the run in --out: name it, e.g. --out runs/simulation-1", ExitCode.USAGE)
        # Only what was typed overrides the interrupted run's settings (and is then refused if it differs).
        given = {
            name: value for name, value in given.items()
            if ctx.get_parameter_source(option_of.get(name, name)) is not ParameterSource.DEFAULT
        }
    try:
        if given.get("withdrawals") is not None:
            given["withdrawals"] = tuple(parse_withdrawal(w) for w in given["withdrawals"])
        if given.get("backdoors") is not None:
            given["backdoors"] = tuple(given["backdoors"])
        settings = {name: value for name, value in given.items() if value is not None}
        if resume:
            saved = saved_config(out)  # type: ignore[arg-type]
            same_strategy = settings.get("strategy", saved.strategy) == saved.strategy
            settings["strategy_settings"] = {**(saved.strategy_settings if same_strategy else {}), **(strategy_settings or {})}
            config = SimulationConfig(**{**saved.__dict__, **settings})  # type: ignore[arg-type]
        else:
            config = SimulationConfig(**settings, strategy_settings=dict(strategy_settings or {}))
        config.validate()
        check_available(config.dataset)
        out = (out or next_free_run_dir()).absolute()
        check_can_create(out)
        if not resume:
            check_fresh(config, out)
    except ConfigError as exc:
        fail(str(exc), ExitCode.USAGE)
    except RunDirectoryError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except DatasetUnavailableError as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)
    _run(config, out, resume=resume, ray_address=ray_address, verbose=verbose)


def _shown(path: Path) -> Path:
    """``path`` as a person would type it: relative to the working directory when it lies below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _run(config: SimulationConfig, out: Path, *, resume: bool, ray_address: str | None, verbose: bool) -> None:
    """Import the engine (torch, Flower, Ray), run, print the results; exit 5 if the model never learned."""
    progress = console(stderr=True)
    what = config.model or f"the {config.dataset} CNN"
    progress.print(
        f"[bold]{escape(config.dataset)}[/], {escape(what)}, {config.clients} clients: lr {config.lr:g}, "
        f"batch size {config.batch_size}, {config.local_epochs:g} local epochs per round; "
        f"results in {escape(str(_shown(out)))}"
    )
    from fedforget.server.ledger.log import LedgerError
    from fedforget.server.store.errors import StoreError
    from fedforget.simulations.progress import ConsoleObserver
    from fedforget.simulations.ray_engine import SimulationEngineError
    from fedforget.simulations.runner import simulate
    from fedforget.strategies.base import StrategyRefusedError

    try:
        result = simulate(
            config,
            out,
            resume=resume,
            observer=ConsoleObserver(progress),
            verbose=verbose,
            progress=lambda message: progress.print(f"[bold]{escape(message)}[/]"),
            ray_address=ray_address,
        )
    except ConfigError as exc:
        fail(str(exc), ExitCode.USAGE)
    except StrategyRefusedError as exc:
        fail(f"{exc} The training so far is kept: continue it with another strategy, e.g. "
             f"fedforget simulate --resume --out {_shown(out)} --strategy retrain", ExitCode.USAGE)
    except (RunDirectoryError, StoreError, LedgerError, OSError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except (SimulationEngineError, DatasetUnavailableError, RuntimeError) as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)
    results = console()
    if "rounds" in result.report:
        _print_run_summary(result.report, _shown(out), results)
    if result.verification is not None:
        from fedforget.simulations.summary import print_verification

        print_verification(result.verification, _shown(out), results)
    problem = result.report.get("training_problem")
    if problem:
        progress.print(
            f"[bold red]WARNING: this run's model did not learn[/]: {escape(str(problem))} "
            f"report.json records this under training_problem."
        )
        raise typer.Exit(code=int(ExitCode.NOT_LEARNED))


WHO_NAMED = 3
"""How many clients of a group unlearning the console names."""


def _who(clients: list[str]) -> str:
    """``client 3``, or for clients unlearned together ``48 clients together (0, 1, 2, ...)``."""
    if len(clients) == 1:
        return f"client {clients[0]}"
    named = ", ".join(clients[:WHO_NAMED]) + (", ..." if len(clients) > WHO_NAMED else "")
    return f"{len(clients)} clients together ({named})"


def _print_run_summary(report: dict[str, object], out: Path, results: Console) -> None:
    results.print(
        f"final test accuracy [bold]{report['final_test_accuracy']:.2%}[/] "
        f"after {len(report['rounds'])} rounds in {report['wall_seconds']:.1f} s"  # type: ignore[arg-type]
    )
    shown_unlearnings: set[object] = set()
    for event in report["unlearning"]:  # type: ignore[union-attr]
        # report.json has an entry per client; clients unlearned together are one unlearning, so one line.
        unlearning = event.get("unlearning_index", id(event))
        if unlearning in shown_unlearnings:
            continue
        shown_unlearnings.add(unlearning)
        results.print(
            f"{_who(event.get('clients_unlearned_together') or [event['client']])} forgotten "
            f"before round {event['round']} by {event['strategy']}"
            + (f" in shard {event['shard']} alone: " if "shard" in event else ": ")
            + f"{event['seconds']:.1f} s, {event['client_epochs']:.0f} client-epochs, test accuracy "
            f"{event['test_accuracy_before']:.2%} -> {event['test_accuracy_after']:.2%}"
        )
    store = report["store"]
    results.print(
        f"history store: {store['bytes'] / 1e6:.2f} MB for {store['client_rounds']} client-rounds "  # type: ignore[index]
        f"in {_shown(Path(str(store['path'])))}; report: {out / 'report.json'}"  # type: ignore[index]
    )
