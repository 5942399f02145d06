"""Experiments: offline datasets, partitions, models, `fedforget simulate` and benchmarks.

Names are imported on first use: a deployed ClientApp process (one per Flower
message) that only needs the datasets must not pay for the experiment runner.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "fedforget.simulations.config",
    "SimulationConfig": "fedforget.simulations.config",
    "parse_withdrawal": "fedforget.simulations.config",
    "simulate": "fedforget.simulations.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fedforget.simulations' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), name)
