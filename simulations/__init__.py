"""Experiments: offline datasets, partitions, models, `fedforget simulate` and benchmarks."""

from fedforget.simulations.config import ConfigError, SimulationConfig, parse_withdrawal
from fedforget.simulations.runner import simulate

__all__ = ["ConfigError", "SimulationConfig", "parse_withdrawal", "simulate"]
