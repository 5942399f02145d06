"""Ledger entries: their line format, their hashes, and the bodies of the kinds the ledger knows.

File format: JSON lines, one entry per line, each line the canonical JSON
(:func:`fedforget.tree_head.ledger_json`: ``sort_keys``, separators
``(",", ":")``, ``ensure_ascii``, no NaN/Infinity) of ``{index, kind,
timestamp, body, previous_hash, entry_hash}``, where

* ``index`` is the entry's position, 0 for the first;
* ``entry_hash`` is the sha256 (64 lowercase hex digits) of the canonical JSON
  of ``{index, kind, timestamp, body, previous_hash}``;
* ``previous_hash`` is the ``entry_hash`` of the entry before (the first
  entry's is 64 zeros, the genesis hash).

The line without its newline is also the entry's Merkle leaf (RFC 9162), see
:mod:`fedforget.merkle` and :mod:`fedforget.server.ledger.log`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fedforget.errors import FedforgetError
from fedforget.tree_head import ledger_json

__all__ = [
    "GENESIS_HASH",
    "KNOWN_KINDS",
    "LedgerBrokenError",
    "LedgerEntry",
    "LedgerError",
    "decode_line",
    "entry_hash_of",
    "json_value",
    "utc_now",
    "validate_body",
]

GENESIS_HASH = "0" * 64
KNOWN_KINDS = (
    "round",
    "withdrawal-request",
    "unlearning",
    "key-destroyed",
    "models-shredded",
    "models-retained",
    "ledger-repair",
)
_KIND = re.compile(r"[a-z-]+")
HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"index", "kind", "timestamp", "body", "previous_hash", "entry_hash"})


class LedgerError(FedforgetError):
    """The ledger cannot do what was asked (missing file, misuse, inconsistent records)."""


class LedgerBrokenError(LedgerError):
    """The hash chain is broken; ``index`` is the first broken entry (entries before it are intact).

    ``kind`` is that entry's kind (None when the line cannot be read at all) and
    ``reason`` one of ``"unparseable"``, ``"hash mismatch"``, ``"not canonical"``,
    ``"bad sequence"``, ``"bad link"``, ``"missing entries"``, ``"anchor mismatch"``.
    """

    def __init__(self, path: Path, index: int, kind: str | None, reason: str, detail: str) -> None:
        self.path = path
        self.index = index
        self.kind = kind
        self.reason = reason
        self.detail = detail
        what = f"entry {index} ({kind})" if kind else f"entry {index} (unreadable)"
        intact = "no entry before it" if index == 0 else f"entries 0..{index - 1} are intact"
        super().__init__(f"ledger {path} is broken at {what}: {reason}: {detail} ({intact})")


class Defect(Exception):
    """Internal: why one line is not a valid entry."""

    def __init__(self, reason: str, detail: str, kind: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.kind = kind


def utc_now() -> str:
    """The ledger's timestamps: ISO 8601, UTC, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def entry_hash_of(index: int, kind: str, timestamp: str, body: dict, previous_hash: str) -> str:
    text = ledger_json({"index": index, "kind": kind, "timestamp": timestamp, "body": body, "previous_hash": previous_hash})
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------- bodies


