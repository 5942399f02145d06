"""Users' own models, named ``toy_models:FUNCTION`` in tests (conftest puts tests/ on sys.path)."""

from __future__ import annotations

from torch import nn


def linear_digits() -> nn.Module:
    """A model for 8x8 digits that declares the training it wants."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


linear_digits.training_defaults = {"lr": 0.3, "batch_size": 8}  # type: ignore[attr-defined]


def plain_digits() -> nn.Module:
    """A model for 8x8 digits that declares nothing."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def negative_lr() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


negative_lr.training_defaults = {"lr": -0.1}  # type: ignore[attr-defined]


def three_classes() -> nn.Module:
    """Returns three class scores where the datasets have ten."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
