"""``fedforget export-data``: shares of a built-in dataset as deployed organisations' data files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedforget.commands.exits import ExitCode, fail

__all__ = ["export_data_command", "require_dataset"]


def require_dataset(name: str) -> None:
    """Exit 2 for a dataset fedforget does not know, 4 for one that is not installed: before anything slow."""
    from fedforget.simulations.datasets import DATASET_NAMES, DatasetUnavailableError, check_available

    if name not in DATASET_NAMES:
        fail(f"--dataset {name!r} is not known; choose one of: {', '.join(DATASET_NAMES)}", ExitCode.USAGE)
    try:
        check_available(name)
    except DatasetUnavailableError as exc:
        fail(str(exc), ExitCode.UNAVAILABLE)


def export_data_command(
    out: Annotated[Path, typer.Option(help="Directory for part-0.npz, part-1.npz, ...")],
    partitions: Annotated[int, typer.Option(help="How many shares (one per organisation).")],
    dataset: Annotated[str, typer.Option(help="digits (bundled), mnist or fashion-mnist.")] = "digits",
    partition: Annotated[str, typer.Option(help="iid, dirichlet or pathological.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (with --partition dirichlet).")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
) -> None:
    """Write shares of a built-in dataset as the data files deployed organisations train on (x, y in .npz)."""
    from fedforget.simulations.partitioning import PARTITION_SCHEMES

    if partition not in PARTITION_SCHEMES:
        fail(f"--partition {partition!r} is not known; choose one of: {', '.join(PARTITION_SCHEMES)}", ExitCode.USAGE)
    require_dataset(dataset)
    from fedforget.simulations.export import ExportError, export_partitions

    try:
        paths = export_partitions(dataset, partitions, out, scheme=partition, alpha=alpha, seed=seed)
    except (ExportError, ValueError) as exc:
        fail(str(exc), ExitCode.USAGE)
    except OSError as exc:
        fail(f"cannot write the data files into {out}: {exc.strerror or exc}", ExitCode.BAD_FILE)
    for path in paths:
        typer.echo(f"{path.resolve()}")