def json_value(value: Any, where: str) -> Any:
    """A plain-JSON copy of ``value`` (tuples -> lists, numpy scalars -> Python); ValueError otherwise."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return json_value(value.item(), where)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}; JSON has no NaN or Infinity (record None instead)")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has key {key!r}; JSON object keys must be str")
            out[key] = json_value(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(body: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in body:
        raise ValueError(f"a {kind!r} entry's body needs {key!r}")
    return body[key]


def _need_int(body: Mapping[str, Any], key: str, kind: str, minimum: int) -> int:
    value = _need(body, key, kind)
    if not is_int(value) or value < minimum:
        raise ValueError(f"{kind} {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _need_str(body: Mapping[str, Any], key: str, kind: str) -> str:
    value = _need(body, key, kind)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} {key} must be a non-empty string, got {value!r}")
    return value


def _need_hash(body: Mapping[str, Any], key: str, kind: str, *, optional: bool = False) -> str | None:
    value = body.get(key) if optional else _need(body, key, kind)
    if optional and value is None:
        return None
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise ValueError(f"{kind} {key} must be a sha256 hex digest (64 lowercase hex digits), got {value!r}")
    return value


def _optional_blob(body: Mapping[str, Any], key: str, kind: str) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value)):
        raise ValueError(f"{kind} {key} must be a blob id (32 lowercase hex digits) or null, got {value!r}")


def _validate_round(body: Mapping[str, Any]) -> None:
    kind = "round"
    _need_int(body, "trajectory", kind, 1)
    _need_int(body, "round", kind, 1)
    _need_hash(body, "model_hash", kind)
    _optional_blob(body, "model_blob", kind)
    participants = _need(body, "participants", kind)
    if not isinstance(participants, list):
        raise ValueError(f"round participants must be a list, got {type(participants).__name__}")
    seen: set[str] = set()
    for i, p in enumerate(participants):
        where = f"round participants[{i}]"
        if not isinstance(p, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(p).__name__}")
        client = _need_str(p, "client", where)
        if client in seen:
            raise ValueError(f"round participants lists client {client!r} twice")
        seen.add(client)
        _need_int(p, "num_examples", where, 0)
        _need_hash(p, "update_hash", where, optional=True)
        _optional_blob(p, "blob", where)
        weight = p.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise ValueError(f"{where} weight must be a number or null, got {weight!r}")


def _validate_unlearning(body: Mapping[str, Any]) -> None:
    kind = "unlearning"
    clients = _need(body, "clients", kind)
    if not isinstance(clients, list) or not clients or not all(isinstance(c, str) and c for c in clients):
        raise ValueError(f"unlearning clients must be a non-empty list of client ids, got {clients!r}")
    if len(set(clients)) != len(clients):
        raise ValueError(f"unlearning clients lists a client twice: {clients!r}")
    _need_str(body, "strategy", kind)
    if not isinstance(_need(body, "hyperparameters", kind), Mapping):
        raise ValueError("unlearning hyperparameters must be a dict")
    if not is_int(_need(body, "seed", kind)):
        raise ValueError(f"unlearning seed must be an integer, got {body['seed']!r}")
    rnd = _need_int(body, "round", kind, 1)
    _need_hash(body, "model_hash_before", kind)
    _need_hash(body, "model_hash_after", kind)
    source = _need_int(body, "source_trajectory", kind, 1)
    trajectory = _need_int(body, "trajectory", kind, 1)
    if trajectory <= source:
        raise ValueError(
            f"unlearning trajectory ({trajectory}) must be newer than its source_trajectory ({source}): "
            "the history store numbers trajectories in creation order"
        )
    base = body.get("base_version")
    if base is not None and (not is_int(base) or not 0 <= base <= rnd - 1):
        raise ValueError(f"unlearning base_version must be None or an integer in 0..round-1 ({rnd - 1}), got {base!r}")
    evidence = _need(body, "evidence", kind)
    if evidence is not None and not isinstance(evidence, Mapping):
        raise ValueError("unlearning evidence must be a dict or None")
    if not isinstance(_need(body, "key_destroyed", kind), bool):
        raise ValueError("unlearning key_destroyed must be True or False")
    privacy = body.get("privacy")
    if privacy is not None:
        if not isinstance(privacy, Mapping):
            raise ValueError("unlearning privacy must be a dict")
        for name in ("mechanism", "noise_multiplier", "clipping_norm", "delta", "epsilon"):
            _need(privacy, name, "unlearning privacy")
        if not isinstance(privacy["epsilon"], Mapping) or set(privacy["epsilon"]) != set(clients):
            raise ValueError(f"unlearning privacy epsilon must give the epsilon of each client in {clients!r}")


def _validate_models(kind: str, body: Mapping[str, Any]) -> None:
    clients = _need(body, "clients", kind)
    if not isinstance(clients, list) or not all(isinstance(c, str) and c for c in clients):
        raise ValueError(f"{kind} clients must be a list of client ids, got {clients!r}")
    models = _need(body, "models", kind)
    if not isinstance(models, list):
        raise ValueError(f"{kind} models must be a list")
    for i, m in enumerate(models):
        where = f"{kind} models[{i}]"
        if not isinstance(m, Mapping):
            raise ValueError(f"{where} must be a dict")
        _need_int(m, "trajectory", where, 1)
        _need_int(m, "version", where, 0)
        _optional_blob(m, "blob", where)
    if kind == "models-retained":
        _need_str(body, "reason", kind)
        until = body.get("retain_until")
        if until is not None and not isinstance(until, str):
            raise ValueError("models-retained retain_until must be an ISO 8601 time or null")


def validate_body(kind: str, body: Mapping[str, Any]) -> None:
    """Check the fields the ledger itself relies on for the kinds it knows; extra fields are allowed."""
    if kind == "round":
        _validate_round(body)
    elif kind == "withdrawal-request":
        _need_str(body, "request_id", kind)
        _need_str(body, "client", kind)
        _need_hash(body, "request_hash", kind)
    elif kind == "unlearning":
        _validate_unlearning(body)
    elif kind == "key-destroyed":
        _need_str(body, "client", kind)
        key_ids = body.get("key_ids")
        if key_ids is not None and (not isinstance(key_ids, list) or not all(is_int(k) for k in key_ids)):
            raise ValueError(f"key-destroyed key_ids must be a list of integers, got {key_ids!r}")
    elif kind in ("models-shredded", "models-retained"):
        _validate_models(kind, body)


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class LedgerEntry:
    """One entry, as written. ``to_dict()`` gives the JSON object of its line."""

    index: int
    kind: str
    timestamp: str  # ISO 8601, UTC, milliseconds
    body: dict
    previous_hash: str
    entry_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "timestamp": self.timestamp,
            "body": self.body,
            "previous_hash": self.previous_hash,
            "entry_hash": self.entry_hash,
        }

    def line(self) -> bytes:
        """The entry's line in the file (canonical JSON and a newline)."""
        return (ledger_json(self.to_dict()) + "\n").encode("ascii")

    def with_position(self) -> dict[str, Any]:
        """The body with the entry's ``index`` and ``timestamp``: how audits report an entry."""
        return {"index": self.index, "timestamp": self.timestamp, **self.body}


