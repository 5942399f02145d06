"""A BadNets-style backdoor used as a canary for forgetting.

The withdrawing client poisons a fraction of its own training data with a small
square trigger relabelled to a target class.  While its contribution is in the
model, triggered inputs flip to the target class (high attack success rate);
once the contribution is truly removed, the trigger loses its effect and the
success rate falls back to what a model that never saw the trigger gives
(compare with the exact retrained model, and with :func:`natural_target_rate`,
the floor no model can go below).  Unlike membership inference this signal is
large and unambiguous, which is why it is the headline evidence.

Pure numpy + torch: a withdrawing client re-checks the published model itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

from fedforget.evidence.distance import check_labels, checked_logits

__all__ = ["CORNERS", "Trigger", "apply_trigger", "attack_success_rate", "natural_target_rate", "poison_dataset"]

#: Where the trigger patch may be placed.
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class Trigger:
    """A solid square patch written into every channel of an image, and the label it maps to.

    Inputs are scaled to ``[0, 1]`` throughout fedforget, so ``value`` must lie
    there; the default (a white 2x2 square in the bottom-right corner) is a
    pattern that 8x8 digits never contain, so a model can only learn it from the
    poisoned examples.
    """

    target_class: int = 0
    size: int = 2  # square patch side, pixels
    value: float = 1.0  # pixel value written (inputs are scaled to [0,1])
    corner: str = "bottom-right"  # one of CORNERS
    margin: int = 0  # pixels between the patch and the image border

    def __post_init__(self) -> None:
        if self.target_class < 0:
            raise ValueError(f"target_class must be a class index >= 0, got {self.target_class}")
        if self.size < 1:
            raise ValueError(f"trigger size must be at least 1 pixel, got {self.size}")
        if self.margin < 0:
            raise ValueError(f"trigger margin must be >= 0 pixels, got {self.margin}")
        if self.corner not in CORNERS:
            raise ValueError(f"unknown trigger corner {self.corner!r}; valid corners are: {', '.join(CORNERS)}")
        if not (math.isfinite(self.value) and 0.0 <= self.value <= 1.0):
            raise ValueError(f"trigger value must lie in [0, 1] like the inputs, got {self.value}")

    def window(self, height: int, width: int) -> tuple[slice, slice]:
        """Row and column slices of the patch in a ``height`` x ``width`` image.

        Raises ``ValueError`` if the patch plus margin does not fit, rather than
        letting numpy clip the slice into a smaller, different trigger.
        """
        if self.size + self.margin > min(height, width):
            raise ValueError(
                f"a {self.size}x{self.size} trigger with margin {self.margin} does not fit in "
                f"{height}x{width} images; use a smaller size or margin"
            )
        top = self.corner.startswith("top")
        left = self.corner.endswith("left")
        row0 = self.margin if top else height - self.margin - self.size
        col0 = self.margin if left else width - self.margin - self.size
        return slice(row0, row0 + self.size), slice(col0, col0 + self.size)


def apply_trigger(x: np.ndarray, trigger: Trigger) -> np.ndarray:
    """Return a copy of the images ``x`` (shape ``(N, C, H, W)``) with the trigger stamped on each.

    Always copies: datasets are shared read-only between simulated clients.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {x.shape}")
    rows, cols = trigger.window(x.shape[2], x.shape[3])
    stamped = np.array(x, copy=True)
    stamped[:, :, rows, cols] = trigger.value
    return stamped


def poison_dataset(
    x: np.ndarray, y: np.ndarray, trigger: Trigger, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stamp the trigger on a seeded random ``fraction`` of the examples and relabel them.

    Returns ``(x', y', mask)`` where ``mask[i]`` says whether example ``i`` was
    poisoned.  Exactly ``round(fraction * N)`` examples are chosen, without
    replacement, by ``numpy.random.default_rng(seed)``, so a replayed run poisons
    the same examples.  Examples already labelled ``target_class`` may be chosen
    too (as in BadNets); they get the trigger and keep their label.  The inputs
    are not modified.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {x.shape}")
    check_labels(x, y)
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"poison fraction must be in (0, 1], got {fraction}")
    count = round(fraction * x.shape[0])
    if count == 0:
        raise ValueError(
            f"poisoning a fraction {fraction} of {x.shape[0]} examples selects none; "
            "raise the fraction or give more examples"
        )
    chosen = np.random.default_rng(seed).choice(x.shape[0], size=count, replace=False)
    mask = np.zeros(x.shape[0], dtype=bool)
    mask[chosen] = True
    poisoned_x = np.array(x, copy=True)
    poisoned_x[mask] = apply_trigger(x[mask], trigger)
    poisoned_y = np.array(y, copy=True)
    poisoned_y[mask] = trigger.target_class
    return poisoned_x, poisoned_y, mask


def _target_rate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, trigger: Trigger, *, triggered: bool, batch_size: int
) -> float:
    """Fraction of non-target-class examples classified as the target class, with or without the trigger."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be images of shape (N, C, H, W), got shape {x.shape}")
    check_labels(x, y)
    keep = y != trigger.target_class
    if not keep.any():
        raise ValueError(
            f"every example is labelled with the target class {trigger.target_class}; the attack "
            "success rate needs examples of other classes"
        )
    inputs = apply_trigger(x[keep], trigger) if triggered else x[keep]
    logits = checked_logits(model, inputs, y[keep], batch_size=batch_size)
    if trigger.target_class >= logits.shape[1]:
        raise ValueError(
            f"target class {trigger.target_class} is out of range for a model with {logits.shape[1]} outputs"
        )
    return float((logits.argmax(dim=1).numpy() == trigger.target_class).mean())


def attack_success_rate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, trigger: Trigger, *, batch_size: int = 512
) -> float:
    """Among examples whose true label is not the target class, the fraction predicted as the target once triggered.

    Target-class examples are excluded because predicting the target for them is
    simply correct and says nothing about the backdoor.
    """
    return _target_rate(model, x, y, trigger, triggered=True, batch_size=batch_size)


def natural_target_rate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, trigger: Trigger, *, batch_size: int = 512
) -> float:
    """The same population as :func:`attack_success_rate`, untriggered: the rate of plain misclassification into the target.

    This is the floor the attack success rate of a backdoor-free model sits
    near; an unlearned model's ASR should be compared with it (and with the
    retrained model's ASR), not with zero.
    """
    return _target_rate(model, x, y, trigger, triggered=False, batch_size=batch_size)
