"""What the server owes after every round and every unlearning: ledger entries, signed heads, shredding, certificates.

The ledger says which model versions contain which client, and every entry is
under a tree head signed with the federation's key right after it is written.
After an unlearning the withdrawn clients' data keys are destroyed (their
stored updates can never be decrypted again), so are the old global models
trained with them that nothing still needs (unless an audit retention period
keeps them, until a stated time), the federation key that wrapped it all is
replaced, and each request gets a certificate signed with the federation's
key, with the signed head and an inclusion proof of its unlearning entry:
what was done, what was kept and until when, and what is not claimed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedforget.arrays import Arrays, model_hash
from fedforget.errors import FedforgetError
from fedforget.identity import load_private_key, public_key_openssh
from fedforget.server.ledger.certificates import issue_certificate, write_certificate
from fedforget.server.ledger.entries import LedgerEntry, LedgerError
from fedforget.server.ledger.heads import HeadsFile, sign_ledger
from fedforget.server.ledger.log import Ledger, LogSnapshot
from fedforget.server.ledger.old_models import ModelVersion, find_old_models
from fedforget.server.rounds.privacy_accounting import withdrawn_privacy
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.withdrawal.consent import OPERATOR_INITIATED, WithdrawalNotice
from fedforget.sharding import shard_scope
from fedforget.tree_head import SignedTreeHead

__all__ = ["Accountability", "AccountabilityError", "RoundParticipant"]


class AccountabilityError(FedforgetError):
    """The ledger cannot be kept consistent with the store (a round recorded differently, a rewritten ledger)."""


@dataclass(frozen=True)
class RoundParticipant:
    """One client's part in a committed round, as the strategy aggregated it (checked against the store)."""

    client_id: str
    num_examples: int


