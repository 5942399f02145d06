"""Named models: ``--model resnet-small`` and ``--model package.module:function`` are one option.

A named model is an alias for a ``package.module:function`` (the form your
own architecture takes, :mod:`.user_model`), so there is one way to build,
check and read training defaults for every model: a registered name only
saves typing and says what is built in. The registry is open
(:func:`register_model`), like the strategies' one. A dataset's name is not
a model name: without ``--model`` a run uses the dataset's own CNN.

This module imports nothing heavy: configuration checks names without torch.
"""

from __future__ import annotations

from fedforget.simulations.user_model import SPEC_PATTERN, UserModelError, is_user_model

__all__ = ["MODELS", "register_model", "model_names", "resolve_model", "is_model_choice"]

MODELS: dict[str, str] = {
    "resnet-small": "fedforget.simulations.resnet:resnet_small",
    "resnet-wide": "fedforget.simulations.resnet:resnet_wide",
}
"""Built-in named models -> the ``package.module:function`` that builds each."""


def register_model(name: str, factory: str) -> None:
    """Make ``--model NAME`` build ``factory`` (``package.module:function``); a name is registered once."""
    if not name or ":" in name:
        raise UserModelError(f"a model name must be non-empty and have no ':', got {name!r}")
    if not SPEC_PATTERN.match(factory):
        raise UserModelError(f"model {name!r}: {factory!r} must be package.module:function")
    if MODELS.get(name, factory) != factory:
        raise UserModelError(f"model name {name!r} is already registered for {MODELS[name]}")
    MODELS[name] = factory


def model_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(MODELS)


def is_model_choice(spec: str) -> bool:
    """Whether ``--model spec`` names a model: a registered name or ``package.module:function``."""
    return spec in MODELS or is_user_model(spec)


def resolve_model(spec: str) -> str:
    """The ``package.module:function`` a ``--model`` value names (itself if it is one)."""
    if spec in MODELS:
        return MODELS[spec]
    if is_user_model(spec):
        return spec
    raise UserModelError(
        f"unknown model {spec!r}: choose one of {', '.join(model_names())} or give package.module:function"
    )