def make_entry(index: int, kind: str, body: dict, previous_hash: str) -> LedgerEntry:
    timestamp = utc_now()
    return LedgerEntry(index, kind, timestamp, body, previous_hash, entry_hash_of(index, kind, timestamp, body, previous_hash))


def check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise ValueError(f"entry kind must match [a-z-]+, got {kind!r}")
    return kind


def decode_line(line: bytes) -> LedgerEntry:
    """Parse one line and check it on its own (form, own hash, canonical encoding); raises :class:`Defect`."""
    if not line.endswith(b"\n"):
        raise Defect(
            "unparseable",
            "incomplete line without a newline at the end of the file (an append was interrupted?); "
            "`fedforget audit repair` drops it and records that it did",
        )
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Defect("unparseable", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Defect("unparseable", f"a JSON {type(doc).__name__}, not an entry object")
    kind = doc.get("kind")
    kind = kind if isinstance(kind, str) and _KIND.fullmatch(kind) else None
    if set(doc) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(doc)), sorted(set(doc) - _FIELDS)
        raise Defect("unparseable", f"wrong fields (missing {missing}, unexpected {extra})", kind)
    index, timestamp, body = doc["index"], doc["timestamp"], doc["body"]
    previous, recorded = doc["previous_hash"], doc["entry_hash"]
    if not is_int(index) or index < 0:
        raise Defect("unparseable", f"index {index!r} is not an integer >= 0", kind)
    if kind is None:
        raise Defect("unparseable", f"kind {doc['kind']!r} is not of the form [a-z-]+")
    if not isinstance(timestamp, str):
        raise Defect("unparseable", f"timestamp {timestamp!r} is not a string", kind)
    if not isinstance(body, dict):
        raise Defect("unparseable", f"body is a JSON {type(body).__name__}, not an object", kind)
    for name, value in (("previous_hash", previous), ("entry_hash", recorded)):
        if not isinstance(value, str) or not HEX64.fullmatch(value):
            raise Defect("unparseable", f"{name} {value!r} is not 64 lowercase hex digits", kind)
    try:
        computed = entry_hash_of(index, kind, timestamp, body, previous)
    except ValueError as exc:  # NaN/Infinity in the body
        raise Defect("unparseable", f"body is not canonical JSON ({exc})", kind) from None
    if computed != recorded:
        raise Defect(
            "hash mismatch",
            f"its contents were altered: it records hash {recorded[:16]}… but hashes to {computed[:16]}…",
            kind,
        )
    entry = LedgerEntry(index, kind, timestamp, body, previous, recorded)
    if entry.line() != line:
        raise Defect("not canonical", "its line is not in canonical JSON form (re-encoded or edited by hand)", kind)
    return entry


def validated(entry: LedgerEntry, path: Path) -> LedgerEntry:
    """``entry`` if its body is well formed for its kind; :class:`LedgerError` naming it otherwise."""
    try:
        validate_body(entry.kind, entry.body)
    except ValueError as exc:
        raise LedgerError(f"ledger {path} entry {entry.index} ({entry.kind}) is malformed: {exc}") from None
    return entry
