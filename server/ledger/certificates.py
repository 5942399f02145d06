"""Unlearning certificates: the server's signed, offline-verifiable account of a withdrawal.

A certificate is one JSON file::

    {"certificate": {...payload...},
     "signature": "<base64 DER ECDSA-SHA384 over canonical_json(payload)>",
     "signer": {"public_key": "ecdsa-sha2-nistp384 AAAA...", "fingerprint": "SHA256:..."}}

The payload holds the withdrawal request exactly as the client signed it
(signature included), the ledger entries of the unlearning (each with its entry
hash), the measured evidence, the key destruction record, what became of the
old global models trained with the client (shredded, or kept and until when),
the ledger's signed tree head with an RFC 9162 inclusion proof of the
unlearning entry, and two lists of plain-English statements: what the server
attests and, as explicitly, what it does not. Anyone holding the federation's server public key can check it with
:func:`fedforget.client.certificate_check.verify_certificate`, offline. The
``signer`` block is a convenience for display; a verifier must check the
signature against a server key it obtained independently, never the embedded one.
"""

from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from fedforget.errors import FedforgetError
from fedforget.files import write_bytes_atomic
from fedforget.strategies.empty_shard import EmptyShard
from fedforget.identity import (
    IdentityError,
    canonical_json,
    fingerprint,
    public_key_openssh,
    sign_document,
)

__all__ = [
    "CERTIFICATE_FORMAT",
    "CERTIFICATE_VERSION",
    "CertificateError",
    "entry_hash",
    "issue_certificate",
    "write_certificate",
]

CERTIFICATE_FORMAT = "fedforget-unlearning-certificate"
CERTIFICATE_VERSION = 2  # 2: old_models and ledger_proof (signed tree head + inclusion proof)
ENTRY_HASH_FIELD = "entry_hash"
EMPTY_SHARD_STRATEGY = EmptyShard.name


class CertificateError(FedforgetError):
    """A certificate cannot be issued or written from what was given."""


def entry_hash(entry: dict) -> str:
    """``sha256:<hex>`` of the canonical JSON of a ledger entry (used when it carries none)."""
    return "sha256:" + hashlib.sha256(canonical_json(entry)).hexdigest()


