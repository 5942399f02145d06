"""``fedforget bench``: benchmarks that measure ratios side by side in one run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedforget.commands.data import require_dataset
from fedforget.commands.exits import ExitCode, fail

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)


@contextmanager
def _simulation_failures() -> Iterator[None]:
    """One mapping from a simulated benchmark's failures to exit codes, for every bench that simulates."""
    from fedforget.simulations.datasets import DatasetUnavailableError
    from fedforget.simulations.ray_engine import SimulationEngineError

    try:
        yield
    except PermissionError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (DatasetUnavailableError, SimulationEngineError) as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)


@bench_app.command("unlearning")
def bench_unlearning(
    out: Annotated[Path, typer.Option(help="Directory for bench.json, the plot and the runs.")] = Path(
        "runs/bench-unlearning"
    ),
    quick: Annotated[
        bool, typer.Option(help="Digits (IID), 15 rounds, plus FedEraser's Δt × r grid: where settings are chosen.")
    ] = False,
    full: Annotated[
        bool,
        typer.Option(help="Digits, MNIST and Fashion-MNIST (held out), each IID and Dirichlet α=0.3: hours."),
    ] = False,
    dataset: Annotated[
        Optional[list[str]], typer.Option(help="With --full: only these datasets (repeatable).", show_default="all three")
    ] = None,
    variant: Annotated[
        Optional[list[str]],
        typer.Option(help="Only these variants, by label (repeatable); retrain always runs.", show_default="all"),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds to average over (at least 3 for a band).")] = 3,
    round_cost: Annotated[
        float, typer.Option(help="Seconds a deployed round trip costs, for the modelled deployment speed-up.")
    ] = 9.7,
    dp: Annotated[
        Optional[str],
        typer.Option(
            help="Train, retrain and unlearn under differential privacy: central-fixed, central-adaptive or local "
            "(as simulate --dp; needs --noise-multiplier or --target-epsilon, and --clipping-norm).",
            show_default="none",
        ),
    ] = None,
    noise_multiplier: Annotated[
        Optional[float], typer.Option(help="DP noise multiplier z.", show_default="none (needed with --dp)")
    ] = None,
    clipping_norm: Annotated[
        Optional[float], typer.Option(help="DP clipping norm C.", show_default="none (needed with --dp)")
    ] = None,
    target_epsilon: Annotated[
        Optional[float],
        typer.Option(help="Instead of --noise-multiplier: the epsilon over each run's rounds; z is derived.", show_default="none"),
    ] = None,
    store_dtype: Annotated[
        str, typer.Option(help="How the history stores updates: float32, float16, int8 or topk:F (e.g. topk:0.05).")
    ] = "float32",
    retention_interval: Annotated[int, typer.Option(help="Keep client updates every N rounds (FedEraser's Δt).")] = 1,
) -> None:
    """Every unlearning strategy against exact retraining: forgetting, accuracy, and cost in client work."""
    from dataclasses import replace

    if quick == full:
        fail("choose one of --quick (digits, minutes) or --full (three datasets, two partitions, hours)", ExitCode.USAGE)
    if dataset and not full:
        fail("--dataset goes with --full", ExitCode.USAGE)
    datasets = tuple(dataset or ("digits", "mnist", "fashion-mnist"))
    for name in datasets:
        require_dataset(name)

    from fedforget.simulations.ray_engine import keep_ray_on_loopback

    keep_ray_on_loopback()
    from fedforget.simulations.bench_unlearning import BenchPlan, run_unlearning_benchmark

    plan = BenchPlan.quick(seeds) if quick else BenchPlan.full_plan(seeds, datasets)
    with _simulation_failures():
        if variant:
            plan = plan.only(variant)
        plan = plan.with_privacy(dp, noise_multiplier, clipping_norm, target_epsilon).with_history(store_dtype, retention_interval)
        run_unlearning_benchmark(replace(plan, round_cost=round_cost), out)


@bench_app.command("shards")
def bench_shards(
    out: Annotated[Path, typer.Option(help="Directory for bench-shards.json, the plot and the runs.")] = Path(
        "runs/bench-shards"
    ),
    shards: Annotated[
        str, typer.Option(help="Shard counts K to compare, comma-separated; K=1 (unsharded) is always added.")
    ] = "1,2,4,8",
    dataset: Annotated[
        Optional[list[str]], typer.Option(help="Datasets (repeatable).", show_default="digits")
    ] = None,
    partition: Annotated[
        Optional[list[str]],
        typer.Option(help="iid and/or dirichlet (α=0.3) (repeatable).", show_default="iid and dirichlet"),
    ] = None,
    rounds: Annotated[
        Optional[int], typer.Option(help="Rounds per federation.", show_default="15, as bench unlearning")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds to average over.")] = 1,
) -> None:
    """Sharded (SISA) federations: the ensemble's accuracy cost against the exact unlearning's speed-up, per K."""
    datasets = tuple(dataset or ("digits",))
    partitions = tuple(partition or ("iid", "dirichlet"))
    for name in datasets:
        require_dataset(name)
    unknown = sorted(set(partitions) - {"iid", "dirichlet"})
    if unknown:
        fail(f"--partition {unknown[0]!r} is not benchmarked; choose iid or dirichlet", ExitCode.USAGE)
    try:
        counts = tuple(int(part) for part in shards.split(","))
    except ValueError:
        fail(f"--shards {shards!r}: expected comma-separated whole numbers, e.g. 1,2,4,8", ExitCode.USAGE)

    from fedforget.simulations.ray_engine import keep_ray_on_loopback

    keep_ray_on_loopback()
    from fedforget.simulations.bench_shards import ShardsPlan, run_shards_benchmark

    with _simulation_failures():
        plan = ShardsPlan.of(datasets, partitions, counts, seeds=seeds, rounds=rounds)
        plan.check()
        run_shards_benchmark(plan, out)


@bench_app.command("estimation")
def bench_estimation(
    store: Annotated[Path, typer.Argument(help="A history store holding a history and its exact retrain.")],
    out: Annotated[
        Optional[Path], typer.Option(help="Also write bench-estimation.json here.", show_default="not written")
    ] = None,
) -> None:
    """How far a stored update is from the client's real update on the retrain's models (FedRecover's premise)."""
    from fedforget.errors import FedforgetError
    from fedforget.simulations.bench_estimation import run_estimation_benchmark

    try:
        run_estimation_benchmark(store, out)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except (FedforgetError, PermissionError) as exc:
        fail(str(exc), ExitCode.BAD_FILE)


@bench_app.command("overhead")
def bench_overhead(
    dataset: Annotated[str, typer.Option(help="digits, mnist or fashion-mnist.")] = "digits",
    clients: Annotated[int, typer.Option(help="Simulated clients.")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds per configuration and block.")] = 10,
    blocks: Annotated[
        int, typer.Option(help="Blocks: every configuration runs once per block, interleaved, against drift.")
    ] = 2,
    model: Annotated[
        Optional[str], typer.Option(help="Another model: resnet-small (~1.2M parameters) or package.module:function.",
                                    show_default="the dataset's CNN")
    ] = None,
    store_dtype: Annotated[
        Optional[list[str]], typer.Option(help="Also measure this update encoding, e.g. topk:0.05 (repeatable).",
                                          show_default="fp32 and fp16 only")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Also write the figures as JSON here.", show_default="not written")
    ] = None,
) -> None:
    """Round time with history recording on vs off, and bytes stored per client-round (fp32, fp16, others)."""
    require_dataset(dataset)
    from fedforget.simulations.bench_overhead import run_overhead_benchmark

    with _simulation_failures():
        result = run_overhead_benchmark(
            dataset=dataset, clients=clients, rounds=rounds, blocks=blocks, model=model,
            encodings=tuple(store_dtype or ()),
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-overhead.json").write_text(json.dumps(result, indent=2) + "\n")


@bench_app.command("memory")
def bench_memory(
    out: Annotated[Path, typer.Option(help="Directory for the histories and bench-memory.json.")] = Path(
        "runs/bench-memory"
    ),
    model: Annotated[str, typer.Option(help="The model whose shapes the history has.")] = "resnet-small",
    rounds: Annotated[str, typer.Option(help="Round counts to compare, comma-separated.")] = "10,40",
    clients: Annotated[int, typer.Option(help="Clients in every round.")] = 3,
    store_dtype: Annotated[str, typer.Option(help="How the history stores updates.")] = "float16",
    strategy: Annotated[
        Optional[list[str]], typer.Option(help="Strategies to measure (repeatable).", show_default="all that read history")
    ] = None,
) -> None:
    """An unlearning's peak memory on histories of different lengths, same model: does it stream?"""
    from fedforget.simulations.bench_memory import DEFAULT_STRATEGIES, MemoryPlan, run_memory_benchmark

    try:
        counts = tuple(int(part) for part in rounds.split(","))
    except ValueError:
        fail(f"--rounds {rounds!r}: expected comma-separated whole numbers, e.g. 10,40", ExitCode.USAGE)
    plan = MemoryPlan(model, counts, clients, store_dtype, tuple(strategy or DEFAULT_STRATEGIES))
    with _simulation_failures():
        document = run_memory_benchmark(plan, out)
    for name, growth in document["growth"].items():  # type: ignore[union-attr]
        print(f"{name:12s} peak RSS x{growth['peak_rss_ratio']:.2f}, traced peak x{growth['traced_peak_ratio']:.2f} "
              f"from {min(counts)} to {max(counts)} rounds")


@bench_app.command("scaling")
def bench_scaling(
    out: Annotated[
        Path, typer.Option(help="Directory for scaling.json, scaling.png and the histories (each removed once measured).")
    ] = Path("runs/bench-scaling"),
    quick: Annotated[
        bool,
        typer.Option(help="About 10-20 minutes on 2 cores: every axis with the fewest points, the ~11M model at 3 "
                     "and 12 rounds.", show_default="the full grid: hours"),
    ] = False,
    strategy: Annotated[
        Optional[list[str]],
        typer.Option(help="Strategies to unlearn with (repeatable).", show_default="subtract, fedrecovery, calibrated, replay"),
    ] = None,
) -> None:
    """Store bytes, recording time, unlearning time and peak memory against clients, rounds and model size."""
    from fedforget.simulations.bench_scaling import STRATEGIES, ScalingPlan, run_scaling_benchmark

    plan = ScalingPlan.quick() if quick else ScalingPlan.full()
    plan = ScalingPlan(plan.federations, tuple(strategy or STRATEGIES), plan.store_dtype)
    try:
        plan.check()
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    with _simulation_failures():
        run_scaling_benchmark(plan, out)


@bench_app.command("deployment")
def bench_deployment(
    out: Annotated[Path, typer.Option(help="Directory for the federation's files and bench-deployment.json.")] = Path(
        "runs/bench-deployment"
    ),
    organisations: Annotated[int, typer.Option(help="Organisations (SuperNodes).")] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds to run (round 1 is not counted).")] = 4,
) -> None:
    """A real loopback TLS federation: the deployed round time against one ClientApp's own work."""
    from fedforget.simulations.bench_deployment import run_deployment_benchmark

    try:
        run_deployment_benchmark(out, organisations=organisations, rounds=rounds)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except FileNotFoundError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except RuntimeError as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)
