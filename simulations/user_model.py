"""Your own model, named ``package.module:function``, and the client training it asks for.

The function is called with no arguments and returns a torch ``nn.Module``.
It may carry the training settings that suit it, so that a simulation with
your model trains well without flags::

    def my_net() -> nn.Module:
        ...

    my_net.training_defaults = {"lr": 0.01, "batch_size": 64, "local_epochs": 1}

Any of the three may be left out; the dataset's default fills the gap. This
module does not import torch: your module imports what it needs.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping

from fedforget.errors import FedforgetError

SPEC_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
TRAINING_DEFAULTS_ATTRIBUTE = "training_defaults"
TRAINING_KEYS = ("lr", "batch_size", "local_epochs")


class UserModelError(FedforgetError, ValueError):
    """A ``package.module:function`` model that cannot be loaded, or declares unusable settings."""


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names your code (``package.module:function``) rather than a built-in dataset."""
    return ":" in spec


def load_factory(spec: str) -> Callable[[], object]:
    """The function ``spec`` names, imported."""
    if not SPEC_PATTERN.match(spec):
        raise UserModelError(f"model {spec!r} must be package.module:function, e.g. mypkg.nets:small_cnn")
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UserModelError(f"model {spec!r} cannot be loaded (package.module:function): {exc}") from exc
    if not callable(factory):
        raise UserModelError(f"model {spec!r} is a {type(factory).__name__}, not a function returning an nn.Module")
    return factory  # type: ignore[no-any-return]


def declared_training(spec: str) -> dict[str, float | int]:
    """The training settings ``spec``'s function declares in ``training_defaults`` (possibly none)."""
    declared = getattr(load_factory(spec), TRAINING_DEFAULTS_ATTRIBUTE, None)
    if declared is None:
        return {}
    if not isinstance(declared, Mapping):
        raise UserModelError(
            f"{spec}.{TRAINING_DEFAULTS_ATTRIBUTE} must be a mapping of {', '.join(TRAINING_KEYS)}, "
            f"not a {type(declared).__name__}"
        )
    unknown = sorted(set(declared) - set(TRAINING_KEYS))
    if unknown:
        raise UserModelError(
            f"{spec}.{TRAINING_DEFAULTS_ATTRIBUTE} has unknown key(s) {unknown}; allowed: {', '.join(TRAINING_KEYS)}"
        )
    settings: dict[str, float | int] = {}
    for key, value in declared.items():
        wanted = int if key == "batch_size" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted) or value <= 0:
            kind = "a positive integer" if key == "batch_size" else "a positive number"
            raise UserModelError(f"{spec}.{TRAINING_DEFAULTS_ATTRIBUTE}[{key!r}] must be {kind}, got {value!r}")
        settings[key] = value
    return settings
