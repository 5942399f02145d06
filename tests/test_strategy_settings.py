"""Strategy settings and the open registry (strategies/settings.py, strategies/registry.py).

Every way a user sets a strategy (CLI options, run-config keys, a stored
simulation.json) goes through these classes, so their errors are what a
user sees: each must name the option and say what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from fedforget.strategies import registry
from fedforget.strategies.base import HistoryView, UnlearningOutcome, UnlearningRequest, Unlearner
from fedforget.strategies.calibrated import Calibrated, CalibratedSettings
from fedforget.strategies.fedrecovery import FedRecoverySettings
from fedforget.strategies.registry import (
    StrategyChoice,
    make_unlearner,
    register_unlearner,
    setting_options,
    strategy_names,
    unlearner_class,
)
from fedforget.strategies.replay import ReplaySettings
from fedforget.strategies.settings import SettingsError, StrategySettings, UnlearningContext, setting
from fedforget.strategies.subtract import Subtract, SubtractSettings


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it (the registry is process-wide)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


# --------------------------------------------------------------------------- values


def test_values_are_converted_to_the_declared_type() -> None:
    replay = StrategyChoice("replay", {"warmup-rounds": "3", "select-fraction": "0.5", "abnormality-threshold": 4,
                                       "estimate": "lbfgs"}).settings()
    assert isinstance(replay, ReplaySettings)
    assert (replay.warmup_rounds, replay.select_fraction, replay.abnormality_threshold) == (3, 0.5, 4.0)
    assert type(replay.warmup_rounds) is int and type(replay.abnormality_threshold) is float
    assert ReplaySettings(warmup_rounds=2.0).warmup_rounds == 2  # type: ignore[arg-type]  # an integral float
    assert ReplaySettings(abnormality_threshold=None).abnormality_threshold is None  # optional: "none"


@pytest.mark.parametrize(
    ("strategy", "settings", "message"),
    [
        ("calibrated", {"calibration-ratio": 1.5}, "calibrated setting calibration-ratio must be at most 1, got 1.5"),
        ("calibrated", {"calibration-ratio": 0}, "calibrated setting calibration-ratio must be greater than 0, got 0"),
        ("calibrated", {"calibration-ratio": "half"}, "calibrated setting calibration-ratio must be a number, got 'half'"),
        ("calibrated", {"calibration-ratio": True}, "calibrated setting calibration-ratio must be a number, got True"),
        ("calibrated", {"calibration-ratio": float("inf")}, "calibrated setting calibration-ratio must be finite"),
        ("calibrated", {"calibration-interval": 0}, "calibrated setting calibration-interval must be at least 1, got 0"),
        ("calibrated", {"calibration-norm": "l1"}, "calibrated setting calibration-norm must be one of layer, global"),
        ("replay", {"warmup-rounds": 1.5}, "replay setting warmup-rounds must be an integer, got 1.5"),
        ("replay", {"warmup-rounds": -1}, "replay setting warmup-rounds must be at least 0, got -1"),
        ("replay", {"estimate": "newton"}, "replay setting estimate must be one of lbfgs, stored, got 'newton'"),
        ("replay", {"lbfgs-memory": None}, "replay setting lbfgs-memory needs a value (it has no 'none')"),
        ("subtract", {"recovery-rounds": "three"}, "subtract setting recovery-rounds must be an integer, got 'three'"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_option(strategy: str, settings: dict, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        StrategyChoice(strategy, settings)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that catch ValueError keep working


def test_cross_field_rules_are_checked() -> None:
    with pytest.raises(SettingsError, match="warmup-rounds >= 1"):
        ReplaySettings(estimate="lbfgs", warmup_rounds=0, correction_interval=0)
    ReplaySettings(estimate="stored", warmup_rounds=0, correction_interval=0)  # no curvature needed
    with pytest.raises(SettingsError, match="noise-epsilon"):
        FedRecoverySettings(noise_sensitivity=0.5)


def test_an_unknown_setting_lists_the_known_ones() -> None:
    with pytest.raises(SettingsError) as caught:
        ReplaySettings.from_mapping({"warmup": 2})
    assert str(caught.value) == (
        "strategy 'replay' has no setting 'warmup'; its settings are: abnormality-threshold, correction-interval, "
        "estimate, final-rounds, lbfgs-memory, rollback, rollback-tolerance, select-fraction, warmup-rounds"
    )
    with pytest.raises(SettingsError, match="its settings are: none"):
        StrategyChoice("retrain", {"speed": 2})


def test_a_setting_of_another_strategy_names_its_owners() -> None:
    with pytest.raises(SettingsError) as caught:
        StrategyChoice("replay", {"calibration-ratio": 0.5})
    assert str(caught.value) == "setting 'calibration-ratio' does not apply to strategy 'replay': it is a setting of calibrated"
    with pytest.raises(SettingsError, match="it is a setting of subtract, fedrecovery, gradient-ascent, relabel, misdirect"):
        StrategyChoice("retrain", {"recovery_rounds": 1})  # Python field names are accepted too


def test_settings_are_named_by_option_or_field_and_recorded_in_full() -> None:
    by_option = StrategyChoice("calibrated", {"calibration-ratio": 0.25}).settings()
    by_field = StrategyChoice("calibrated", {"calibration_ratio": 0.25}).settings()
    assert by_option == by_field == CalibratedSettings(calibration_ratio=0.25)
    assert by_option.to_json() == {"calibration_interval": None, "calibration_ratio": 0.25, "calibration_norm": "layer"}


def test_one_option_may_have_a_different_default_per_strategy() -> None:
    option = setting_options()["recovery-rounds"]
    assert option.defaults == {"subtract": 3, "fedrecovery": 0, "gradient-ascent": 2, "relabel": 2, "misdirect": 2}
    assert option.info.kind is int


# --------------------------------------------------------------------------- choices and instances


def test_a_choice_survives_its_json_round_trip() -> None:
    choice = StrategyChoice("replay", {"estimate": "lbfgs", "warmup-rounds": 2, "abnormality-threshold": None})
    stored = json.loads(json.dumps(choice.to_json()))
    assert stored == {"name": "replay", "settings": {"estimate": "lbfgs", "warmup-rounds": 2,
                                                     "abnormality-threshold": None}}
    again = StrategyChoice.from_json(stored)
    assert again == choice and again.settings() == choice.settings()
    assert StrategyChoice.from_json({}) == StrategyChoice("retrain")
    with pytest.raises(SettingsError, match="must be a mapping"):
        StrategyChoice.from_json({"name": "replay", "settings": ["estimate", "lbfgs"]})


def test_a_choice_builds_the_strategy_with_the_federations_context() -> None:
    context = UnlearningContext(local_epochs=3.0, retention_interval=2)
    built = StrategyChoice("calibrated", {"calibration-ratio": 0.5}).build(context)
    assert isinstance(built, Calibrated) and built.context is context
    assert built.calibration_epochs == 1.5 and built.interval == 2
    assert make_unlearner("subtract", {"recovery-rounds": 0}).needs_client_work is False
    assert make_unlearner("subtract", SubtractSettings(recovery_rounds=2)).settings.recovery_rounds == 2


def test_a_strategy_refuses_another_strategys_settings_object() -> None:
    with pytest.raises(TypeError, match="Subtract takes SubtractSettings, got CalibratedSettings"):
        Subtract(CalibratedSettings())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes SubtractSettings"):
        make_unlearner("subtract", CalibratedSettings())


def test_an_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(SettingsError) as caught:
        unlearner_class("fedrecover")
    assert str(caught.value) == (
        "unknown unlearning strategy 'fedrecover'; available: retrain, replay, subtract, calibrated, fedrecovery, "
        "gradient-ascent, relabel, misdirect"
    )


# --------------------------------------------------------------------------- the open registry


@dataclass(frozen=True)
class ScaleSettings(StrategySettings):
    strategy: ClassVar[str] = "toy-scale"

    factor: float = setting(0.5, "multiply the current model by this", minimum=0.0)
    recovery_rounds: int = setting(0, "shared with the built-in strategies, with the same type", minimum=0)


class Scale(Unlearner):
    """A user's own strategy: shrink the current model (no client work)."""

    name: ClassVar[str] = "toy-scale"
    Settings: ClassVar[type[StrategySettings]] = ScaleSettings
    settings: ScaleSettings

    @property
    def needs_client_work(self) -> bool:
        return False

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation) -> UnlearningOutcome:  # type: ignore[no-untyped-def]
        model = {k: v * self.settings.factor for k, v in history.model(request.completed_rounds).items()}
        federation.start_trajectory(request.completed_rounds - 1, {"strategy": self.name})
        federation.record_round(request.completed_rounds, model, [])
        return UnlearningOutcome(model, 0, request.completed_rounds - 1)


