"""The CLI's strategy options, derived from the strategies' settings dataclasses.

A command decorated with :func:`with_strategy_options` gets one option per
strategy setting (``--calibration-ratio``, ``--final-rounds``, ...), typed and
documented as the dataclass declares it, with each strategy's default in the
help. The command receives the ones given as ``strategy_settings``, a dict
by option name, which :class:`~fedforget.strategies.registry.StrategyChoice`
checks against the chosen strategy. Nothing here imports torch or flwr.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

from fedforget.strategies.registry import SettingOption, setting_options

F = TypeVar("F", bound=Callable[..., Any])

NONE_WORDS = ("none",)
"""What a user types for a setting whose value may be None (e.g. ``--noise-epsilon none``)."""


def _defaults(option: SettingOption) -> str:
    """Each owning strategy's default, as ``--help`` shows it: which strategies have the setting, too."""
    return ", ".join(f"{name}: {_shown(value)}" for name, value in option.defaults.items())


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _parameter(option: SettingOption) -> inspect.Parameter:
    info = option.info
    # Optional settings accept the word "none", so they are read as text and converted by the settings class.
    kind: type = str if info.optional or info.choices else info.kind
    annotation = Annotated[Optional[kind], typer.Option(
        f"--{info.option}", help=info.help, show_default=_defaults(option), rich_help_panel="Strategy settings"
    )]
    return inspect.Parameter(
        info.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


def with_strategy_options(command: F) -> F:
    """Add every strategy setting as an option; the command gets them as ``strategy_settings``."""
    options = setting_options()
    signature = inspect.signature(command, eval_str=True)  # typer reads the signature, not the type hints
    own = [p for name, p in signature.parameters.items() if name != "strategy_settings"]
    added = [_parameter(option) for option in options.values()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given: dict[str, object] = {}
        for option in options.values():
            value = kwargs.pop(option.info.name, None)
            if value is None:
                continue
            if option.info.optional and isinstance(value, str) and value.lower() in NONE_WORDS:
                value = None
            given[option.info.option] = value
        return command(*args, strategy_settings=given, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
