"""Mislabelled canaries: examples a model can only fit by memorising them.

A correctly labelled example from a client's own distribution is predicted
well by any model that learned the task, member or not, so a membership
attack on genuine data has little to find. An example given a wrong label is
the opposite: a model that never saw it predicts its true class, and only a
model that memorised it predicts the wrong one. Planting such canaries and
attacking them is how differentially private training is audited (Jagielski
et al. 2020, "Auditing Differentially Private Machine Learning"; Nasr et al.
2021): they measure the worst case the DP guarantee bounds, where an attack
on average examples measures the typical one.

Pure numpy: the seeded choice of which examples, and of which wrong class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Seed", "mislabel", "plant_mislabelled"]

Seed = int | Sequence[int]
"""What ``numpy.random.default_rng`` is seeded with: a number, or numbers that name the draw (seed, client)."""


def mislabel(y: np.ndarray, num_classes: int, seed: Seed) -> np.ndarray:
    """A seeded wrong class for every label: uniform over the ``num_classes - 1`` classes it is not."""
    if num_classes < 2:
        raise ValueError(f"a wrong label needs at least 2 classes, got {num_classes}")
    labels = np.asarray(y)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be classes 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    shift = np.random.default_rng(seed).integers(1, num_classes, size=labels.shape)
    return ((labels + shift) % num_classes).astype(labels.dtype)


def plant_mislabelled(y: np.ndarray, count: int, num_classes: int, seed: Seed) -> tuple[np.ndarray, np.ndarray]:
    """Relabel ``count`` seeded examples of ``y`` to a wrong class; return the new labels and which changed.

    The same ``seed`` picks the same examples and classes, so a replayed or
    retrained run plants the same canaries. ``y`` itself is not modified.
    """
    if count < 0:
        raise ValueError(f"the number of mislabelled canaries must be >= 0, got {count}")
    if count > len(y):
        raise ValueError(
            f"{count} mislabelled canaries asked of a client that holds {len(y)} examples: "
            "plant fewer, or give the clients more data"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y), size=count, replace=False)
    mask = np.zeros(len(y), dtype=bool)
    mask[chosen] = True
    relabelled = np.array(y, copy=True)
    relabelled[chosen] = mislabel(relabelled[chosen], num_classes, seed=int(rng.integers(2**31)))
    return relabelled, mask
