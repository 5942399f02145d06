"""Check an unlearning certificate offline, against a server key you already trust.

The certificate carries its signer's public key for display, but that proves
nothing: anyone can sign a certificate with a key of their own and embed it.
:func:`verify_certificate` therefore checks the signature only against the
server public key the caller gives (obtained from the federation out of band),
and declares the certificate invalid when the embedded key differs from it.

A certificate of version 2 also carries the ledger's tree head, signed with
the same key, and an RFC 9162 inclusion proof of its unlearning entry: the
check recomputes the entry's leaf hash from the entry in the certificate and
verifies the proof against the signed root, so the entry is provably in the
ledger the federation signed. (Whether that ledger is still intact later is
what ``fedforget audit verify --certificate`` checks with the ledger at hand.)

Deliberately self-contained (:mod:`fedforget.identity`, :mod:`fedforget.merkle`,
:mod:`fedforget.tree_head`): checking a certificate needs neither Flower nor
torch nor the server package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fedforget.errors import FedforgetError
from fedforget.files import read_at_most
from fedforget.identity import (
    IdentityError,
    fingerprint,
    load_public_key,
    public_key_openssh,
    strict_json_loads,
    verify_document,
)
from fedforget.merkle import HASH_SIZE, verify_inclusion
from fedforget.tree_head import SignedTreeHead, TreeHeadError, entry_leaf_hash

__all__ = ["CertificateCheckError", "CertificateReport", "verify_certificate"]

# Must match fedforget.server.ledger.certificates (a test checks they agree).
CERTIFICATE_FORMAT = "fedforget-unlearning-certificate"
SUPPORTED_VERSIONS = frozenset({1, 2})
_MAX_CERTIFICATE_BYTES = 64 * 1024 * 1024


class CertificateCheckError(FedforgetError):
    """The certificate or the server key could not be read at all (as opposed to: read, and invalid)."""


@dataclass(frozen=True)
class CertificateReport:
    """The outcome of checking one certificate.

    ``signer_fingerprint`` is the fingerprint of the server key the certificate
    was checked against: on a valid certificate, its signer. ``attests``,
    ``does_not_attest`` and ``summary`` are filled only when the certificate is
    valid; nothing from an invalid certificate is repeated as if it were true.
    """

    valid: bool
    reason: str | None
    signer_fingerprint: str
    attests: list[str] = field(default_factory=list)
    does_not_attest: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class _Invalid(Exception):
    pass


def _parse(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return strict_json_loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"the file is not valid JSON: {exc}") from None
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    except RecursionError:
        raise _Invalid("the JSON is nested too deeply") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Invalid(message)


def _string_list(value: Any, name: str) -> list[str]:
    _require(
        isinstance(value, list) and bool(value) and all(isinstance(s, str) and s for s in value),
        f"the certificate's {name} field must be a non-empty list of statements",
    )
    return list(value)


def _check(document: Any, expected_key: Any, expected_fingerprint: str) -> CertificateReport:
    _require(isinstance(document, dict), "the file is not a JSON object")
    missing = [k for k in ("certificate", "signature", "signer") if k not in document]
    _require(not missing, f"missing field(s): {', '.join(missing)}")
    extra = sorted(set(document) - {"certificate", "signature", "signer"})
    _require(not extra, f"unexpected field(s) outside the signed part: {', '.join(extra)}")
    payload, signature, signer = document["certificate"], document["signature"], document["signer"]
    _require(isinstance(payload, dict), "the 'certificate' field is not a JSON object")
    _require(isinstance(signature, str) and bool(signature), "the 'signature' field is not a non-empty string")
    _require(
        isinstance(signer, dict)
        and isinstance(signer.get("public_key"), str)
        and isinstance(signer.get("fingerprint"), str),
        "the 'signer' field must hold 'public_key' and 'fingerprint' strings",
    )

    try:
        embedded = load_public_key(signer["public_key"])
    except IdentityError as exc:
        raise _Invalid(f"the embedded signer key is unreadable: {exc}") from None
    embedded_fingerprint = fingerprint(embedded)
    _require(
        public_key_openssh(embedded) == public_key_openssh(expected_key),
        f"the certificate names signer {embedded_fingerprint}, not the server key given "
        f"({expected_fingerprint}); it was not issued under that key",
    )
    _require(
        signer["fingerprint"] == expected_fingerprint,
        f"the certificate's signer fingerprint {signer['fingerprint']!r} does not match its key "
        f"({expected_fingerprint})",
    )
    _require(
        verify_document(expected_key, payload, signature),
        f"the signature does not verify under the server key {expected_fingerprint}: "
        "the certificate was altered after signing, or was not signed by this key",
    )

    # Signed, so these are the server's own statements; still insist on the shape we display.
    _require(payload.get("format") == CERTIFICATE_FORMAT, f"not a {CERTIFICATE_FORMAT} (format {payload.get('format')!r})")
    version = payload.get("version")
    _require(
        isinstance(version, int) and not isinstance(version, bool) and version in SUPPORTED_VERSIONS,
        f"unsupported certificate version {version!r} (this fedforget reads {sorted(SUPPORTED_VERSIONS)})",
    )
    required = (
        "federation_id", "issued_at", "request", "ledger_entries", "evidence", "key_destruction",
        "attests", "does_not_attest",
    )  # fmt: skip
    missing = [k for k in required if k not in payload]
    _require(not missing, f"the signed certificate lacks required field(s): {', '.join(missing)}")
    _require(isinstance(payload["federation_id"], str) and bool(payload["federation_id"]), "federation_id is empty")
    try:
        datetime.fromisoformat(payload["issued_at"])
    except (TypeError, ValueError):
        raise _Invalid(f"issued_at {payload['issued_at']!r} is not an ISO 8601 timestamp") from None
    _require(isinstance(payload["request"], dict) and bool(payload["request"]), "the withdrawal request is missing")
    entries = payload["ledger_entries"]
    _require(
        isinstance(entries, list)
        and all(isinstance(e, dict) and isinstance(e.get("entry_hash"), str) and e["entry_hash"] for e in entries),
        "ledger_entries must be a list of entries, each with its entry_hash",
    )
    for name in ("evidence", "key_destruction"):
        _require(payload[name] is None or isinstance(payload[name], dict), f"{name} must be an object or null")
    head = None
    if version >= 2:
        missing = [k for k in ("old_models", "ledger_proof") if k not in payload]
        _require(not missing, f"a version {version} certificate lacks required field(s): {', '.join(missing)}")
        _require(payload["old_models"] is None or isinstance(payload["old_models"], dict), "old_models must be an object or null")
        if payload["ledger_proof"] is not None:
            head = _check_ledger_proof(payload["ledger_proof"], entries, payload["federation_id"], expected_key)
    attests = _string_list(payload["attests"], "attests")
    does_not_attest = _string_list(payload["does_not_attest"], "does_not_attest")

    summary = {
        "format": payload["format"],
        "version": version,
        "federation_id": payload["federation_id"],
        "issued_at": payload["issued_at"],
        "request": payload["request"],
        "ledger_entries": len(entries),
        "entry_hashes": [e["entry_hash"] for e in entries],
        "evidence": payload["evidence"],
        "key_destruction": payload["key_destruction"],
        "old_models": payload.get("old_models"),
        "privacy": payload.get("privacy"),
        "ledger_head": head,
    }
    return CertificateReport(
        valid=True,
        reason=None,
        signer_fingerprint=expected_fingerprint,
        attests=attests,
        does_not_attest=does_not_attest,
        summary=summary,
    )


def _check_ledger_proof(proof: Any, entries: list, federation_id: str, key: Any) -> dict:
    """The signed head, once it verifies and the inclusion proof shows the unlearning entry under it."""
    _require(isinstance(proof, dict), "ledger_proof must be an object with signed_head, entry_index and inclusion_proof")
    _require(set(proof) == {"signed_head", "entry_index", "inclusion_proof"}, "ledger_proof has the wrong fields")
    try:
        signed = SignedTreeHead.from_dict(proof["signed_head"])
        signed.verify(key)
    except TreeHeadError as exc:
        raise _Invalid(f"the ledger's tree head in the certificate is not valid: {exc}") from None
    _require(signed.head.federation_id == federation_id, "the tree head belongs to another federation")
    index, path = proof["entry_index"], proof["inclusion_proof"]
    _require(isinstance(index, int) and not isinstance(index, bool), "ledger_proof entry_index must be an integer")
    matching = [e for e in entries if e.get("index") == index and e.get("kind") == "unlearning"]
    _require(len(matching) == 1, f"the certificate holds no unlearning entry with index {index}")
    _require(
        isinstance(path, list) and all(isinstance(h, str) and len(h) == 2 * HASH_SIZE for h in path),
        "ledger_proof inclusion_proof must be a list of hex hashes",
    )
    try:
        hashes = [bytes.fromhex(h) for h in path]
        leaf = entry_leaf_hash(matching[0])
    except ValueError:
        raise _Invalid("the inclusion proof or the unlearning entry cannot be encoded") from None
    _require(
        verify_inclusion(leaf, index, signed.head.tree_size, hashes, signed.head.root),
        f"the inclusion proof does not show unlearning entry {index} in the ledger of "
        f"{signed.head.tree_size} entries the federation signed: the entry was altered or never logged",
    )
    return signed.to_dict()


def verify_certificate(path: Path, server_public_key: Path | str) -> CertificateReport:
    """Check the certificate at ``path`` against the federation's server public key.

    ``server_public_key`` is an OpenSSH public key line or a file holding one.
    The certificate is valid only if it is well-formed JSON with every required
    field, names exactly that key as its signer, and its signature over the
    canonical payload verifies under that key: a single changed byte in the
    payload makes it invalid. An invalid certificate gives a report with
    ``valid=False`` and the reason; :class:`CertificateCheckError` is raised
    only when the certificate file or the server key cannot be read at all.
    """
    try:
        server_key = load_public_key(server_public_key)
    except IdentityError as exc:
        raise CertificateCheckError(f"cannot use the server public key: {exc}") from exc
    expected_fingerprint = fingerprint(server_key)
    path = Path(path)
    data = read_at_most(path, _MAX_CERTIFICATE_BYTES, "certificate", CertificateCheckError)
    try:
        _require(len(data) <= _MAX_CERTIFICATE_BYTES, f"the file is larger than {_MAX_CERTIFICATE_BYTES} bytes")
        return _check(_parse(data), server_key, expected_fingerprint)
    except _Invalid as exc:
        return CertificateReport(valid=False, reason=str(exc), signer_fingerprint=expected_fingerprint)
