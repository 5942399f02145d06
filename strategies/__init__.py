"""Unlearning strategies: pure torch/numpy algorithms over the recorded history."""

from fedforget.strategies.base import (
    Federation,
    HistoryView,
    RoundResult,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.registry import STRATEGY_NAMES, make_unlearner
from fedforget.strategies.retrain import Retrain

__all__ = [
    "STRATEGY_NAMES",
    "Federation",
    "HistoryView",
    "Retrain",
    "RoundResult",
    "UnlearningOutcome",
    "UnlearningRequest",
    "Unlearner",
    "make_unlearner",
]
