"""Look up unlearning strategies by the names users type, with their settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedforget.strategies.base import Unlearner
from fedforget.strategies.calibrated import Calibrated
from fedforget.strategies.gradient_ascent import GradientAscent
from fedforget.strategies.retrain import Retrain
from fedforget.strategies.subtract import Subtract


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
    recovery_rounds: int | None = None
    """FedAvg rounds with the remaining clients after subtract / gradient-ascent (None: the strategy's default)."""
    noise_epsilon: float | None = None
    """subtract: privacy budget ε of the Gaussian noise FedRecovery adds (None: no noise)."""
    noise_sensitivity: float | None = None
    """subtract: the sensitivity d the noise is calibrated to (required with ``noise_epsilon``)."""
    ascent_accuracy_floor: float = 0.3
    """gradient-ascent: the client stops ascending once its own accuracy falls to this.

    The paper's 0.1 drives the digits model to chance level, from which two
    recovery rounds do not bring it back; 0.3 removes the canary (ASR 0.08)
    and keeps test accuracy within a point of the original (measured on digits).
    """
    model_factory: Callable[[], object] | None = None
    """gradient-ascent: fresh random models, to size the ball around the reference model."""

    def to_json(self) -> dict[str, object]:
        """The settings as recorded in reports (the model factory is code, not a setting)."""
        return {k: v for k, v in self.__dict__.items() if k != "model_factory"}

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
    Subtract.name: lambda options: Subtract(
        epsilon=options.noise_epsilon,
        sensitivity=options.noise_sensitivity,
        recovery_rounds=0 if options.recovery_rounds is None else options.recovery_rounds,
        recovery_epochs=options.local_epochs,
    ),
    GradientAscent.name: lambda options: GradientAscent(
        model_factory=options.model_factory,  # type: ignore[arg-type]
        accuracy_floor=options.ascent_accuracy_floor,
        recovery_rounds=2 if options.recovery_rounds is None else options.recovery_rounds,
        recovery_epochs=options.local_epochs,
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