class Accountability:
    """Ledger, signed heads, crypto-shredding and certificates for one federation's run.

    ``old_models_retention``: how long to keep the old trajectories' global
    models that contain a withdrawn client, for audits (None: shred them at the
    unlearning). The ledger and the certificate state what is kept until when.
    """

    def __init__(
        self,
        *,
        ledger_path: Path,
        server_key: Path,
        certificates_dir: Path,
        federation_id: str,
        old_models_retention: dt.timedelta | None = None,
    ) -> None:
        self.ledger_path = ledger_path
        self.certificates_dir = certificates_dir
        self.federation_id = federation_id
        self.old_models_retention = old_models_retention
        self._server_key = load_private_key(server_key)
        self._heads = HeadsFile(ledger_path)
        self._last_signed: SignedTreeHead | None = None

    @property
    def server_public_key(self) -> str:
        return public_key_openssh(self._server_key)

    # ------------------------------------------------------------------ rounds

    def round_committed(
        self, store: HistoryStore, trajectory: int, server_round: int, model_after: Arrays, participants: Sequence[RoundParticipant]
    ) -> None:
        """Ledger entry (and a signed head) for a round the store has committed, as the store holds it."""
        with Ledger.open(self.ledger_path) as ledger:
            self._record_round(ledger, store, trajectory, server_round, model_after, participants)
            self._shred_expired(ledger, store)
            self._sign(ledger)

    def _record_round(
        self,
        ledger: Ledger,
        store: HistoryStore,
        trajectory: int,
        server_round: int,
        model_after: Arrays | None,
        participants: Sequence[RoundParticipant] | None,
    ) -> LedgerEntry:
        committed = store.committed_round(trajectory, server_round)
        if participants is not None:
            aggregated = sorted((p.client_id, p.num_examples) for p in participants)
            stored = sorted((p.client_id, p.num_examples) for p in committed.participants)
            if aggregated != stored:
                raise AccountabilityError(
                    f"round {server_round} of trajectory {trajectory} was aggregated over {aggregated} but the "
                    f"history store committed {stored}; the ledger would not match the store"
                )
        model = model_after if model_after is not None else store.reader(trajectory).model(server_round)
        return ledger.record_round(
            trajectory=trajectory,
            round=server_round,
            model_hash=model_hash(model),
            model_blob=committed.model_blob,
            participants=[
                {"client": p.client_id, "num_examples": p.num_examples, "weight": p.weight,
                 "update_hash": p.update_hash, "blob": p.blob_id}
                for p in committed.participants
            ],  # fmt: skip
        )

    def reconcile(self, store: HistoryStore) -> list[tuple[int, int]]:
        """After a crash, give every round the store committed its ledger entry; return those added.

        Returns (trajectory, round) pairs, oldest trajectory first.

        Rounds are committed to the store first and to the ledger right after,
        so a crash between the two leaves the ledger a round or two behind the
        store (and perhaps a torn last line, which is dropped and recorded as a
        ``ledger-repair``). The missing entries are rebuilt from the store,
        which holds every fact they record. Rounds a trajectory shares with the
        one it was forked from have their entries there. Ends with a signed head.
        """
        if self.ledger_path.exists():
            Ledger.repair(self.ledger_path)
        with Ledger.open(self.ledger_path) as ledger:
            recorded = {(e.body["trajectory"], e.body["round"]) for e in ledger.entries() if e.kind == "round"}
            added = []
            for info in store.trajectories():
                shared = info.base_version if info.parent is not None else 0
                for view in store.reader(info.id).rounds(shared + 1):
                    if (info.id, view.round) not in recorded:
                        self._record_round(ledger, store, info.id, view.round, None, None)
                        added.append((info.id, view.round))
            self._shred_expired(ledger, store)
            self._sign(ledger)
        return added

    # ------------------------------------------------------------------ signed heads

    def _sign(self, ledger: Ledger) -> SignedTreeHead:
        """Sign the head of the whole ledger (see :func:`~fedforget.server.ledger.heads.sign_ledger`)."""
        try:
            self._last_signed = sign_ledger(ledger, self._server_key, self.federation_id, self._heads, self._last_signed)
        except LedgerError as exc:
            raise AccountabilityError(str(exc)) from None
        return self._last_signed

    # ------------------------------------------------------------------ unlearning

    def unlearned(
        self,
        store: HistoryStore,
        notices: Sequence[WithdrawalNotice],
        event: dict[str, object],
        model_before: Arrays,
        model_after: Arrays,
    ) -> dict[str, Path]:
        """Destroy the withdrawn clients' keys and old models, record it all, sign, and certify each request.

        Returns the certificate written for each notice, keyed by client id.
        """
        clients = [str(c) for c in event["clients"]]  # type: ignore[union-attr]
        with Ledger.open(self.ledger_path) as ledger:
            earlier = _destroyed_before(ledger)
            already = {c: e for c, e in earlier.items() if c in clients}
            requests: dict[str, LedgerEntry] = {}
            for notice in notices:
                if notice.request is not None and notice.request_id is not None:
                    requests[notice.client_id] = ledger.record_withdrawal_request(
                        request_id=notice.request_id, client=notice.client_id, request_hash=str(notice.request["request_hash"])
                    )
            # Old models of clients withdrawn earlier count too: a model the run used then may be unused now.
            withdrawn = sorted(set(clients) | set(earlier))
            privacy = withdrawn_privacy(store, clients, int(event["trajectory"]))  # type: ignore[call-overload]
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
                shard=shard_scope(store),
                privacy=privacy,
            )
            destroyed = dict(already)
            for client in clients:
                if client not in already:
                    key_ids = store.destroy_client_key(client)
                    destroyed[client] = ledger.record_key_destroyed(
                        client=client, key_ids=key_ids, destroyed_at=_now(), unlearning_entry=unlearning.index
                    )
            old = find_old_models(store, withdrawn)
            kept = self._old_models(ledger, store, withdrawn, old.removable, old.in_use)
            # Copies of the index made before (backups) still hold the destroyed keys wrapped; a new
            # federation key leaves them nothing to unwrap them with.
            store.rotate_federation_key()
            signed = self._sign(ledger)
            snapshot = ledger.snapshot()
        certificates = {}
        for notice in notices:
            entries = [e for e in (requests.get(notice.client_id), unlearning, destroyed.get(notice.client_id)) if e]
            certificate = issue_certificate(
                self._server_key,
                federation_id=self.federation_id,
                request=notice.request or _operator_order(notice),
                ledger_entries=[e.to_dict() for e in entries],
                evidence=_evidence(event),
                key_destruction=_key_destruction(notice.client_id, destroyed.get(notice.client_id), already),
                old_models=kept,
                ledger_proof=_proof(snapshot, signed, unlearning.index),
                privacy=_client_privacy(privacy, notice.client_id),
            )
            name = notice.request_id or f"client-{notice.client_id}-round{event['round']}"
            path = self.certificates_dir / f"{name}.json"
            write_certificate(path, certificate)
            certificates[notice.client_id] = path
        return certificates

    def _old_models(
        self, ledger: Ledger, store: HistoryStore, clients: list[str], removable: list[ModelVersion], in_use: list[ModelVersion]
    ) -> dict[str, object]:
        """Shred (or keep, for the retention period) the old models holding ``clients``; record it; say what was done."""
        outcome: dict[str, object] = {"shredded": [], "retained": [], "retain_until": None, "in_use": [v.to_dict() for v in in_use]}
        if in_use:
            ledger.append("models-retained", {
                "clients": clients, "models": outcome["in_use"], "retain_until": None,
                "reason": "versions of the trajectory the run continues in (an approximate unlearning continues from "
                          "the history that held the client); kept while that trajectory is in use",
            })  # fmt: skip
        if not removable:
            return outcome
        if self.old_models_retention is None:
            key_ids = store.shred_models(sorted({v.blob for v in removable}))
            outcome["shredded"] = [v.to_dict() for v in removable]
            ledger.append("models-shredded", {"clients": clients, "models": outcome["shredded"], "key_ids": key_ids,
                                              "destroyed_at": _now(), "reason": "trained with a withdrawn client"})
        else:
            until = (dt.datetime.now(dt.timezone.utc) + self.old_models_retention).isoformat(timespec="seconds")
            outcome["retained"], outcome["retain_until"] = [v.to_dict() for v in removable], until
            ledger.append("models-retained", {"clients": clients, "models": outcome["retained"], "retain_until": until,
                                              "reason": "the operator's audit retention period; shredded when it ends"})
        return outcome

    def _shred_expired(self, ledger: Ledger, store: HistoryStore) -> None:
        """Shred retained old models whose retention period has ended (checked at every round and run start)."""
        now = dt.datetime.now(dt.timezone.utc)
        due: dict[str, tuple[ModelVersion, list[str]]] = {}
        for entry in ledger.entries():
            if entry.kind == "models-retained" and entry.body.get("retain_until"):
                if dt.datetime.fromisoformat(entry.body["retain_until"]) <= now:
                    for m in entry.body["models"]:
                        due[m["blob"]] = (ModelVersion(m["trajectory"], m["version"], m["blob"]), entry.body["clients"])
        readable = store.readable_model_blobs()
        current = set(store.model_versions(store.current_trajectory()).values())
        expired = {blob: item for blob, item in due.items() if blob in readable and blob not in current}
        if not expired:
            return
        key_ids = store.shred_models(sorted(expired))
        ledger.append("models-shredded", {
            "clients": sorted({c for _, clients in expired.values() for c in clients}),
            "models": [v.to_dict() for v, _ in expired.values()], "key_ids": key_ids, "destroyed_at": _now(),
            "reason": "the audit retention period ended",
        })  # fmt: skip
        store.rotate_federation_key()


