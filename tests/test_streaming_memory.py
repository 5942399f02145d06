"""Unlearning reads the history one round at a time: its memory does not grow with the rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedforget.simulations.bench_memory import measure_unlearning, write_history

MODEL = {"conv.weight": np.zeros((64, 32, 3, 3), np.float32), "fc.weight": np.zeros((10, 2000), np.float32),
         "steps": np.zeros((), np.int64)}  # ~38k parameters: large enough that arrays dominate the traced memory


@pytest.fixture(scope="module")
def histories(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("histories")
    paths = {}
    for rounds in (4, 16):
        paths[rounds] = base / f"store-{rounds}"
        write_history(paths[rounds], MODEL, clients=3, rounds=rounds, store_dtype="float32")
    return paths


@pytest.mark.parametrize("strategy", ["subtract", "fedrecovery", "replay", "calibrated"])
def test_an_unlearning_of_4x_the_rounds_peaks_at_less_than_1_5x_the_memory(
    histories: dict[int, Path], strategy: str
) -> None:
    short, long = (measure_unlearning(histories[rounds], strategy) for rounds in (4, 16))
    assert long["traced_peak_mib"] < 1.5 * short["traced_peak_mib"], (short, long)
    assert long["traced_peak_models"] < 40  # a bounded number of models' worth, not one per round
