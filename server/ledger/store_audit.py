"""Auditing the history store against the ledger, in both directions, without trusting either's word alone.

The store and the ledger are written by the same server from the same facts,
so they must agree, and a change to one that is not made to the other shows:

* every index row authenticates (its MAC, see :mod:`fedforget.server.store.index`);
* every round the store holds has exactly one ledger round entry and the
  reverse (rounds a trajectory shares with the one it was forked from are
  compared with that trajectory's entries); participants, example counts,
  weights, update hashes and the blobs each update and model version points
  to agree;
* every blob authenticates and decrypts, and hashes to what the ledger
  recorded (model and update hashes), unless its key was destroyed and the
  ledger says so;
* trajectories, and the store's current trajectory, agree with the ledger's
  unlearning entries;
* destroyed keys in the store and key-destroyed / models-shredded entries in
  the ledger agree, both ways;
* files the store does not know are reported (never deleted).
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path

from fedforget.errors import FedforgetError
from fedforget.server.ledger.entries import LedgerEntry, validate_body
from fedforget.server.ledger.findings import Findings
from fedforget.server.ledger.log import LogSnapshot
from fedforget.server.store.index import META_KEYS
from fedforget.server.store.blob_crypto import GLOBAL_OWNER
from fedforget.server.store.index import Row
from fedforget.server.store.inspection import StoreInspection

__all__ = ["audit_store"]


@dataclass
class _LedgerFacts:
    """What the ledger says, indexed for comparison."""

    rounds: dict[tuple[int, int], LedgerEntry] = field(default_factory=dict)
    unlearnings: dict[int, LedgerEntry] = field(default_factory=dict)  # by the trajectory they created
    destroyed_keys: dict[int, tuple[str, LedgerEntry]] = field(default_factory=dict)  # key id -> (owner, entry)
    destroyed_clients: dict[str, list[LedgerEntry]] = field(default_factory=dict)
    shredded_blobs: dict[str, LedgerEntry] = field(default_factory=dict)
    last_unlearning: LedgerEntry | None = None


def _ledger_facts(snapshot: LogSnapshot, findings: Findings) -> _LedgerFacts:
    facts = _LedgerFacts()
    for entry in snapshot.entries:
        where = f"ledger entry {entry.index} ({entry.kind})"
        try:
            validate_body(entry.kind, entry.body)
        except ValueError as exc:
            findings.error(where, f"malformed: {exc}")
            continue
        body = entry.body
        if entry.kind == "round":
            key = (body["trajectory"], body["round"])
            if key in facts.rounds:
                findings.error(
                    where,
                    f"records round {key[1]} of trajectory {key[0]} again: entry {facts.rounds[key].index} already did "
                    "(a round is committed once)",
                )
                continue
            facts.rounds[key] = entry
        elif entry.kind == "unlearning":
            trajectory = body["trajectory"]
            if trajectory in facts.unlearnings:
                findings.error(where, f"trajectory {trajectory} was already created by entry {facts.unlearnings[trajectory].index}")
                continue
            facts.unlearnings[trajectory] = entry
            facts.last_unlearning = entry
        elif entry.kind == "key-destroyed":
            facts.destroyed_clients.setdefault(body["client"], []).append(entry)
            for key_id in body.get("key_ids") or []:
                facts.destroyed_keys[key_id] = (body["client"], entry)
        elif entry.kind == "models-shredded":
            for model in body["models"]:
                if model.get("blob"):
                    facts.shredded_blobs[model["blob"]] = entry
    return facts


class _StoreAudit:
    """One comparison of a store with a ledger; every disagreement goes into ``findings``."""

    def __init__(self, store: StoreInspection, facts: _LedgerFacts, findings: Findings) -> None:
        self.store = store
        self.facts = facts
        self.findings = findings
        self.where = f"store {store.path}"
        self.trajectories = {int(r.get("id")): r for r in store.rows["trajectories"]}

    def run(self) -> None:
        for table, rows in self.store.rows.items():
            for row in rows:
                if not row.authentic:
                    self.findings.error(
                        f"{self.where} index row {row.name}",
                        "does not authenticate: it was edited, copied from another row or forged without the "
                        "federation key (its values below are compared anyway, to say what changed)",
                    )
        self._state_scope()
        self._meta_keys()
        self._rounds()
        self._trajectories()
        self._destroyed_keys()
        for path in self.store.unknown_files():
            self.findings.warning(self.where, f"unknown file {path} (not part of the store; left in place)")

    def _state_scope(self) -> None:
        """An old (once valid) current-trajectory row put back shows: its MAC covers the trajectory count then."""
        for row in self.store.rows["state"]:
            if row.get("key") == "current_trajectory" and row.get("scope") != len(self.store.rows["trajectories"]):
                self.findings.error(
                    f"{self.where} index row {row.name}",
                    f"was written when the store had {row.get('scope')} trajectories, but it has "
                    f"{len(self.store.rows['trajectories'])}: an older copy of the row was put back",
                )

    def _meta_keys(self) -> None:
        """Every meta row the store wrote is there, and no other: a deleted row leaves only this trace."""
        listed: set[str] = set()
        for row in self.store.rows["state"]:
            if row.get("key") == META_KEYS:
                try:
                    listed = set(json.loads(row.get("value")))
                except (TypeError, ValueError):
                    self.findings.error(f"{self.where} index row {row.name}", "does not hold a list of meta keys")
        present = {str(row.get("key")) for row in self.store.rows["meta"]}
        for key in sorted(listed - present):
            self.findings.error(f"{self.where} index table meta", f"row {key!r} was deleted")
        for key in sorted(present - listed):
            self.findings.error(f"{self.where} index row meta {key!r}", "is not among the keys the store wrote")

    # ------------------------------------------------------------------ rounds

    def _ledger_round(self, trajectory: int, rnd: int) -> tuple[int, LedgerEntry | None]:
        """The ledger entry a store round must match: its own, or the one of the trajectory it was forked from."""
        seen = set()
        while (trajectory, rnd) not in self.facts.rounds and trajectory not in seen:
            seen.add(trajectory)
            row = self.trajectories.get(trajectory)
            if row is None or row.get("parent") is None or rnd > int(row.get("base_version")):
                break
            trajectory = int(row.get("parent"))
        return trajectory, self.facts.rounds.get((trajectory, rnd))

    def _rounds(self) -> None:
        store_rounds = self.store.by_key("rounds", "trajectory", "round")
        updates = self.store.by_key("updates", "trajectory", "round")
        versions = self.store.by_key("versions", "trajectory", "version")
        matched: set[tuple[int, int]] = set()
        for (trajectory, rnd), rows in sorted(store_rounds.items()):
            where = f"{self.where} round {rnd} of trajectory {trajectory}"
            if len(rows) > 1:
                self.findings.error(where, f"the index has {len(rows)} rows for it")
            source, entry = self._ledger_round(trajectory, rnd)
            if entry is None:
                self.findings.error(where, "is in the store but no ledger round entry records it")
                continue
            matched.add((source, rnd))
            self._compare_round(where, rows[0], updates.get((trajectory, rnd), []), versions.get((trajectory, rnd), []), entry)
        for (trajectory, rnd), entry in sorted(self.facts.rounds.items()):
            if (trajectory, rnd) not in matched and (trajectory, rnd) not in store_rounds:
                self.findings.error(
                    f"ledger entry {entry.index} (round)",
                    f"records round {rnd} of trajectory {trajectory}, which the history store does not hold",
                )

    def _compare_round(self, where: str, round_row: Row, update_rows: list[Row], version_rows: list[Row], entry: LedgerEntry) -> None:
        body = entry.body
        said = f"ledger entry {entry.index}"
        listed = self.store.json_column(round_row, "participants")
        present = sorted(r.get("client_id") for r in update_rows)
        recorded = sorted(p["client"] for p in body["participants"])
        if present != recorded:
            self.findings.error(where, f"the index has update rows for clients {present}, {said} lists {recorded}")
        if listed != present:
            self.findings.error(where, f"its round row lists participants {listed}, its update rows are {present}")
        by_client = {p["client"]: p for p in body["participants"]}
        for row in update_rows:
            client = row.get("client_id")
            expected = by_client.get(client)
            if expected is not None:
                self._compare_update(f"{where}, update of client {client!r}", row, expected, said)
        if not version_rows:
            self.findings.error(where, f"the store has no model version {body['round']} for it")
            return
        model_blob = str(version_rows[0].get("blob_id"))
        if body.get("model_blob") is not None and body["model_blob"] != model_blob:
            self.findings.error(where, f"model version points to blob {model_blob}, {said} says blob {body['model_blob']}")
        self._check_blob(where + ", model", model_blob, body["model_hash"], said, "model_hash")

    def _compare_update(self, where: str, row: Row, expected: dict, said: str) -> None:
        if row.get("num_examples") != expected["num_examples"]:
            self.findings.error(where, f"num_examples is {row.get('num_examples')} in the index, {expected['num_examples']} in {said}")
        weight = expected.get("weight")
        if weight is not None and float(row.get("weight")) != float(weight):
            self.findings.error(where, f"weight is {row.get('weight')} in the index, {weight} in {said}")
        if "blob" in expected and row.get("blob_id") != expected["blob"]:
            self.findings.error(where, f"points to blob {row.get('blob_id')} in the index, {said} says {expected['blob']}")
        recorded_hash = expected.get("update_hash")
        if recorded_hash is not None and row.get("update_hash") != recorded_hash:
            self.findings.error(where, f"update_hash is {str(row.get('update_hash'))[:16]}… in the index, {recorded_hash[:16]}… in {said}")
        if row.get("blob_id") is not None:
            self._check_blob(where, str(row.get("blob_id")), recorded_hash or row.get("update_hash"), said, "update_hash")

    def _check_blob(self, where: str, blob_id: str, expected_hash: str | None, said: str, what: str) -> None:
        state = self.store.blob(blob_id, where)
        if state.problem is not None:
            self.findings.error(where, state.problem)
        elif state.destroyed:
            owners = [r.get("owner") for r in self.store.rows["blobs"] if r.get("blob_id") == blob_id]
            owner = owners[0] if owners else None
            if owner == GLOBAL_OWNER and blob_id not in self.facts.shredded_blobs:
                self.findings.error(where, f"blob {blob_id}'s key was destroyed, but no models-shredded entry of the ledger says so")
            elif owner != GLOBAL_OWNER and owner not in self.facts.destroyed_clients:
                self.findings.error(where, f"the key of client {owner!r} was destroyed, but no key-destroyed entry of the ledger says so")
        elif expected_hash is not None and state.hash != expected_hash:
            self.findings.error(
                where, f"blob {blob_id} decrypts to numbers hashing to {str(state.hash)[:16]}…, {said} records {what} {expected_hash[:16]}…"
            )

    # ------------------------------------------------------------------ trajectories

    def _trajectories(self) -> None:
        for trajectory, entry in sorted(self.facts.unlearnings.items()):
            body, said = entry.body, f"ledger entry {entry.index} (unlearning)"
            row = self.trajectories.get(trajectory)
            if row is None:
                self.findings.error(said, f"created trajectory {trajectory}, which the history store does not have")
                continue
            where = f"{self.where} trajectory {trajectory}"
            if row.get("parent") != body["source_trajectory"]:
                self.findings.error(where, f"was forked from trajectory {row.get('parent')}, {said} says {body['source_trajectory']}")
            if body.get("base_version") is not None and row.get("base_version") != body["base_version"]:
                self.findings.error(where, f"shares versions 0..{row.get('base_version')}, {said} says 0..{body['base_version']}")
            version = body["round"] - 1
            versions = self.store.by_key("versions", "trajectory", "version")
            for label, traj, field_name in (("before", body["source_trajectory"], "model_hash_before"), ("after", trajectory, "model_hash_after")):
                rows = versions.get((traj, version))
                if not rows:
                    self.findings.error(said, f"its model {label} is version {version} of trajectory {traj}, which the store does not have")
                    continue
                self._check_blob(f"{self.where} version {version} of trajectory {traj}", str(rows[0].get("blob_id")), body[field_name], said, field_name)
        for trajectory, row in sorted(self.trajectories.items()):
            info = self.store.json_column(row, "info")
            if isinstance(info, dict) and info.get("kind") == "unlearning" and row.get("status") == "complete" and trajectory not in self.facts.unlearnings:
                self.findings.error(f"{self.where} trajectory {trajectory}", "is a completed unlearning, but no ledger unlearning entry created it")
        current = self.store.current_trajectory()
        last = self.facts.last_unlearning
        expected = 1 if last is None else int(last.body["trajectory"])
        if current != expected:
            why = "no unlearning is recorded" if last is None else f"ledger entry {last.index} (the last unlearning) continued in trajectory {expected}"
            self.findings.error(f"{self.where} current trajectory", f"is {current}, but {why}")

    # ------------------------------------------------------------------ destroyed keys

    def _destroyed_keys(self) -> None:
        live = {int(r.get("key_id")): r.get("owner") for r in self.store.rows["data_keys"]}
        gone = {int(r.get("key_id")): r.get("owner") for r in self.store.rows["destroyed_keys"]}
        for key_id, owner in sorted(gone.items()):
            where = f"{self.where} destroyed key {key_id} (of {owner!r})"
            if owner == GLOBAL_OWNER:
                blobs = [r.get("blob_id") for r in self.store.rows["blobs"] if r.get("key_id") == key_id]
                if not any(b in self.facts.shredded_blobs for b in blobs):
                    self.findings.error(where, "no models-shredded entry of the ledger records its destruction")
            elif key_id not in self.facts.destroyed_keys and not self._legacy_entry(owner):
                self.findings.error(where, "no key-destroyed entry of the ledger records its destruction")
        for key_id, (client, entry) in sorted(self.facts.destroyed_keys.items()):
            said = f"ledger entry {entry.index} (key-destroyed)"
            if key_id in live:
                self.findings.error(said, f"says data key {key_id} of client {client!r} was destroyed, but the store still holds it")
            elif key_id not in gone:
                self.findings.error(said, f"names data key {key_id} of client {client!r}, which the store never recorded as destroyed")
            elif gone[key_id] != client:
                self.findings.error(said, f"names data key {key_id} of client {client!r}; the store destroyed it as the key of {gone[key_id]!r}")
        for client, entries in sorted(self.facts.destroyed_clients.items()):
            for entry in entries:
                if not entry.body.get("key_ids") and client in live.values():
                    self.findings.error(
                        f"ledger entry {entry.index} (key-destroyed)",
                        f"says client {client!r}'s key was destroyed, but the store still holds a key of that client "
                        "and the entry names no key ids",
                    )
        for blob_id, entry in sorted(self.facts.shredded_blobs.items()):
            rows = [r for r in self.store.rows["blobs"] if r.get("blob_id") == blob_id]
            if rows and int(rows[0].get("key_id")) in live:
                self.findings.error(f"ledger entry {entry.index} (models-shredded)", f"says blob {blob_id} was shredded, but its key is still in the store")

    def _legacy_entry(self, owner: str) -> bool:
        """A key-destroyed entry for ``owner`` that names no key ids (written before entries named them)."""
        return any(not e.body.get("key_ids") for e in self.facts.destroyed_clients.get(owner, []))


def audit_store(store_path: Path, snapshot: LogSnapshot, findings: Findings, *, key_file: Path | None = None) -> None:
    """Compare the history store at ``store_path`` with the ledger's entries; add every disagreement to ``findings``."""
    facts = _ledger_facts(snapshot, findings)
    try:
        with StoreInspection(store_path, key_file=key_file) as store:
            _StoreAudit(store, facts, findings).run()
    except (FedforgetError, OSError) as exc:
        findings.error(f"store {store_path}", str(exc))

