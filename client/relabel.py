"""Fine-tuning with modified labels: a withdrawing client trains its model to be wrong on its own data.

The practical baseline of the machine-unlearning literature: fine-tune the
trained model on the forget set with wrong labels (Graves, Nagisetty,
Ganesh: "Amnesiac Machine Learning", AAAI 2021, relabel each forget example
with a random wrong class; Golatkar et al. 2020 and Kurmanji et al. 2023 use
"random labels" as a baseline), or with *complementary* labels that only say
what the class is not (Ishida et al., "Learning from Complementary Labels",
NeurIPS 2017: minimise −log(1 − p_y)). The literature warns that it
over-forgets: pushing the forget set to wrong classes also damages those
classes for everyone, which the evidence's per-class accuracy and
over-forgetting flag measure.

Pure torch; the strategy side (recovery rounds) is
:mod:`fedforget.strategies.relabel`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from fedforget.arrays import Arrays
from fedforget.client.forget_loop import check_budget, run_until_floor, state_arrays
from fedforget.strategies.client_methods import RELABEL_MODES, RelabelSettings


def wrong_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A class other than each true label, uniformly among the num_classes − 1 others."""
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + offsets) % num_classes


def complementary_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean −log(1 − p_y): zero when the true class has no probability, large when it is certain."""
    p_true = torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return -torch.log1p(-p_true.clamp(max=1.0 - 1e-6)).mean()


def relabel_fine_tune(model: nn.Module, forget: Dataset, settings: RelabelSettings, *, seed: int) -> tuple[Arrays, float]:
    """Fine-tune ``model`` in place on ``forget`` with modified labels; return its weights and the epochs spent.

    Runs until :func:`~fedforget.client.forget_loop.run_until_floor`'s stop
    rule: the accuracy on ``forget`` (true labels) falls to
    ``settings.accuracy_floor``, or ``settings.epochs`` epochs are spent.
    """
    if settings.mode not in RELABEL_MODES:
        raise ValueError(f"relabel mode must be one of {', '.join(RELABEL_MODES)}, got {settings.mode!r}")
    check_budget(lr=settings.lr, epochs=settings.epochs, batch_size=settings.batch_size,
                 accuracy_floor=settings.accuracy_floor, momentum=settings.momentum)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    generator = torch.Generator().manual_seed(seed + 1)
    cross_entropy = nn.CrossEntropyLoss()

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        optimiser.zero_grad()
        logits = model(inputs)
        if settings.mode == "random":
            loss = cross_entropy(logits, wrong_labels(labels, logits.shape[1], generator))
        else:
            loss = complementary_loss(logits, labels)
        loss.backward()
        optimiser.step()

    epochs = run_until_floor(model, forget, step, epochs=settings.epochs, batch_size=settings.batch_size,
                             accuracy_floor=settings.accuracy_floor, seed=seed)
    return state_arrays(model), epochs