def _utc_timestamp(issued_at: str | None) -> str:
    if issued_at is None:
        moment = datetime.now(timezone.utc).replace(microsecond=0)
    else:
        try:
            moment = datetime.fromisoformat(issued_at)
        except (TypeError, ValueError):
            raise CertificateError(f"issued_at {issued_at!r} is not an ISO 8601 timestamp") from None
        if moment.tzinfo is None:
            raise CertificateError(f"issued_at {issued_at!r} has no time zone; give it in UTC, e.g. 2025-01-31T12:00:00Z")
        moment = moment.astimezone(timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def _statements(
    *, request: dict, ledger_entries: list[dict], evidence: dict | None, key_destruction: dict | None,
    old_models: dict | None, ledger_proof: dict | None, privacy: dict | None = None,
) -> tuple[list[str], list[str]]:
    does_not_attest = []
    if request.get("initiated_by") == "operator":
        attests = [
            "The federation's operator initiated this erasure of the client's contributions, for the reason "
            "stated in this certificate's request, and the server acted on it.",
        ]
        does_not_attest.append("That the client asked for this erasure: it signed no request for it.")
    else:
        attests = [
            "The federation's server received the withdrawal request included in this certificate, "
            "with the client's signature as included, and acted on it.",
        ]
    if ledger_entries:
        attests.append(
            "The unlearning algorithm named in the ledger entries of this certificate was run on the "
            "training history recorded in the federation's history store, and produced the model "
            "whose hash those entries state."
        )
    else:
        does_not_attest.append("That any unlearning ran: this certificate records no ledger entries.")
    if key_destruction is not None:
        when = key_destruction.get("destroyed_at")
        at = f"at {when}" if isinstance(when, str) and when else "at the time stated in its key destruction record"
        already = " by an earlier unlearning (nothing was destroyed again for this request)" if key_destruction.get("already_destroyed") else ""
        attests.append(
            f"The data key under which the history store kept this client's recorded updates was destroyed {at}{already}, "
            "so the server can no longer decrypt the client's updates held in that store."
        )
    else:
        does_not_attest.append("That the client's data key was destroyed: no key destruction is recorded here.")
    if ledger_proof is not None:
        attests.append(
            "The ledger entries of this certificate are in the federation's ledger: the tree head embedded here, "
            "signed with the federation's key, covers them (its inclusion proof shows the unlearning entry). "
            "Whoever keeps this certificate can later check that the ledger was not rewritten or cut since "
            "(fedforget audit verify --certificate)."
        )
    else:
        does_not_attest.append(
            "That its ledger entries are in a ledger the federation signed: no signed tree head is included."
        )
    attests += _shard_statements(ledger_entries)
    attests += _old_model_statements(old_models)
    if privacy is not None:
        attests.append(
            f"The federation trained with differential privacy ({privacy['mechanism']}: every update clipped to "
            f"L2 norm {privacy['clipping_norm']:g}, Gaussian noise multiplier {privacy['noise_multiplier']:g}); by "
            f"the server's accounting (Renyi DP, per client) the models released in the rounds this client took "
            f"part in spent epsilon = {privacy['epsilon']:.4g} of its data at delta = {privacy['delta']:g}."
        )
        if privacy.get("unlearned_model_noised") is False:
            does_not_attest.append(
                "That the model this unlearning produced is covered by that epsilon, for this client or any other: "
                "the unlearning strategy computed it from the recorded updates, and averaged the client training "
                "it asked for, without adding noise, so it is not a differentially private release. Only a "
                "retrain, whose every round is noised, is one."
            )
        if privacy.get("rounds_without_noise"):
            does_not_attest.append(
                f"That the {privacy['rounds_without_noise']} round(s) unlearning strategies computed themselves in "
                "this federation's history, without noise, are covered by that epsilon."
            )
    if evidence is not None:
        attests.append(
            "The evidence figures in this certificate are what the server measured, as described there, "
            "on the model the unlearning produced."
        )
    else:
        does_not_attest.append("Any measured evidence of forgetting: none is included in this certificate.")
    does_not_attest += [
        "That no trace of the client's data can remain in the model. Approximate unlearning strategies "
        "reduce the client's influence without removing it by construction, and membership-inference or "
        "other evidence figures bound only what those tests measured, on the examples they used.",
        "Anything about copies of the client's data, updates or earlier models outside the federation's "
        "history store: backups, logs, or models and updates that other parties received or kept.",
        "The truth of these statements beyond the server's word: the signature proves that the holder of "
        "the server key made them and that they have not been altered since.",
    ]
    return attests, does_not_attest


def _shard_statements(ledger_entries: list[dict]) -> list[str]:
    """In a sharded federation: which shard the unlearning changed, and that the other shards never held the client."""
    out = []
    for entry in ledger_entries:
        shard = entry.get("body", {}).get("shard") if entry.get("kind") == "unlearning" else None
        if isinstance(shard, dict):
            members = ", ".join(str(c) for c in shard.get("clients", []))
            out.append(
                f"The federation is sharded: its clients train in {shard.get('count')} isolated shards, each with its own "
                f"model, and the served model combines them. The client trained only in shard {shard.get('index')} "
                f"(clients {members}); this unlearning changed that shard's model alone, and the other shards' models "
                "never received the client's updates."
            )
            if entry["body"].get("strategy") == EMPTY_SHARD_STRATEGY:
                out.append(
                    f"No client of shard {shard.get('index')} remains: the shard's model went back to the one before "
                    "its clients' first round, and the served model is the ensemble of the other shards from then on."
                )
    return out


def _versions(models: list[dict]) -> str:
    by_trajectory: dict[int, list[int]] = {}
    for m in models:
        by_trajectory.setdefault(int(m["trajectory"]), []).append(int(m["version"]))
    return "; ".join(f"trajectory {t}: versions {', '.join(map(str, sorted(v)))}" for t, v in sorted(by_trajectory.items()))


def _old_model_statements(old_models: dict | None) -> list[str]:
    """What became of the global models of the old history that were trained with the client."""
    if old_models is None:
        return []
    out = []
    if old_models.get("shredded"):
        out.append(
            "The global models of the earlier history that were trained with the client's data and that the run no "
            f"longer uses were crypto-shredded (their data keys destroyed): {_versions(old_models['shredded'])}."
        )
    if old_models.get("retained"):
        out.append(
            "The global models of the earlier history that were trained with the client's data are kept for the "
            f"operator's audit retention period until {old_models['retain_until']}, then shredded: "
            f"{_versions(old_models['retained'])}."
        )
    if old_models.get("in_use"):
        out.append(
            "These global model versions still contain the client's contribution because the run continues from "
            f"them (an approximate unlearning), and are kept while it does: {_versions(old_models['in_use'])}."
        )
    if not any(old_models.get(k) for k in ("shredded", "retained", "in_use")):
        out.append("No global model of the earlier history trained with the client's data remains readable.")
    return out


def issue_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    *,
    federation_id: str,
    request: dict,
    ledger_entries: list[dict],
    evidence: dict | None,
    key_destruction: dict | None,
    old_models: dict | None = None,
    ledger_proof: dict | None = None,
    issued_at: str | None = None,
    privacy: dict | None = None,
) -> dict:
    """Build and sign an unlearning certificate with the federation's server key.

    ``request`` is embedded exactly as given (the client's signed withdrawal
    request, signature included). Each ledger entry keeps its own
    ``entry_hash`` if it has one; an entry without one gets
    ``sha256:<hex of canonical JSON of the entry>``. ``issued_at`` (ISO 8601
    with a time zone) defaults to now; it is stored in UTC with a ``Z``.
    Inputs are deep-copied: later changes to them do not touch the certificate.
    Raises :class:`CertificateError` on missing or non-JSON inputs (NaN and
    infinities included).
    """
    if not isinstance(server_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"the server key must be an ECDSA P-384 private key, got {type(server_key).__name__}")
    if not isinstance(federation_id, str) or not federation_id:
        raise CertificateError("federation_id must be a non-empty string")
    if not isinstance(request, dict) or not request:
        raise CertificateError("request must be the client's signed withdrawal request (a non-empty dict)")
    if not isinstance(ledger_entries, (list, tuple)) or not all(isinstance(e, dict) for e in ledger_entries):
        raise CertificateError("ledger_entries must be a list of dicts")
    for name, value in (("evidence", evidence), ("key_destruction", key_destruction), ("old_models", old_models), ("ledger_proof", ledger_proof), ("privacy", privacy)):
        if value is not None and not isinstance(value, dict):
            raise CertificateError(f"{name} must be a dict or None, got {type(value).__name__}")

    try:
        entries = []
        for index, entry in enumerate(ledger_entries):
            entry = copy.deepcopy(entry)
            if ENTRY_HASH_FIELD not in entry:
                entry[ENTRY_HASH_FIELD] = entry_hash(entry)
            elif not isinstance(entry[ENTRY_HASH_FIELD], str) or not entry[ENTRY_HASH_FIELD]:
                raise CertificateError(f"ledger entry {index} has an {ENTRY_HASH_FIELD} that is not a non-empty string")
            entries.append(entry)
        attests, does_not_attest = _statements(
            request=request, ledger_entries=entries, evidence=evidence, key_destruction=key_destruction, old_models=old_models,
            ledger_proof=ledger_proof, privacy=privacy,
        )
        payload: dict[str, Any] = {
            "format": CERTIFICATE_FORMAT,
            "version": CERTIFICATE_VERSION,
            "federation_id": federation_id,
            "issued_at": _utc_timestamp(issued_at),
            "request": request,
            "ledger_entries": entries,
            "evidence": evidence,
            "key_destruction": key_destruction,
            "old_models": old_models,
            "ledger_proof": ledger_proof,
            **({"privacy": privacy} if privacy is not None else {}),
            "attests": attests,
            "does_not_attest": does_not_attest,
        }
        # Validate (canonical_json refuses NaN, non-string keys, non-JSON values), then copy through
        # JSON: what is signed is exactly what gets written (tuples become lists, the caller's objects
        # are not shared), in the readable field order above.
        canonical_json(payload)
        payload = json.loads(json.dumps(payload, ensure_ascii=False, allow_nan=False))
        signature = sign_document(server_key, payload)
        signer = {"public_key": public_key_openssh(server_key), "fingerprint": fingerprint(server_key)}
    except IdentityError as exc:
        raise CertificateError(f"cannot issue the certificate: {exc}") from exc
    return {"certificate": payload, "signature": signature, "signer": signer}


def write_certificate(path: Path, cert: dict) -> None:
    """Write a certificate as indented UTF-8 JSON, atomically (readers see the old file or the new one)."""
    if not isinstance(cert, dict) or set(cert) != {"certificate", "signature", "signer"}:
        raise CertificateError("not a certificate: expected the dict returned by issue_certificate")
    try:
        text = json.dumps(cert, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise CertificateError(f"certificate is not writable as JSON: {exc}") from exc
    write_bytes_atomic(Path(path), text.encode("utf-8"), mode=0o644)