def _destroyed_before(ledger: Ledger) -> dict[str, LedgerEntry]:
    """The first key-destroyed entry of every client whose key an earlier unlearning destroyed."""
    found: dict[str, LedgerEntry] = {}
    for entry in ledger.entries():
        if entry.kind == "key-destroyed":
            found.setdefault(entry.body["client"], entry)
    return found


def _key_destruction(client: str, entry: LedgerEntry | None, already: dict[str, LedgerEntry]) -> dict[str, object]:
    return {
        "client": client,
        "destroyed_at": None if entry is None else entry.body.get("destroyed_at"),
        "already_destroyed": client in already,
        "ledger_entry": None if entry is None else entry.index,
        "what": (
            "the client's data key in the history store, so its stored updates can no longer be decrypted; the "
            "federation key that wrapped it was then replaced, so copies of the store's index made earlier "
            "(backups) cannot recover it either"
        ),
        "federation_key_rotated": True,
    }


def _proof(snapshot: LogSnapshot, signed: SignedTreeHead, index: int) -> dict[str, object]:
    """The signed head and the inclusion proof of entry ``index`` under it (RFC 9162), for offline checking."""
    size = signed.head.tree_size
    return {
        "signed_head": signed.to_dict(),
        "entry_index": index,
        "inclusion_proof": [h.hex() for h in snapshot.inclusion_proof(index, size)],
    }


def _client_privacy(privacy: dict[str, object] | None, client: str) -> dict[str, object] | None:
    """The DP facts of one withdrawn client's certificate: the settings and its own ε."""
    if privacy is None:
        return None
    epsilon = dict(privacy["epsilon"])  # type: ignore[call-overload]
    return {**{k: v for k, v in privacy.items() if k != "epsilon"}, "epsilon": epsilon[client]}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def _operator_order(notice: WithdrawalNotice) -> dict[str, object]:
    """What a certificate shows in place of a signed request when the operator ordered the erasure."""
    return {"client_id": notice.client_id, "initiated_by": notice.initiated_by, "reason": notice.reason}


def _evidence(event: dict[str, object]) -> dict[str, object]:
    """The figures measured when the unlearning ran (the full evidence report comes later, offline)."""
    keys = ("test_accuracy_before", "test_accuracy_after", "seconds", "client_epochs", "rounds_replayed",
            "retrain_test_accuracy", "retrain_seconds", "retrain_client_epochs")
    return {k: event[k] for k in keys if event.get(k) is not None}
