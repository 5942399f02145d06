"""What the server owes after every round and every unlearning: ledger entries, shredding, certificates.

The ledger says which model versions contain which client; after an
unlearning the withdrawn clients' data keys are destroyed (their stored
updates can never be decrypted again) and each request gets a certificate
signed with the federation's key, stating what was done and what was not.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedforget.arrays import Arrays
from fedforget.identity import load_private_key, public_key_openssh
from fedforget.server.ledger.certificates import issue_certificate, write_certificate
from fedforget.server.withdrawal.consent import OPERATOR_INITIATED, WithdrawalNotice
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.ledger.log import Ledger, LedgerEntry, model_hash


@dataclass(frozen=True)
class RoundParticipant:
    """One client's part in a committed round, as the ledger records it."""

    client_id: str
    num_examples: int
    update_hash: str | None


class Accountability:
    """Ledger, crypto-shredding and certificates for one federation's run."""

    def __init__(self, *, ledger_path: Path, server_key: Path, certificates_dir: Path, federation_id: str) -> None:
        self.ledger_path = ledger_path
        self.server_key_path = server_key
        self.certificates_dir = certificates_dir
        self.federation_id = federation_id
        self._server_key = load_private_key(server_key)

    @property
    def server_public_key(self) -> str:
        return public_key_openssh(self._server_key)

    def round_committed(
        self, trajectory: int, server_round: int, model_after: Arrays, participants: Sequence[RoundParticipant]
    ) -> None:
        """Ledger entry for a round the store has committed."""
        with Ledger.open(self.ledger_path) as ledger:
            ledger.record_round(
                trajectory=trajectory,
                round=server_round,
                model_hash=model_hash(model_after),
                participants=[
                    {"client": p.client_id, "num_examples": p.num_examples, "update_hash": p.update_hash}
                    for p in participants
                ],
            )

    def reconcile(self, store: HistoryStore) -> list[int]:
        """After a crash, give every round the store committed its ledger entry; return the rounds added.

        Rounds are committed to the store first and to the ledger right after,
        so a crash between the two leaves the ledger a round or two behind the
        store (and perhaps a torn last line, which is dropped and recorded as a
        ``ledger-repair``). The missing entries are rebuilt from the store:
        participants, example counts and the model hash are all there; the
        update hashes are not (they were computed from the updates as sent), so
        they are recorded as unknown rather than recomputed from stored copies.
        """
        if self.ledger_path.exists():
            Ledger.repair(self.ledger_path)
        trajectory = store.current_trajectory()
        info = next(t for t in store.trajectories() if t.id == trajectory)
        with Ledger.open(self.ledger_path) as ledger:
            recorded = {
                int(e.body["round"])
                for e in ledger.entries()
                if e.kind == "round" and int(e.body["trajectory"]) == trajectory
            }
            reader = store.reader(trajectory)
            added = []
            for view in reader.rounds(info.base_version + 1):
                if view.round in recorded:
                    continue
                ledger.record_round(
                    trajectory=trajectory,
                    round=view.round,
                    model_hash=model_hash(view.model_after()),
                    participants=[
                        {"client": p.client_id, "num_examples": p.num_examples, "update_hash": None}
                        for p in view.participants
                    ],
                )
                added.append(view.round)
        return added

    def unlearned(
        self,
        store: HistoryStore,
        notices: Sequence[WithdrawalNotice],
        event: dict[str, object],
        model_before: Arrays,
        model_after: Arrays,
    ) -> dict[str, Path]:
        """Destroy the withdrawn clients' keys, record it all, and certify each request.

        Returns the certificate written for each notice, keyed by client id.
        """
        clients = [str(c) for c in event["clients"]]  # type: ignore[union-attr]
        with Ledger.open(self.ledger_path) as ledger:
            request_entries: dict[str, LedgerEntry] = {}
            for notice in notices:
                if notice.request is not None and notice.request_id is not None:
                    request_entries[notice.client_id] = ledger.record_withdrawal_request(
                        request_id=notice.request_id,
                        client=notice.client_id,
                        request_hash=str(notice.request["request_hash"]),
                    )
            destroyed_at = {}
            for client in clients:
                store.destroy_client_key(client)
                destroyed_at[client] = dt.datetime.now(dt.timezone.utc).isoformat()
            # Copies of the index made before (backups) still hold the wrapped key; a new
            # federation key leaves them nothing to unwrap it with.
            store.rotate_federation_key()
            unlearning = ledger.record_unlearning(
                clients=clients,
                strategy=str(event["strategy"]),
                hyperparameters=dict(event["hyperparameters"]),  # type: ignore[arg-type]
                seed=int(event.get("seed", 0)),  # type: ignore[arg-type]
                round=int(event["round"]),  # type: ignore[arg-type]
                model_hash_before=model_hash(model_before),
                model_hash_after=model_hash(model_after),
                source_trajectory=int(event["source_trajectory"]),  # type: ignore[arg-type]
                trajectory=int(event["trajectory"]),  # type: ignore[arg-type]
                evidence=_evidence(event),
                key_destroyed=True,
                base_version=int(event["base_version"]),  # type: ignore[arg-type]
                initiated_by={n.client_id: n.initiated_by for n in notices},
                reasons={n.client_id: n.reason for n in notices if n.initiated_by == OPERATOR_INITIATED and n.reason},
            )
            key_entries = {
                client: ledger.record_key_destroyed(client=client, destroyed_at=destroyed_at[client])
                for client in clients
            }
        certificates = {}
        for notice in notices:
            entries = [e for e in (request_entries.get(notice.client_id), unlearning, key_entries.get(notice.client_id)) if e]
            certificate = issue_certificate(
                self._server_key,
                federation_id=self.federation_id,
                request=notice.request or _operator_order(notice),
                ledger_entries=[e.to_dict() for e in entries],
                evidence=_evidence(event),
                key_destruction={
                    "client": notice.client_id,
                    "destroyed_at": destroyed_at.get(notice.client_id),
                    "what": (
                        "the client's data key in the history store, so its stored updates can no longer be "
                        "decrypted; the federation key that wrapped it was then replaced, so copies of the "
                        "store's index made earlier (backups) cannot recover it either"
                    ),
                    "federation_key_rotated": True,
                },
            )
            name = notice.request_id or f"client-{notice.client_id}-round{event['round']}"
            path = self.certificates_dir / f"{name}.json"
            write_certificate(path, certificate)
            certificates[notice.client_id] = path
        return certificates


def _operator_order(notice: WithdrawalNotice) -> dict[str, object]:
    """What a certificate shows in place of a signed request when the operator ordered the erasure."""
    return {"client_id": notice.client_id, "initiated_by": notice.initiated_by, "reason": notice.reason}


def _evidence(event: dict[str, object]) -> dict[str, object]:
    """The figures measured when the unlearning ran (the full evidence report comes later, offline)."""
    keys = ("test_accuracy_before", "test_accuracy_after", "seconds", "client_epochs", "rounds_replayed",
            "retrain_test_accuracy", "retrain_seconds", "retrain_client_epochs")
    return {k: event[k] for k in keys if event.get(k) is not None}
