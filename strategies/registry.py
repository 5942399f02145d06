"""Look up unlearning strategies by the names users type, with their settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedforget.strategies.base import Unlearner
from fedforget.strategies.calibrated import Calibrated
from fedforget.strategies.retrain import Retrain


@dataclass(frozen=True)
class UnlearningOptions:
    """Every strategy's settings in one place; each strategy reads the ones it has."""

    local_epochs: float = 2.0
    """The federation's local epochs E (FedEraser calibrates with r·E)."""
    retention_interval: int = 1
    """The history's Δt: client updates are kept every Δt rounds."""
    calibration_ratio: float = 0.5
    """FedEraser's r."""
    calibration_norm: str = "layer"
    """FedEraser's norm: per array ("layer", as its reference code) or over the whole update ("global")."""

    @classmethod
    def for_config(cls, config: object, **overrides: object) -> UnlearningOptions:
        """Options matching a simulation's settings (its E and Δt)."""
        base = {
            "local_epochs": float(config.local_epochs),  # type: ignore[attr-defined]
            "retention_interval": int(config.retention_interval),  # type: ignore[attr-defined]
        }
        return cls(**{**base, **overrides})  # type: ignore[arg-type]


_FACTORIES: dict[str, Callable[[UnlearningOptions], Unlearner]] = {
    Retrain.name: lambda options: Retrain(),
    Calibrated.name: lambda options: Calibrated(
        retention_interval=options.retention_interval,
        calibration_ratio=options.calibration_ratio,
        local_epochs=options.local_epochs,
        norm=options.calibration_norm,
    ),
}

STRATEGY_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""Known strategies, exact retraining first."""


def make_unlearner(name: str, options: UnlearningOptions | None = None) -> Unlearner:
    """Instantiate the strategy called ``name``; unknown names list the known ones."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown unlearning strategy {name!r}; available: {', '.join(STRATEGY_NAMES)}"
        ) from None
    return factory(options or UnlearningOptions())
