"""Server side of fedforget: the recording strategy, the round loop, the history store.

Typical use in an existing Flower ServerApp::

    from fedforget.server import HistoryStore, ModelSpec, RecordingFedAvg

    store = HistoryStore.create(path, federation_id="my-federation", model_spec=ModelSpec.from_arrays(initial))
    strategy = RecordingFedAvg(store, fraction_train=1.0)   # instead of FedAvg(...)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=10)

Names are imported on first use, so that ``fedforget.server.store`` and
``fedforget.server.ledger`` (audits, offline tools) never import Flower.
"""

from __future__ import annotations

from fedforget.lazy import lazy_exports

_EXPORTS = {
    "ServerSetup": "fedforget.server.app",
    "make_server_app": "fedforget.server.app",
    "run_federation": "fedforget.server.app",
    "ClientIdResolver": "fedforget.server.rounds.client_identity",
    "ClientIdentityError": "fedforget.server.rounds.client_identity",
    "FederatedRun": "fedforget.server.rounds.loop",
    "RunOutcome": "fedforget.server.rounds.loop",
    "RunSettings": "fedforget.server.rounds.loop",
    "Withdrawal": "fedforget.server.rounds.loop",
    "HistoryReader": "fedforget.server.store.history_store",
    "HistoryStore": "fedforget.server.store.history_store",
    "ModelSpec": "fedforget.server.store.history_store",
    "RecordingFedAvg": "fedforget.server.rounds.recording",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("fedforget.server", _EXPORTS)
