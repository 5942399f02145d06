"""Local training and evaluation of any classification ``nn.Module``.

Kept free of Flower so the same loops serve the ClientApp, the server's
central evaluation and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class TrainingResult:
    """What one call to :func:`train_local` did, reported back to the server."""

    num_examples: int
    epochs: float
    mean_loss: float


@dataclass(frozen=True)
class EvaluationResult:
    """Loss and accuracy of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float


def train_local(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    momentum: float = 0.9,
) -> TrainingResult:
    """Run SGD on ``data`` for ``epochs`` passes (a fraction trains on a prefix of batches).

    The shuffling generator is seeded so that a replayed round (exact
    retraining) sees the same batches as the original run would have.
    Fractional epochs exist because calibration training runs ``r * E`` epochs.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    num_examples = len(data)  # type: ignore[arg-type]
    if num_examples == 0:
        raise ValueError("this client has no training examples")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    batches_per_epoch = len(loader)
    total_batches = max(1, round(epochs * batches_per_epoch))
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    done, loss_sum = 0, 0.0
    while done < total_batches:
        for inputs, labels in loader:
            optimiser.zero_grad()
            loss = loss_fn(model(inputs), labels)
            loss.backward()
            optimiser.step()
            loss_sum += float(loss.detach())
            done += 1
            if done == total_batches:
                break
    return TrainingResult(
        num_examples=num_examples,
        epochs=total_batches / batches_per_epoch,
        mean_loss=loss_sum / total_batches,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 512) -> EvaluationResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    num_examples = len(data)  # type: ignore[arg-type]
    if num_examples == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for inputs, labels in DataLoader(data, batch_size=batch_size):
        logits = model(inputs)
        loss_sum += float(loss_fn(logits, labels))
        correct += int((logits.argmax(dim=1) == labels).sum())
    return EvaluationResult(
        num_examples=num_examples, loss=loss_sum / num_examples, accuracy=correct / num_examples
    )
