"""Server side of fedforget: the recording strategy, the round loop, the history store.

Typical use in an existing Flower ServerApp::

    from fedforget.server import HistoryStore, ModelSpec, RecordingFedAvg

    store = HistoryStore.create(path, federation_id="my-federation", model_spec=ModelSpec.from_arrays(initial))
    strategy = RecordingFedAvg(store, fraction_train=1.0)   # instead of FedAvg(...)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=10)
"""

from fedforget.server.app import ServerSetup, make_server_app, run_federation
from fedforget.server.client_identity import ClientIdentityError, ClientIdResolver
from fedforget.server.federated_run import FederatedRun, RunOutcome, RunSettings, Withdrawal
from fedforget.server.history_store import HistoryReader, HistoryStore, ModelSpec
from fedforget.server.recording import RecordingFedAvg

__all__ = [
    "ClientIdResolver",
    "ClientIdentityError",
    "FederatedRun",
    "HistoryReader",
    "HistoryStore",
    "ModelSpec",
    "RecordingFedAvg",
    "RunOutcome",
    "RunSettings",
    "ServerSetup",
    "Withdrawal",
    "make_server_app",
    "run_federation",
]
