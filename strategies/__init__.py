"""Unlearning strategies: pure torch/numpy algorithms over the recorded history."""

from fedforget.strategies.base import (
    Federation,
    HistoryView,
    RoundResult,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.registry import (
    StrategyChoice,
    make_unlearner,
    register_unlearner,
    strategy_names,
)
from fedforget.strategies.retrain import Retrain
from fedforget.strategies.settings import StrategySettings, UnlearningContext, setting

__all__ = [
    "Federation",
    "HistoryView",
    "Retrain",
    "RoundResult",
    "StrategyChoice",
    "StrategySettings",
    "UnlearningContext",
    "UnlearningOutcome",
    "UnlearningRequest",
    "Unlearner",
    "make_unlearner",
    "register_unlearner",
    "setting",
    "strategy_names",
]
