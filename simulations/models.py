"""Small CNN classifiers, one per simulation dataset.

The models deliberately have no BatchNorm: its running statistics are buffers,
not gradients, and averaging them across clients (or subtracting one client's
contribution when unlearning) has no clean meaning.  Conv + ReLU + max-pool +
linear layers keep every piece of state a trainable parameter.  They are kept
small so that simulated rounds on a 2-core CPU take seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .datasets import DATASET_NAMES
from .model_registry import is_model_choice, model_names, resolve_model
from .user_model import load_factory


class DigitsCNN(nn.Module):
    """For 1x8x8 digits: two 3x3 convolutions, one pooling, two linear layers (~38k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return unnormalised class logits of shape ``(batch, num_classes)``."""
        logits: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return logits


class LeNet28(nn.Module):
    """LeNet-style CNN for 1x28x28 MNIST-like images (~66k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5),  # 28 -> 24
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 12
            nn.Conv2d(16, 32, kernel_size=5),  # -> 8
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> 4
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return unnormalised class logits of shape ``(batch, num_classes)``."""
        logits: torch.Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return logits


def build_model(spec: str, *, seed: int | None = None) -> nn.Module:
    """Build a freshly initialised model: a dataset's own (``digits``), a named one (``resnet-small``,
    :mod:`.model_registry`) or yours (``package.module:function``).

    With ``seed`` the initial weights are reproducible: the server and every
    client (and a later retraining from scratch) can start from the same model
    without shipping it.  Seeding happens inside ``torch.random.fork_rng`` so the
    caller's global RNG state is left untouched.  ``function`` is called with
    no arguments and must return an ``nn.Module``.
    """
    factory = _factory(spec)
    if seed is None:
        return _checked(factory(), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _checked(factory(), spec)


def _factory(spec: str) -> Callable[[], nn.Module]:
    if is_model_choice(spec):
        return load_factory(resolve_model(spec))  # type: ignore[return-value]
    if spec == "digits":
        return DigitsCNN
    if spec in ("mnist", "fashion-mnist"):
        return LeNet28
    raise ValueError(
        f"unknown model {spec!r}: give a dataset ({', '.join(DATASET_NAMES)}), a model name "
        f"({', '.join(model_names())}) or package.module:function"
    )


def _checked(model: object, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned {type(model).__name__}, not a torch nn.Module")
    return model


class SeededModelFactory:
    """Fresh models of one architecture (see :func:`build_model`) with seeds ``seed, seed+1, ...``.

    Strategies that draw random models (gradient ascent sizes its ball with
    them) then give the same result whatever else used torch's global RNG.
    """

    def __init__(self, spec: str, seed: int = 0) -> None:
        self.spec = spec
        self._next_seed = seed

    def __call__(self) -> torch.nn.Module:
        model = build_model(self.spec, seed=self._next_seed)
        self._next_seed += 1
        return model
