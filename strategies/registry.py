"""Look up unlearning strategies by the names users type on the command line."""

from __future__ import annotations

from fedforget.strategies.base import Unlearner
from fedforget.strategies.retrain import Retrain

_STRATEGIES: dict[str, type[Unlearner]] = {Retrain.name: Retrain}

STRATEGY_NAMES: tuple[str, ...] = tuple(sorted(_STRATEGIES))


def make_unlearner(name: str) -> Unlearner:
    """Instantiate the strategy called ``name``; unknown names list the known ones."""
    try:
        return _STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown unlearning strategy {name!r}; available: {', '.join(STRATEGY_NAMES)}"
        ) from None
