"""Client side of fedforget: the ClientApp, local training, withdrawal and verification.

Names are imported on first use: checking a certificate offline must not pay
for importing Flower and torch.
"""

from __future__ import annotations

from fedforget.lazy import lazy_exports

_EXPORTS = {
    "ClientData": "fedforget.client.app",
    "ClientTask": "fedforget.client.app",
    "make_client_app": "fedforget.client.app",
    "EvaluationResult": "fedforget.client.training",
    "TrainingResult": "fedforget.client.training",
    "evaluate": "fedforget.client.training",
    "train_local": "fedforget.client.training",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("fedforget.client", _EXPORTS)
