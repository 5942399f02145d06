"""``fedforget bench``: benchmarks that measure ratios side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedforget.commands.data import require_dataset
from fedforget.commands.exits import ExitCode, fail

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks: ratios measured side by side in one run.", no_args_is_help=True)


@bench_app.command("unlearning")
def bench_unlearning(
    out: Annotated[Path, typer.Option(help="Directory for bench.json, bench.png and the runs.")] = Path(
        "runs/bench-unlearning"
    ),
    quick: Annotated[bool, typer.Option(help="digits, 15 rounds: a few minutes. Without it: MNIST, 20 rounds.")] = False,
    seeds: Annotated[int, typer.Option(help="Seeds to average over (at least 3 for a band).")] = 3,
) -> None:
    """Every unlearning strategy against exact retraining, measured side by side per seed."""
    from dataclasses import replace

    from fedforget.simulations.ray_engine import keep_ray_on_loopback

    keep_ray_on_loopback()
    from fedforget.simulations.bench_unlearning import BenchSettings, run_unlearning_benchmark
    from fedforget.simulations.datasets import DatasetUnavailableError

    settings = BenchSettings.quick() if quick else BenchSettings.headline()
    try:
        run_unlearning_benchmark(replace(settings, seeds=seeds), out)
    except PermissionError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except DatasetUnavailableError as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)


@bench_app.command("overhead")
def bench_overhead(
    dataset: Annotated[str, typer.Option(help="digits, mnist or fashion-mnist.")] = "digits",
    clients: Annotated[int, typer.Option(help="Simulated clients.")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds per configuration.")] = 10,
    out: Annotated[
        Optional[Path], typer.Option(help="Also write the figures as JSON here.", show_default="not written")
    ] = None,
) -> None:
    """Round time with history recording on vs off, and bytes stored per client-round (fp32, fp16)."""
    require_dataset(dataset)
    from fedforget.simulations.bench_overhead import run_overhead_benchmark
    from fedforget.simulations.ray_engine import SimulationEngineError

    try:
        result = run_overhead_benchmark(dataset=dataset, clients=clients, rounds=rounds)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except PermissionError as exc:
        fail(str(exc), ExitCode.BAD_FILE)
    except SimulationEngineError as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-overhead.json").write_text(json.dumps(result, indent=2) + "\n")


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