def test_a_users_strategy_is_selectable_by_name(own_registry: None) -> None:
    assert register_unlearner(Scale) is Scale
    assert strategy_names()[-1] == "toy-scale"
    assert setting_options()["recovery-rounds"].defaults["toy-scale"] == 0
    assert setting_options()["factor"].defaults == {"toy-scale": 0.5}
    built = StrategyChoice("toy-scale", {"factor": "2"}).build()
    assert isinstance(built, Scale) and built.settings.factor == 2.0
    with pytest.raises(SettingsError, match="toy-scale setting factor must be at least 0"):
        make_unlearner("toy-scale", {"factor": -1})
    register_unlearner(Scale)  # registering the same class again is harmless


def test_a_users_strategy_runs_through_the_registry(own_registry: None, tmp_path) -> None:
    from toy_federation import ToyFederation, record_history

    register_unlearner(Scale)
    initial = {"w": np.ones(3, np.float32)}
    recorded = record_history(tmp_path / "store", initial, [["a", "b"]] * 2, {"a": 1, "b": 1},
                              lambda r, c, model: {"w": np.full(3, r, np.float32)})
    federation = ToyFederation(recorded.store, {"a": 1, "b": 1})
    outcome = make_unlearner("toy-scale", {"factor": 0.25}).run(
        UnlearningRequest(frozenset({"a"}), 2), recorded.store.reader(), federation)
    np.testing.assert_allclose(outcome.model["w"], 0.25 * recorded.models[2]["w"])
    assert outcome.round_trips == 0 and federation.calls == [("start_trajectory", 1), ("record_round", 2)]


