"""Unlearning: one coordinator shared by the round loop, the Python API (:class:`Unlearning`) and ``fedforget unlearn``."""

from __future__ import annotations

from fedforget.lazy import lazy_exports

_EXPORTS = {
    "Unlearning": "fedforget.server.unlearning.api",
    "UnlearningReport": "fedforget.server.unlearning.api",
    "UnlearningCoordinator": "fedforget.server.unlearning.coordinator",
    "UnlearningError": "fedforget.server.unlearning.coordinator",
    "FlowerFederation": "fedforget.server.unlearning.federation",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("fedforget.server.unlearning", _EXPORTS)
