"""Client-side verification: a withdrawn client re-checks the published model with its own data.

The client need not trust the server's word. With only the model the server
published, its own training data and some held-out data of the same kind, it
measures whether the model still reacts to its canary (backdoor success rate)
and still singles out its data (membership inference).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from fedforget.arrays import load_arrays
from fedforget.ensemble import model_from_served_arrays
from fedforget.evidence.backdoor import Trigger, attack_success_rate, natural_target_rate
from fedforget.evidence.distance import accuracy
from fedforget.evidence.membership import population_attack


def load_examples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``x`` (inputs) and ``y`` (integer labels) from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise ValueError(f"{path} lacks array(s) {sorted(missing)}; it must hold x (inputs) and y (labels)")
            x, y = archive["x"].astype(np.float32), archive["y"].astype(np.int64)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"{path}: x has {len(x)} examples and y has {len(y)}; they must match and be non-empty")
    return x, y


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """A built-in dataset's model (``digits``) or ``package.module:function`` returning an ``nn.Module``."""
    from fedforget.simulations.models import build_model

    build_model(spec)  # a spec that cannot be loaded fails here, before any data is read
    return lambda: build_model(spec, seed=0)


def verify_published_model(
    model_file: Path,
    build: Callable[[], nn.Module],
    own_data: tuple[np.ndarray, np.ndarray],
    holdout: tuple[np.ndarray, np.ndarray],
    trigger: Trigger | None,
) -> dict[str, float | None]:
    """The evidence a client can compute alone about a model that should have forgotten it."""
    model = model_from_served_arrays(load_arrays(model_file), build)  # one model, or a sharded ensemble
    attack = population_attack(model, own_data, holdout)
    return {
        "own_data_accuracy": accuracy(model, *own_data),
        "holdout_accuracy": accuracy(model, *holdout),
        "backdoor_asr": None if trigger is None else attack_success_rate(model, *holdout, trigger),
        "natural_target_rate": None if trigger is None else natural_target_rate(model, *holdout, trigger),
        "mia_auc": attack.auc,
        "mia_advantage": attack.advantage,
        "mia_tpr_at_1pct_fpr": attack.tpr_at_1pct_fpr,
    }
