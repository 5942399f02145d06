"""Unlearning: one coordinator shared by the round loop, the Python API (``Unlearning``) and ``fedforget unlearn``."""
