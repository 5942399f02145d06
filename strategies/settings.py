"""Each strategy's settings: one dataclass next to the strategy, the single source of every way to set them.

The CLI's options (``--calibration-ratio``), the deployment's run-config keys
(``unlearning.calibration-ratio``) and the settings a simulation stores for
its resume are all derived from these dataclasses, so a setting is declared
once, with its type, default, allowed values and help.

Names form one flat namespace across strategies (a user types
``--recovery-rounds`` whatever the strategy); two strategies may share a
name only with the same type. A strategy's default may differ from
another's for the same name.

What the *federation* decides (its local epochs E, the history's retention
Δt, how to build a fresh model) is not a strategy setting: it comes in an
:class:`UnlearningContext`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fedforget.errors import FedforgetError


class SettingsError(FedforgetError, ValueError):
    """A strategy setting has the wrong type or value, or does not exist for the strategy."""


@dataclass(frozen=True)
class UnlearningContext:
    """What the federation knows that strategies need: not settings a user picks per strategy."""

    local_epochs: float = 1.0
    """The federation's local epochs E per round (exact replays train as long; FedEraser calibrates r·E)."""
    retention_interval: int = 1
    """The history's Δt: client updates are kept every Δt rounds."""
    model_factory: Callable[[], Any] | None = None
    """Fresh, randomly initialised models of the federation's architecture (gradient ascent sizes its ball with them)."""


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the CLI, the run config and the docs show it."""

    name: str
    """The Python field name (``calibration_ratio``)."""
    option: str
    """The kebab-case name users type (``calibration-ratio``)."""
    kind: type
    """int, float, str or bool."""
    optional: bool
    """Whether ``None`` is a value (e.g. "no noise")."""
    default: object
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False


def setting(
    default: object,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> Any:
    """A dataclass field carrying what the CLI and the run config need to offer and check it."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "minimum": minimum,
            "maximum": maximum,
            "exclusive_minimum": exclusive_minimum,
        },
    )


S = TypeVar("S", bound="StrategySettings")


@dataclass(frozen=True)
class StrategySettings:
    """Base of every strategy's settings; values are checked when the object is made."""

    strategy: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for info in self.describe():
            value = getattr(self, info.name)
            object.__setattr__(self, info.name, _checked(info, value, self.strategy))
        self.check()

    def check(self) -> None:
        """Cross-field rules of a strategy; override and raise :class:`SettingsError`."""

    @classmethod
    def describe(cls) -> list[SettingInfo]:
        """Every setting with its type, default, help and bounds."""
        hints = typing.get_type_hints(cls)
        infos = []
        for f in dataclasses.fields(cls):
            kind, optional = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
            infos.append(
                SettingInfo(
                    name=f.name,
                    option=f.name.replace("_", "-"),
                    kind=kind,
                    optional=optional,
                    default=f.default,
                    help=str(f.metadata.get("help", "")),
                    choices=tuple(f.metadata.get("choices", ())),
                    minimum=f.metadata.get("minimum"),
                    maximum=f.metadata.get("maximum"),
                    exclusive_minimum=bool(f.metadata.get("exclusive_minimum", False)),
                )
            )
        return infos

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, object]) -> S:
        """Settings from ``{name or option: value}``; unknown names are an error that lists the known ones."""
        known = {info.name: info for info in cls.describe()}
        by_option = {info.option: info.name for info in known.values()}
        fields: dict[str, object] = {}
        for key, value in values.items():
            name = by_option.get(key, key)
            if name not in known:
                raise SettingsError(
                    f"strategy {cls.strategy!r} has no setting {key!r}; its settings are: "
                    f"{', '.join(sorted(by_option)) or 'none'}"
                )
            fields[name] = value
        return cls(**fields)

    def to_json(self) -> dict[str, object]:
        """The settings as recorded in reports, the ledger and a simulation's stored configuration."""
        return {info.name: getattr(self, info.name) for info in self.describe()}


def _kind(hint: object, where: str) -> tuple[type, bool]:
    """(int | float | str | bool, optional) of a field's annotation."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        (hint,) = [a for a in args if a is not type(None)]
    if hint not in (int, float, str, bool):
        raise TypeError(f"{where}: strategy settings are int, float, str or bool (optionally None), not {hint!r}")
    return hint, optional  # type: ignore[return-value]


def _checked(info: SettingInfo, value: object, strategy: str) -> object:
    """``value`` converted to the setting's type and checked against its bounds and choices."""
    label = f"{strategy} setting {info.option}"
    if value is None:
        if info.optional:
            return None
        raise SettingsError(f"{label} needs a value (it has no 'none')")
    if info.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise SettingsError(f"{label} must be true or false, got {value!r}")
    if info.kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{label} must be a string, got {value!r}")
        if info.choices and value not in info.choices:
            raise SettingsError(f"{label} must be one of {', '.join(info.choices)}, got {value!r}")
        return value
    if isinstance(value, bool):
        raise SettingsError(f"{label} must be a number, got {value!r}")
    try:
        number = info.kind(value) if not isinstance(value, str) else info.kind(value.strip())
    except (TypeError, ValueError):
        raise SettingsError(f"{label} must be {'an integer' if info.kind is int else 'a number'}, got {value!r}") from None
    if info.kind is int and isinstance(value, float) and not float(value).is_integer():
        raise SettingsError(f"{label} must be an integer, got {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise SettingsError(f"{label} must be finite, got {value!r}")
    if info.minimum is not None:
        if info.exclusive_minimum and not number > info.minimum:
            raise SettingsError(f"{label} must be greater than {info.minimum:g}, got {value!r}")
        if not info.exclusive_minimum and number < info.minimum:
            raise SettingsError(f"{label} must be at least {info.minimum:g}, got {value!r}")
    if info.maximum is not None and number > info.maximum:
        raise SettingsError(f"{label} must be at most {info.maximum:g}, got {value!r}")
    return number
