"""Server side of fedforget: the recording strategy, unlearning, the round loop, the history store.

Added to an existing Flower ServerApp::

    from fedforget.server import HistoryStore, ModelSpec, RecordingFedAvg, Unlearning

    store = HistoryStore.create("state/store", federation_id="my-federation", model_spec=ModelSpec.from_arrays(weights))
    strategy = RecordingFedAvg(store, fraction_train=1.0)          # instead of FedAvg(...)
    unlearning = Unlearning(strategy)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
    report = unlearning.unlearn(grid, "1", "retrain")               # client "1" withdraws
    result = strategy.start(grid=grid, initial_arrays=report.arrays, num_rounds=2)

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
    "Withdrawal": "fedforget.server.withdrawal.consent",
    "WithdrawalNotice": "fedforget.server.withdrawal.consent",
    "HistoryReader": "fedforget.server.store.history_store",
    "HistoryStore": "fedforget.server.store.history_store",
    "ModelSpec": "fedforget.server.store.history_store",
    "RecordingFedAvg": "fedforget.server.rounds.recording",
    "RecordingError": "fedforget.server.rounds.recording",
    "Unlearning": "fedforget.server.unlearning.api",
    "UnlearningReport": "fedforget.server.unlearning.api",
    "UnlearningCoordinator": "fedforget.server.unlearning.coordinator",
    "UnlearningError": "fedforget.server.unlearning.coordinator",
    "FlowerFederation": "fedforget.server.unlearning.federation",
    "WithdrawnClientError": "fedforget.server.unlearning.federation",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("fedforget.server", _EXPORTS)
