"""Shares of a built-in dataset as the data files a deployed organisation trains on.

A real organisation brings its own data; to try a deployment on one machine,
``fedforget export-data`` writes each organisation a share of a built-in
dataset in the format the deployed ClientApp reads (``.npz`` with ``x`` and
``y``), so that the ClientApp, started afresh for every Flower message, reads
one small file instead of loading and partitioning the whole dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedforget.errors import FedforgetError
from fedforget.files import write_bytes_atomic
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.partitioning import partition_indices


class ExportError(FedforgetError):
    """The data files cannot be written as asked; nothing was overwritten."""


def export_partitions(
    dataset: str, partitions: int, out: Path, *, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[Path]:
    """Write ``out/part-I.npz`` (arrays ``x``, ``y``) for each partition I of ``dataset``'s training split."""
    if partitions < 1:
        raise ExportError(f"--partitions must be at least 1, got {partitions}")
    paths = [out / f"part-{i}.npz" for i in range(partitions)]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ExportError(f"refusing to overwrite {', '.join(existing)}; choose another --out")
    data = load_dataset(dataset)
    indices = partition_indices(data.y_train, partitions, scheme, alpha=alpha, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for path, index in zip(paths, indices):
        write_bytes_atomic(path, _npz_bytes(data.x_train[index], data.y_train[index]))
    return paths


def _npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=np.ascontiguousarray(x, dtype=np.float32), y=np.ascontiguousarray(y, dtype=np.int64))
    return buffer.getvalue()
