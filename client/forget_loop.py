"""The loop client-side unlearning methods share: steps on the forget data until a stop rule or a budget ends it.

Relabelling and misdirection differ only in the loss of one step; how long
they run is the same rule for both, so it lives here once: at most
``epochs`` epochs over the forget data (the step budget), and an early stop
as soon as the model's accuracy on that data, with its true labels, has
fallen to ``accuracy_floor`` (checked about ten times per epoch, because
each check evaluates all of the client's data).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedforget.arrays import Arrays
from fedforget.client.training import evaluate

Step = Callable[[torch.Tensor, torch.Tensor], None]
"""One optimisation step on one batch (inputs, true labels)."""

CHECKS_PER_EPOCH = 10
"""How often the stop rule is checked: about ten times per epoch, as the ClientApp's gradient ascent does."""


def check_budget(*, lr: float, epochs: float, batch_size: int, accuracy_floor: float, momentum: float) -> None:
    """Refuse settings no loop can run with, naming the setting."""
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"the client-side unlearning learning rate must be positive, got {lr}")
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"the client-side unlearning epochs must be positive, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"the client-side unlearning batch size must be >= 1, got {batch_size}")
    if not math.isfinite(accuracy_floor) or accuracy_floor > 1.0:
        raise ValueError(f"the accuracy floor must be a number <= 1, got {accuracy_floor}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")


def run_until_floor(
    model: nn.Module,
    forget: Dataset,
    step: Step,
    *,
    epochs: float,
    batch_size: int,
    accuracy_floor: float,
    seed: int,
) -> float:
    """Call ``step`` on shuffled batches of ``forget`` until the budget or the stop rule ends; return epochs spent.

    A model already at or below the floor takes no step (0 epochs). Batches
    are shuffled by a generator seeded with ``seed``; a fraction of an epoch
    runs a prefix of the shuffled batches.
    """
    size = len(forget)  # type: ignore[arg-type]
    if size == 0:
        raise ValueError("this client has no examples to unlearn")
    loader = DataLoader(forget, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    per_epoch = len(loader)
    total = max(1, round(epochs * per_epoch))
    check_every = max(1, per_epoch // CHECKS_PER_EPOCH)
    if evaluate(model, forget).accuracy <= accuracy_floor:
        return 0.0
    steps = 0
    while steps < total:
        for inputs, labels in loader:
            model.train()
            step(inputs, labels)
            steps += 1
            if (steps % check_every == 0 or steps == total) and evaluate(model, forget).accuracy <= accuracy_floor:
                return steps / per_epoch
            if steps == total:
                break
    return steps / per_epoch


def state_arrays(model: nn.Module) -> Arrays:
    """The model's weights as named numpy arrays in state_dict order (what the ClientApp returns)."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}