def test_registration_refuses_a_clashing_type_for_a_shared_option(own_registry: None) -> None:
    @dataclass(frozen=True)
    class FloatRounds(StrategySettings):
        strategy: ClassVar[str] = "toy-float"
        recovery_rounds: float = setting(1.5, "rounds, but fractional")

    class Clash(Scale):
        name: ClassVar[str] = "toy-float"
        Settings: ClassVar[type[StrategySettings]] = FloatRounds

    with pytest.raises(ValueError, match="Clash's setting 'recovery-rounds' has another type than strategy 'subtract'"):
        register_unlearner(Clash)
    assert "toy-float" not in strategy_names()


def test_registration_needs_a_name_and_a_settings_dataclass(own_registry: None) -> None:
    class NoSettings(Scale):
        name: ClassVar[str] = "toy-none"
        Settings = None  # type: ignore[assignment]

    class NoName(Scale):
        name: ClassVar[str] = ""

    class Impostor(Scale):
        name: ClassVar[str] = "retrain"

    with pytest.raises(ValueError, match="NoSettings needs a class attribute Settings"):
        register_unlearner(NoSettings)
    with pytest.raises(ValueError, match="NoName needs a class attribute name"):
        register_unlearner(NoName)
    with pytest.raises(ValueError, match="a different strategy is already registered as 'retrain'"):
        register_unlearner(Impostor)
    assert unlearner_class("retrain").__name__ == "Retrain"


def test_settings_fields_must_have_a_setting_type() -> None:
    @dataclass(frozen=True)
    class Listy(StrategySettings):
        strategy: ClassVar[str] = "toy-list"
        rounds: list = setting((1, 2), "a list is no option type")  # type: ignore[type-arg]

    with pytest.raises(TypeError, match="Listy.rounds: strategy settings are int, float, str or bool"):
        Listy()


# --------------------------------------------------------------------------- stored simulations


def _legacy(strategy: str, **fields: object) -> dict[str, object]:
    """A simulation.json as written before strategies had settings dataclasses (every flat field present)."""
    from fedforget.simulations.config import SimulationConfig

    data = SimulationConfig(strategy="retrain").to_json()
    data.pop("strategy_settings")
    data.update(strategy=strategy, calibration_ratio=0.5, calibration_norm="layer", recovery_rounds=None,
                noise_epsilon=None, noise_sensitivity=None, ascent_accuracy_floor=0.3)
    data.update(fields)
    return data


def test_an_old_subtract_run_becomes_fedrecovery_with_its_noise() -> None:
    from fedforget.simulations.config import SimulationConfig

    config = SimulationConfig.from_json(_legacy("subtract", noise_epsilon=1.0, noise_sensitivity=0.2))
    assert config.strategy == "fedrecovery"
    assert config.strategy_settings == {"noise-epsilon": 1.0, "noise-sensitivity": 0.2}
    settings = config.strategy_choice().settings()
    assert isinstance(settings, FedRecoverySettings) and settings.sigma > 0
    config.validate()


def test_old_flat_fields_keep_only_what_the_strategy_has() -> None:
    from fedforget.simulations.config import SimulationConfig

    calibrated = SimulationConfig.from_json(_legacy("calibrated", calibration_ratio=0.25, calibration_norm="global"))
    assert calibrated.strategy_settings == {"calibration-ratio": 0.25, "calibration-norm": "global"}
    ascent = SimulationConfig.from_json(_legacy("gradient-ascent", recovery_rounds=1))
    assert ascent.strategy_settings == {"recovery-rounds": 1, "ascent-accuracy-floor": 0.3}
    assert SimulationConfig.from_json(_legacy("retrain")).strategy_settings == {}


def test_a_new_subtract_run_stays_subtract() -> None:
    from fedforget.simulations.config import SimulationConfig

    config = SimulationConfig(strategy="subtract", strategy_settings={"recovery-rounds": 2})
    again = SimulationConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and again.strategy == "subtract"
