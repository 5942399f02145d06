"""Strategies by the names users type, and their settings in the one flat namespace users type them in.

The registry is open (as Opacus's accountant registry): a user's own
:class:`~fedforget.strategies.base.Unlearner` subclass becomes selectable
with ``--strategy`` and ``strategy=`` by :func:`register_unlearner`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from fedforget.strategies.base import Unlearner
from fedforget.strategies.calibrated import Calibrated
from fedforget.strategies.fedrecovery import FedRecovery
from fedforget.strategies.gradient_ascent import GradientAscent
from fedforget.strategies.misdirect import Misdirect
from fedforget.strategies.relabel import Relabel
from fedforget.strategies.replay import Replay
from fedforget.strategies.retrain import Retrain
from fedforget.strategies.settings import SettingInfo, SettingsError, StrategySettings, UnlearningContext
from fedforget.strategies.subtract import Subtract

U = TypeVar("U", bound=type[Unlearner])

_REGISTRY: dict[str, type[Unlearner]] = {}


def register_unlearner(cls: U) -> U:
    """Make ``cls`` selectable by its ``name``; usable as a class decorator.

    Its settings join the flat namespace of options: a name another
    strategy already uses must have the same type there.
    """
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' to be registered")
    settings = getattr(cls, "Settings", None)
    if not (isinstance(settings, type) and issubclass(settings, StrategySettings)):
        raise ValueError(f"{cls.__name__} needs a class attribute Settings, a StrategySettings dataclass")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a different strategy is already registered as {name!r}")
    known = setting_options()
    for info in settings.describe():
        other = known.get(info.option)
        if other is not None and (other.info.kind, other.info.optional) != (info.kind, info.optional):
            raise ValueError(
                f"{cls.__name__}'s setting {info.option!r} has another type than strategy "
                f"{other.strategies[0]!r}'s setting of that name"
            )
    _REGISTRY[name] = cls
    return cls



def strategy_names() -> tuple[str, ...]:
    """Known strategies, exact retraining first, then in the order they were registered."""
    return tuple(_REGISTRY)


def unlearner_class(name: str) -> type[Unlearner]:
    """The strategy called ``name``; an unknown name is an error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SettingsError(
            f"unknown unlearning strategy {name!r}; available: {', '.join(strategy_names())}"
        ) from None


@dataclass(frozen=True)
class SettingOption:
    """One option of the flat namespace, and which strategies have it with which default."""

    info: SettingInfo
    defaults: dict[str, object] = field(default_factory=dict)

    @property
    def strategies(self) -> list[str]:
        return list(self.defaults)


def setting_options() -> dict[str, SettingOption]:
    """Every strategy setting by the option name users type, across all registered strategies."""
    options: dict[str, SettingOption] = {}
    for name, cls in _REGISTRY.items():
        for info in cls.Settings.describe():
            option = options.setdefault(info.option, SettingOption(info))
            option.defaults[name] = info.default
    return options


for _builtin in (Retrain, Replay, Subtract, Calibrated, FedRecovery, GradientAscent, Relabel, Misdirect):
    register_unlearner(_builtin)


@dataclass(frozen=True)
class StrategyChoice:
    """A strategy and the settings a user gave for it explicitly (the rest are its defaults).

    This is what a simulation stores for its resume and what the run config
    and the CLI produce, so the three agree by construction.
    """

    name: str = "retrain"
    overrides: Mapping[str, object] = field(default_factory=dict)
    """Settings by option name (``calibration-ratio``); only those given explicitly."""

    def __post_init__(self) -> None:
        self.settings()  # check now, before anything is written

    def settings(self) -> StrategySettings:
        """The chosen strategy's full settings; a setting it lacks is an error naming who has it."""
        cls = unlearner_class(self.name)
        own = {info.option for info in cls.Settings.describe()}
        options = setting_options()
        for key in self.overrides:
            option = key.replace("_", "-")
            if option not in own:
                owners = options[option].strategies if option in options else []
                if not owners:  # a typo: say what it could have been
                    raise SettingsError(
                        f"strategy {self.name!r} has no setting {option!r}; its settings are: "
                        f"{', '.join(sorted(own)) or 'none'}"
                    )
                raise SettingsError(
                    f"setting {option!r} does not apply to strategy {self.name!r}: "
                    f"it is a setting of {', '.join(owners)}"
                )
        return cls.Settings.from_mapping({key.replace("_", "-"): value for key, value in self.overrides.items()})

    def build(self, context: UnlearningContext | None = None) -> Unlearner:
        """The strategy, ready to unlearn in a federation described by ``context``."""
        return unlearner_class(self.name)(self.settings(), context)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "settings": dict(self.overrides)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> StrategyChoice:
        settings = data.get("settings", {})
        if not isinstance(settings, Mapping):
            raise SettingsError(f"strategy settings must be a mapping, got {settings!r}")
        return cls(name=str(data.get("name", "retrain")), overrides=dict(settings))


def make_unlearner(
    name: str,
    settings: Mapping[str, object] | StrategySettings | None = None,
    context: UnlearningContext | None = None,
) -> Unlearner:
    """Instantiate the strategy called ``name`` with its settings (by option name, or its dataclass)."""
    if isinstance(settings, StrategySettings):
        return unlearner_class(name)(settings, context)
    return StrategyChoice(name, dict(settings or {})).build(context)
