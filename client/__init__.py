"""Client side of fedforget: the ClientApp and local training loops."""

from fedforget.client.app import ClientData, ClientTask, make_client_app
from fedforget.client.training import EvaluationResult, TrainingResult, evaluate, train_local

__all__ = [
    "ClientData",
    "ClientTask",
    "EvaluationResult",
    "TrainingResult",
    "evaluate",
    "make_client_app",
    "train_local",
]
