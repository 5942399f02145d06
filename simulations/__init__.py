"""Experiments: offline datasets, partitions, models, `fedforget simulate` and benchmarks.

Names are imported on first use: a deployed ClientApp process (one per Flower
message) that only needs the datasets must not pay for the experiment runner.
"""

from __future__ import annotations

from fedforget.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "fedforget.simulations.config",
    "SimulationConfig": "fedforget.simulations.config",
    "parse_withdrawal": "fedforget.simulations.config",
    "simulate": "fedforget.simulations.runner",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("fedforget.simulations", _EXPORTS)
