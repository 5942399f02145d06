"""Unlearning while no federated run is active: ``fedforget unlearn``.

A client may withdraw between runs, or after it has left. A strategy that
needs no client work (``fedrecovery``, the default) can then act at
once on the recorded history, with the same bookkeeping as inside a run:
a new trajectory, crypto-shredding, ledger entries, a signed certificate, and
the request marked done in the consent registry. Strategies that need clients
act at the next run's start instead, when the run reads the registry.
"""

from __future__ import annotations

from pathlib import Path

from fedforget.server.ledger.accountability import Accountability
from fedforget.server.withdrawal.consent import RegistryConsent
from fedforget.server.store.errors import FedforgetError
from fedforget.server.rounds.loop import FederatedRun, RunSettings
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.strategies.registry import make_unlearner


class OfflineUnlearningError(FedforgetError):
    """The requested offline unlearning cannot run; the message says what to do instead."""


def unlearn_offline(
    *, store_dir: Path, registry: Path, ledger: Path, server_key: Path, certificates: Path, client: str, strategy: str
) -> dict[str, object]:
    """Act now on ``client``'s accepted withdrawal request; return the unlearning event."""
    unlearner = make_unlearner(strategy)
    if unlearner.needs_client_work:
        raise OfflineUnlearningError(
            f"strategy {strategy!r} needs work from the remaining clients, which no run is there to do; "
            "use --strategy fedrecovery, or let the next run's start act on the request"
        )
    consent = RegistryConsent(registry)
    notices = [n for n in consent.due(0, set()) if n.client_id == client]
    if not notices:
        raise OfflineUnlearningError(
            f"the consent registry {registry} holds no open withdrawal request from client {client!r}; "
            "the client must first submit one (fedforget withdraw request)"
        )
    with HistoryStore.open(store_dir) as store:
        completed = store.last_completed_round()
        if completed == 0:
            raise OfflineUnlearningError(f"the history store {store_dir} holds no completed round to unlearn from")
        recorder = RecordingFedAvg(store)
        run = FederatedRun(
            grid=None,  # type: ignore[arg-type]  # no client work: the grid is never used
            store=store,
            strategy=recorder,
            unlearner=unlearner,
            settings=RunSettings(num_rounds=completed),
            consent=consent,
            accountability=Accountability(
                ledger_path=ledger, server_key=server_key, certificates_dir=certificates,
                federation_id=store.federation_id,
            ),
        )
        run.prepare()
        model = store.read_model(completed)
        run.unlearn_now(notices, completed + 1, model)
        recorder.flush()
        return run.unlearning_events()[-1]
