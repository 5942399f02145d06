"""The audit ledger: an append-only, hash-chained record of what the federation did.

Why it exists: regulators and clients ask "which model versions contain our
data?" and "prove you removed it". The history store answers the first for the
server itself, but it is mutable (forks, crypto-shredding) and opaque; the
ledger is the account that can be handed to an auditor. Every round (model
hash, contributing clients, sample counts, update hashes), every withdrawal
request (its hash), every unlearning (strategy, hyperparameters, seed, model
hash before and after, evidence) and every key destruction is one entry.

File format: JSON lines, one entry per line, each line the canonical JSON
(``sort_keys``, separators ``(",", ":")``, ``ensure_ascii``, no NaN/Infinity)
of ``{index, kind, timestamp, body, previous_hash, entry_hash}``, where

* ``index`` is the entry's position, 0 for the first;
* ``entry_hash`` is the sha256 (64 lowercase hex digits) of the canonical JSON
  of ``{index, kind, timestamp, body, previous_hash}``;
* ``previous_hash`` is the ``entry_hash`` of the entry before (the first
  entry's is 64 zeros, the genesis hash).

Editing, reordering, inserting or deleting an entry, or cutting a line short,
breaks the chain at the first entry concerned, and :meth:`Ledger.verify` names
it (:class:`LedgerBrokenError`: index, kind and why). What a chain cannot show
by itself is entries removed *from its end*: the rest is still a valid chain.
Against that, publish or hand out the head (:meth:`Ledger.head`: entry count
and last hash) and check it later with ``verify(anchor=...)``.

Writers: appends take ``fcntl.flock(LOCK_EX)`` on the file, re-read its last
entry under the lock, and write + fsync the new line before releasing it, so
appends from several processes (or several ``Ledger`` handles) never
interleave and each links to the one actually before it. Readers snapshot the
file size under a shared lock, so they never see half an append in progress; a
line left incomplete by a crash is reported, never skipped (see
:meth:`Ledger.repair`). A ``Ledger`` handle is not thread-safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import numbers
import os
import re
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedforget.errors import FedforgetError
from fedforget.files import fsync_dir, write_and_sync

__all__ = [
    "GENESIS_HASH",
    "KNOWN_KINDS",
    "ClientAudit",
    "Ledger",
    "LedgerBrokenError",
    "LedgerEntry",
    "LedgerError",
    "LedgerStoreMismatchError",
    "canonical_json",
    "model_hash",
]

GENESIS_HASH = "0" * 64
KNOWN_KINDS = ("round", "withdrawal-request", "unlearning", "key-destroyed", "ledger-repair")
_KIND = re.compile(r"[a-z-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"index", "kind", "timestamp", "body", "previous_hash", "entry_hash"})
_TAIL_BLOCK = 64 * 1024


# --------------------------------------------------------------------------- errors


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


class LedgerStoreMismatchError(LedgerError):
    """A model hash in the ledger does not match the model the history store holds."""

    def __init__(self, index: int, kind: str, detail: str) -> None:
        self.index = index
        self.kind = kind
        super().__init__(f"ledger entry {index} ({kind}): {detail}")


class _Defect(Exception):
    """Internal: why one line is not a valid entry."""

    def __init__(self, reason: str, detail: str, kind: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.kind = kind


# --------------------------------------------------------------------------- hashing


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that hashes are computed over (ASCII, sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _entry_hash(index: int, kind: str, timestamp: str, body: dict, previous_hash: str) -> str:
    text = canonical_json(
        {"index": index, "kind": kind, "timestamp": timestamp, "body": body, "previous_hash": previous_hash}
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


_MODEL_HASH_DOMAIN = b"fedforget-model-hash/1\x00"


def model_hash(arrays: Mapping[str, Any]) -> str:
    """sha256 (hex) of a model as named arrays, stable across processes and machines.

    The encoding hashed is: a domain tag, the number of arrays, then for each
    array *in iteration order* its UTF-8 name, its dtype as a little-endian
    numpy type string (``<f4``, ``<i8``, ``|b1``), its shape, and its raw
    little-endian C-order bytes, every variable-length part prefixed by its
    length (uint64 LE). So the hash changes with the order, names, dtypes,
    shapes and every bit of the values (0.0 and -0.0 differ). Byte order does
    not matter: a big-endian array hashes like its little-endian equal.

    Hash the model as the history store holds it: floating arrays are kept as
    float32, so a float64 model and the float32 model read back differ.
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"model_hash needs a mapping of name -> array, got {type(arrays).__name__}")
    digest = hashlib.sha256(_MODEL_HASH_DOMAIN)
    digest.update(struct.pack("<Q", len(arrays)))
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise ValueError(f"array names must be str, got {name!r}")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufc":
            raise ValueError(f"array {name!r} has dtype {arr.dtype}; only numeric and bool arrays can be hashed")
        little = arr.dtype.newbyteorder("<")
        data = np.ascontiguousarray(arr, dtype=little).reshape(-1).view(np.uint8)
        name_bytes = name.encode("utf-8")
        dtype_bytes = little.str.encode("ascii")
        digest.update(struct.pack("<Q", len(name_bytes)) + name_bytes)
        digest.update(struct.pack("<Q", len(dtype_bytes)) + dtype_bytes)
        digest.update(struct.pack("<Q", arr.ndim) + b"".join(struct.pack("<Q", int(d)) for d in arr.shape))
        digest.update(struct.pack("<Q", data.nbytes))
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- bodies


def _json_value(value: Any, where: str) -> Any:
    """A plain-JSON copy of ``value`` (tuples -> lists, numpy scalars -> Python); ValueError otherwise."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return _json_value(value.item(), where)
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
            out[key] = _json_value(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(body: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in body:
        raise ValueError(f"a {kind!r} entry's body needs {key!r}")
    return body[key]


def _need_int(body: Mapping[str, Any], key: str, kind: str, minimum: int) -> int:
    value = _need(body, key, kind)
    if not _is_int(value) or value < minimum:
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
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise ValueError(f"{kind} {key} must be a sha256 hex digest (64 lowercase hex digits), got {value!r}")
    return value


def _validate_body(kind: str, body: Mapping[str, Any]) -> None:
    """Check the fields the ledger itself relies on for the kinds it knows; extra fields are allowed."""
    if kind == "round":
        _need_int(body, "trajectory", kind, 1)
        _need_int(body, "round", kind, 1)
        _need_hash(body, "model_hash", kind)
        participants = _need(body, "participants", kind)
        if not isinstance(participants, list):
            raise ValueError(f"round participants must be a list, got {type(participants).__name__}")
        seen: set[str] = set()
        for i, p in enumerate(participants):
            if not isinstance(p, Mapping):
                raise ValueError(f"round participants[{i}] must be a dict, got {type(p).__name__}")
            client = _need_str(p, "client", f"round participants[{i}]")
            if client in seen:
                raise ValueError(f"round participants lists client {client!r} twice")
            seen.add(client)
            _need_int(p, "num_examples", f"round participants[{i}]", 0)
            _need_hash(p, "update_hash", f"round participants[{i}]", optional=True)
    elif kind == "withdrawal-request":
        _need_str(body, "request_id", kind)
        _need_str(body, "client", kind)
        _need_hash(body, "request_hash", kind)
    elif kind == "unlearning":
        clients = _need(body, "clients", kind)
        if not isinstance(clients, list) or not clients or not all(isinstance(c, str) and c for c in clients):
            raise ValueError(f"unlearning clients must be a non-empty list of client ids, got {clients!r}")
        if len(set(clients)) != len(clients):
            raise ValueError(f"unlearning clients lists a client twice: {clients!r}")
        _need_str(body, "strategy", kind)
        if not isinstance(_need(body, "hyperparameters", kind), Mapping):
            raise ValueError("unlearning hyperparameters must be a dict")
        seed = _need(body, "seed", kind)
        if not _is_int(seed):
            raise ValueError(f"unlearning seed must be an integer, got {seed!r}")
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
        if base is not None and (not _is_int(base) or not 0 <= base <= rnd - 1):
            raise ValueError(f"unlearning base_version must be None or an integer in 0..round-1 ({rnd - 1}), got {base!r}")
        evidence = _need(body, "evidence", kind)
        if evidence is not None and not isinstance(evidence, Mapping):
            raise ValueError("unlearning evidence must be a dict or None")
        if not isinstance(_need(body, "key_destroyed", kind), bool):
            raise ValueError("unlearning key_destroyed must be True or False")
    elif kind == "key-destroyed":
        _need_str(body, "client", kind)


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
        return (canonical_json(self.to_dict()) + "\n").encode("ascii")


def _decode(line: bytes) -> LedgerEntry:
    """Parse one line and check it on its own (form, own hash, canonical encoding); raises _Defect."""
    if not line.endswith(b"\n"):
        raise _Defect(
            "unparseable",
            "incomplete line without a newline at the end of the file (an append was interrupted?); "
            "`fedforget audit repair` drops it and records that it did",
        )
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Defect("unparseable", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _Defect("unparseable", f"a JSON {type(doc).__name__}, not an entry object")
    kind = doc.get("kind")
    kind = kind if isinstance(kind, str) and _KIND.fullmatch(kind) else None
    if set(doc) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(doc)), sorted(set(doc) - _FIELDS)
        raise _Defect("unparseable", f"wrong fields (missing {missing}, unexpected {extra})", kind)
    index, timestamp, body = doc["index"], doc["timestamp"], doc["body"]
    previous, recorded = doc["previous_hash"], doc["entry_hash"]
    if not _is_int(index) or index < 0:
        raise _Defect("unparseable", f"index {index!r} is not an integer >= 0", kind)
    if kind is None:
        raise _Defect("unparseable", f"kind {doc['kind']!r} is not of the form [a-z-]+")
    if not isinstance(timestamp, str):
        raise _Defect("unparseable", f"timestamp {timestamp!r} is not a string", kind)
    if not isinstance(body, dict):
        raise _Defect("unparseable", f"body is a JSON {type(body).__name__}, not an object", kind)
    for name, value in (("previous_hash", previous), ("entry_hash", recorded)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise _Defect("unparseable", f"{name} {value!r} is not 64 lowercase hex digits", kind)
    try:
        computed = _entry_hash(index, kind, timestamp, body, previous)
    except ValueError as exc:  # NaN/Infinity in the body
        raise _Defect("unparseable", f"body is not canonical JSON ({exc})", kind) from None
    if computed != recorded:
        raise _Defect(
            "hash mismatch",
            f"its contents were altered: it records hash {recorded[:16]}… but hashes to {computed[:16]}…",
            kind,
        )
    entry = LedgerEntry(index, kind, timestamp, body, previous, recorded)
    if entry.line() != line:
        raise _Defect("not canonical", "its line is not in canonical JSON form (re-encoded or edited by hand)", kind)
    return entry


def _tail(fd: int, size: int, want: int) -> tuple[list[bytes], bytes]:
    """The last ``want`` complete lines before ``size`` (oldest first, newlines kept) and the bytes after the last newline."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        if buf.count(b"\n") > want:
            break
    cut = buf.rfind(b"\n") + 1
    torn = buf[cut:]
    lines = [part + b"\n" for part in buf[:cut].split(b"\n")[:-1]]
    if pos > 0:
        lines = lines[1:]  # the first piece may start mid-line
    return lines[-want:], torn


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- client audit


@dataclass(frozen=True)
class ClientAudit:
    """What the ledger says about one client's contribution. See :meth:`Ledger.client_history`.

    Versions are ``(trajectory, version)`` pairs; version ``v`` is the global
    model after round ``v`` (version 0, the initial model, contains nobody and
    is never listed).
    """

    client: str
    participated: list[tuple[int, int]]
    """Rounds whose ledger entry lists the client: ``(trajectory, round)``."""
    contained: list[tuple[int, int]]
    """Every model version the ledger knows of that contains the client's contribution."""
    not_contained: list[tuple[int, int]]
    """Every other model version the ledger knows of (never had it, or it was removed)."""
    removed_by: list[dict]
    """The unlearning entries naming the client: their body plus ``index`` and ``timestamp``."""
    clean_versions: list[tuple[int, int]]
    """``(trajectory, from_version)`` per unlearning that removed the client: that trajectory's
    versions from ``from_version`` on were produced without it (unless the client took part
    again later, in which case those later versions are in ``contained``)."""
    withdrawal_requests: list[dict] = field(default_factory=list)
    """The client's withdrawal-request entries (body plus ``index`` and ``timestamp``)."""
    keys_destroyed: list[dict] = field(default_factory=list)
    """Key destructions of the client: key-destroyed entries, and unlearnings with ``key_destroyed``."""

    def contains(self, trajectory: int, version: int) -> bool | None:
        """True / False for a version the ledger knows of, None for one it does not."""
        if (trajectory, version) in self.contained:
            return True
        if (trajectory, version) in self.not_contained:
            return False
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "participated": [list(v) for v in self.participated],
            "contained": [list(v) for v in self.contained],
            "not_contained": [list(v) for v in self.not_contained],
            "removed_by": self.removed_by,
            "clean_versions": [list(v) for v in self.clean_versions],
            "withdrawal_requests": self.withdrawal_requests,
            "keys_destroyed": self.keys_destroyed,
        }


@dataclass
class _Fork:
    index: int
    trajectory: int
    source: int
    base: int | None  # as recorded
    unlearned: int  # version of the new trajectory holding the unlearned model (round - 1)
    clients: frozenset[str]


def _with_position(entry: LedgerEntry) -> dict[str, Any]:
    return {"index": entry.index, "timestamp": entry.timestamp, **entry.body}


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """Append-only JSON-lines file (one canonical-JSON entry per line); each entry holds the hash of the one before (genesis: 64 zeros).

    Make one with :meth:`open`; close it (or use ``with``) when done.
    """

    path: Path
    readonly: bool

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use Ledger.open(path)")

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Ledger:
        """Open the ledger at ``path``, creating it (and its parent directories) if missing.

        ``readonly=True`` (auditing) never creates or writes: a missing file is a
        ``LedgerError`` and :meth:`append` is refused.

        Opening checks the end of the file cheaply, not the whole chain: that
        the file ends with a complete line, and that the last two entries are
        intact and linked. If that fails it runs the full check so the error
        names the *first* broken entry (``LedgerBrokenError``). Call
        :meth:`verify` for the full check of a ledger that opens fine.
        """
        path = Path(path)
        if readonly:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise LedgerError(f"no ledger at {path}") from None
            except OSError as exc:
                raise LedgerError(f"cannot read the ledger {path}: {exc.strerror or exc}") from None
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                existed = path.exists()
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise LedgerError(f"cannot open the ledger {path} for appending: {exc.strerror or exc}") from None
            if not existed:
                fsync_dir(path.parent)
        self = object.__new__(cls)
        self.path = path
        self.readonly = readonly
        self._fd: int | None = fd
        try:
            if os.path.isdir(path):
                raise LedgerError(f"the ledger path {path} is a directory")
            self._check_tail()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, {'open' if self._fd is not None else 'closed'})"

    def _fileno(self) -> int:
        if self._fd is None:
            raise LedgerError(f"ledger {self.path} is closed")
        return self._fd

    # ------------------------------------------------------------------ reading

    def _snapshot_size(self) -> int:
        """File size at a moment no append is in progress (appends hold LOCK_EX until synced)."""
        fd = self._fileno()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            return os.fstat(fd).st_size
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _scan(self, limit: int) -> Iterator[LedgerEntry]:
        """Entries in the first ``limit`` bytes, each checked against the one before; raises at the first break."""
        previous = GENESIS_HASH
        position = 0
        offset = 0
        with open(self.path, "rb") as handle:
            while offset < limit:
                line = handle.readline(limit - offset)
                if not line:  # the file shrank under us
                    raise LedgerBrokenError(
                        self.path, position, None, "unparseable", "the file ended early (truncated while being read)"
                    )
                offset += len(line)
                try:
                    entry = _decode(line)
                except _Defect as defect:
                    raise LedgerBrokenError(self.path, position, defect.kind, defect.reason, defect.detail) from None
                if entry.index != position:
                    raise LedgerBrokenError(
                        self.path,
                        position,
                        entry.kind,
                        "bad sequence",
                        f"the line at position {position} holds entry index {entry.index}: "
                        "entries were deleted, inserted or reordered",
                    )
                if entry.previous_hash != previous:
                    before = "the genesis hash (64 zeros)" if position == 0 else f"entry {position - 1}'s hash {previous[:16]}…"
                    raise LedgerBrokenError(
                        self.path,
                        position,
                        entry.kind,
                        "bad link",
                        f"its previous_hash {entry.previous_hash[:16]}… is not {before}",
                    )
                yield entry
                previous = entry.entry_hash
                position += 1

    def entries(self) -> Iterator[LedgerEntry]:
        """Every entry in order, streamed and checked as it goes (raises ``LedgerBrokenError`` at the first break).

        Covers the entries present when ``entries()`` is called; later appends are not included.
        """
        limit = self._snapshot_size()
        return self._scan(limit)

    def _chain(self, anchor: tuple[int, str] | None = None) -> tuple[int, str]:
        count, last = 0, GENESIS_HASH
        anchor_hash = None
        if anchor is not None:
            count_at, hash_at = anchor
            if not _is_int(count_at) or count_at < 1 or not isinstance(hash_at, str) or not _HEX64.fullmatch(hash_at):
                raise ValueError(f"anchor must be (entry count >= 1, 64-hex last entry hash), got {anchor!r}")
        for entry in self.entries():
            count, last = count + 1, entry.entry_hash
            if anchor is not None and entry.index == anchor[0] - 1:
                anchor_hash = entry.entry_hash
                if anchor_hash != anchor[1]:
                    raise LedgerBrokenError(
                        self.path,
                        entry.index,
                        entry.kind,
                        "anchor mismatch",
                        f"the anchor says entry {entry.index} hashes to {anchor[1][:16]}… but it hashes to "
                        f"{anchor_hash[:16]}…: the ledger was rewritten",
                    )
        if anchor is not None and anchor_hash is None:
            raise LedgerBrokenError(
                self.path,
                count,
                None,
                "missing entries",
                f"the ledger has {count} entries but the anchor says it had at least {anchor[0]}: "
                "entries were removed from its end",
            )
        return count, last

    def verify(self, anchor: tuple[int, str] | None = None) -> int:
        """Check the whole chain; return the number of entries.

        Raises ``LedgerBrokenError`` naming the first broken entry. With
        ``anchor=(count, hash)`` (an earlier :meth:`head`) also checks that the
        ledger still has at least ``count`` entries and that entry ``count - 1``
        still hashes to ``hash``, which detects entries removed from the end.
        """
        return self._chain(anchor)[0]

    def head(self, anchor: tuple[int, str] | None = None) -> tuple[int, str]:
        """``(entry count, last entry hash)`` after a full check (as :meth:`verify`, ``anchor`` included).

        The hash is the genesis hash when the ledger is empty. Keep it somewhere
        the ledger's writer cannot rewrite, to pass as ``anchor`` later.
        """
        return self._chain(anchor)

    def _first_break(self, limit: int) -> LedgerBrokenError:
        try:
            for _ in self._scan(limit):
                pass
        except LedgerBrokenError as exc:
            return exc
        return LedgerBrokenError(
            self.path, 0, None, "unparseable", "the end of the file is inconsistent (changed while being checked?)"
        )

    def _check_tail(self) -> None:
        """The cheap check done by open(): a complete last line, and the last two entries intact and linked."""
        fd = self._fileno()
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return
            lines, torn = _tail(fd, size, 2)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            if torn or not lines:
                raise _Defect("", "")
            entries = [_decode(line) for line in lines]
            last = entries[-1]
            if len(entries) == 2:
                if last.index != entries[0].index + 1 or last.previous_hash != entries[0].entry_hash:
                    raise _Defect("", "")
            elif last.index != 0 or last.previous_hash != GENESIS_HASH:
                raise _Defect("", "")
        except _Defect:
            raise self._first_break(size) from None

    # ------------------------------------------------------------------ writing

    def append(self, kind: str, body: dict) -> LedgerEntry:
        """Append one entry; returns it once it is durable (written and fsynced).

        ``kind`` must match ``[a-z-]+``; the known kinds (``round``,
        ``withdrawal-request``, ``unlearning``, ``key-destroyed``) have their
        bodies checked as the ``record_*`` methods build them (extra fields are
        allowed). ``body`` must be JSON-serialisable: a ``ValueError`` otherwise
        (numpy scalars are converted, tuples become lists, NaN is refused).
        """
        if self.readonly:
            raise LedgerError(f"ledger {self.path} was opened read-only")
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"entry kind must match [a-z-]+, got {kind!r}")
        if not isinstance(body, Mapping):
            raise ValueError(f"entry body must be a dict, got {type(body).__name__}")
        clean = _json_value(body, "body")
        _validate_body(kind, clean)
        fd = self._fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                index, previous = 0, GENESIS_HASH
            else:
                lines, torn = _tail(fd, size, 1)
                try:
                    if torn or not lines:
                        raise _Defect("", "")
                    last = _decode(lines[-1])
                except _Defect:
                    raise self._first_break(size) from None
                index, previous = last.index + 1, last.entry_hash
            timestamp = _now()
            entry = LedgerEntry(index, kind, timestamp, clean, previous, _entry_hash(index, kind, timestamp, clean, previous))
            try:
                write_and_sync(fd, entry.line())
            except BaseException:
                try:  # do not leave half a line behind
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                except OSError:
                    pass
                raise
            return entry
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def record_round(self, *, trajectory: int, round: int, model_hash: str, participants: list[dict]) -> LedgerEntry:
        """A committed round: global model version ``round`` of ``trajectory`` and who contributed to it.

        ``participants``: ``[{"client": id, "num_examples": n, "update_hash": sha256 hex or None}]``
        (``update_hash`` None when the update was not retained or not hashed).
        """
        rows = []
        for i, p in enumerate(participants):
            if not isinstance(p, Mapping):
                raise ValueError(f"participants[{i}] must be a dict, got {type(p).__name__}")
            rows.append({**p, "update_hash": p.get("update_hash")})
        return self.append(
            "round", {"trajectory": trajectory, "round": round, "model_hash": model_hash, "participants": rows}
        )

    def record_withdrawal_request(self, *, request_id: str, client: str, request_hash: str) -> LedgerEntry:
        """A client's withdrawal request was received; ``request_hash`` is the sha256 hex of the request document."""
        return self.append(
            "withdrawal-request", {"request_id": request_id, "client": client, "request_hash": request_hash}
        )

    def record_unlearning(
        self,
        *,
        clients: list[str],
        strategy: str,
        hyperparameters: dict,
        seed: int,
        round: int,
        model_hash_before: str,
        model_hash_after: str,
        source_trajectory: int,
        trajectory: int,
        evidence: dict | None,
        key_destroyed: bool,
        base_version: int | None = None,
        initiated_by: Mapping[str, str] | None = None,
        reasons: Mapping[str, str] | None = None,
    ) -> LedgerEntry:
        """An unlearning removed ``clients`` before ``round`` (the first round trained without them).

        The history forked from ``source_trajectory`` into the new ``trajectory``.
        ``model_hash_before`` is the source's version ``round - 1`` (the model that
        held the contributions), ``model_hash_after`` the new trajectory's version
        ``round - 1`` (the unlearned model training continues from). Pass
        ``base_version`` (the version the fork shares with the source, e.g. 0 for
        a retrain from scratch): without it, :meth:`client_history` must assume
        conservatively that the new trajectory shares every version before
        ``round - 1`` that it has no round entry for. ``initiated_by`` says per
        client who asked (``client``: its signed request; ``operator``: the
        federation's operator, with the reason in ``reasons``).
        """
        origin: dict[str, Any] = {}
        if initiated_by is not None:
            origin["initiated_by"] = dict(initiated_by)
        if reasons:
            origin["reasons"] = dict(reasons)
        return self.append(
            "unlearning",
            {
                **origin,
                "clients": list(clients),
                "strategy": strategy,
                "hyperparameters": hyperparameters,
                "seed": seed,
                "round": round,
                "model_hash_before": model_hash_before,
                "model_hash_after": model_hash_after,
                "source_trajectory": source_trajectory,
                "trajectory": trajectory,
                "base_version": base_version,
                "evidence": evidence,
                "key_destroyed": key_destroyed,
            },
        )

    def record_key_destroyed(self, *, client: str, **details: Any) -> LedgerEntry:
        """A client's data key was destroyed (its stored updates crypto-shredded); ``details`` are kept as given."""
        return self.append("key-destroyed", {**details, "client": client})

    @classmethod
    def repair(cls, path: Path) -> LedgerEntry | None:
        """Drop an incomplete last line (a crash mid-append) and record that in the ledger.

        Only that case is repaired, and only when every complete entry before it
        verifies; any other damage raises ``LedgerBrokenError`` untouched. The
        dropped bytes' length and sha256 go into a ``ledger-repair`` entry, so the
        repair is itself on the record. Returns that entry, or None when the file
        ends with a complete line (nothing to repair).
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LedgerError(f"no ledger at {path}") from None
        self = object.__new__(cls)
        self.path, self.readonly, self._fd = path, False, fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                _, torn = _tail(fd, size, 1) if size else ([], b"")
                if not torn:
                    return None
                keep = size - len(torn)
                for _ in self._scan(keep):
                    pass
                os.ftruncate(fd, keep)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return self.append(
                "ledger-repair",
                {
                    "reason": "incomplete last line (an append was interrupted)",
                    "dropped_bytes": len(torn),
                    "dropped_sha256": hashlib.sha256(torn).hexdigest(),
                },
            )
        finally:
            self.close()

    # ------------------------------------------------------------------ auditing

    def client_history(self, client: str) -> ClientAudit:
        """Which model versions contain ``client``'s contribution, and which no longer do.

        Reads (and so verifies) the whole chain. The rules, per trajectory ``T``:

        * A round entry of ``T`` listing the client makes that version and every
          later version of ``T`` contain it.
        * A trajectory created by an unlearning (from source ``P``, sharing
          versions ``0..b`` with it, unlearned model at version ``u = round - 1``)
          shares ``P``'s versions ``1..b`` and so contains the client where ``P``
          does. Its versions after ``b`` were produced by the unlearning from
          ``P``'s history: without the client if the unlearning removed it;
          otherwise they are counted as containing it whenever ``P``'s version
          ``u`` does (conservative: derived from a model that held it).
          If ``u == b`` (nothing new was produced) the fork continues ``P``'s version ``b``.
        * ``b`` is the recorded ``base_version``; when it was not recorded, the
          version before the new trajectory's first round entry, but at most
          ``u - 1`` (conservative: assume shared what the ledger cannot show was rebuilt).
        * A trajectory no unlearning entry created is a root: only its own
          round entries count.

        Known versions are those with a round entry, the versions ``1..u`` of
        each unlearning's source and new trajectory, and shared versions. The
        ledger must be complete since the federation started for the answer
        to be complete.
        """
        if not isinstance(client, str) or not client:
            raise ValueError(f"client must be a non-empty string, got {client!r}")
        logged: dict[int, set[int]] = defaultdict(set)
        first_direct: dict[int, int] = {}
        participated: list[tuple[int, int]] = []
        forks: dict[int, _Fork] = {}
        source_versions: dict[int, int] = defaultdict(int)
        removed_by: list[dict] = []
        removing: list[_Fork] = []
        requests: list[dict] = []
        destroyed: list[dict] = []
        for entry in self.entries():
            if entry.kind not in ("round", "unlearning", "withdrawal-request", "key-destroyed"):
                continue
            body = entry.body
            try:
                _validate_body(entry.kind, body)
            except ValueError as exc:
                raise LedgerError(f"ledger {self.path} entry {entry.index} ({entry.kind}) is malformed: {exc}") from None
            if entry.kind == "round":
                traj, rnd = body["trajectory"], body["round"]
                logged[traj].add(rnd)
                if any(p["client"] == client for p in body["participants"]):
                    participated.append((traj, rnd))
                    first_direct[traj] = min(first_direct.get(traj, rnd), rnd)
            elif entry.kind == "unlearning":
                traj = body["trajectory"]
                if traj in forks:
                    raise LedgerError(
                        f"ledger {self.path}: entries {forks[traj].index} and {entry.index} both record an "
                        f"unlearning that created trajectory {traj}"
                    )
                fork = _Fork(
                    entry.index,
                    traj,
                    body["source_trajectory"],
                    body.get("base_version"),
                    body["round"] - 1,
                    frozenset(body["clients"]),
                )
                forks[traj] = fork
                source_versions[fork.source] = max(source_versions[fork.source], fork.unlearned)
                if client in fork.clients:
                    removed_by.append(_with_position(entry))
                    removing.append(fork)
                    if body["key_destroyed"]:
                        destroyed.append({"kind": entry.kind, **_with_position(entry)})
            elif body["client"] == client:
                if entry.kind == "withdrawal-request":
                    requests.append(_with_position(entry))
                else:
                    destroyed.append({"kind": entry.kind, **_with_position(entry)})

        base: dict[int, int] = {}
        for traj, fork in forks.items():
            b = fork.base
            if b is None:
                b = fork.unlearned - 1
                if logged[traj]:
                    b = min(b, min(logged[traj]) - 1)
            base[traj] = max(0, min(b, fork.unlearned))

        memo: dict[tuple[int, int], bool] = {}

        def contains(traj: int, version: int) -> bool:
            if version <= 0:
                return False
            key = (traj, version)
            if key not in memo:
                first = first_direct.get(traj)
                result = first is not None and first <= version
                fork = forks.get(traj)
                if not result and fork is not None:  # fork.source < traj: the recursion ends
                    b = base[traj]
                    if version <= b:
                        result = contains(fork.source, version)
                    elif fork.unlearned == b:
                        result = contains(fork.source, b)
                    else:
                        result = client not in fork.clients and contains(fork.source, fork.unlearned)
                memo[key] = result
            return memo[key]

        known: dict[int, set[int]] = defaultdict(set)
        for traj, rounds in logged.items():
            known[traj] |= rounds
        for traj, fork in forks.items():
            known[traj] |= set(range(1, fork.unlearned + 1))
        for traj, top in source_versions.items():
            known[traj] |= set(range(1, top + 1))
        contained, not_contained = [], []
        for traj in sorted(known):
            for version in sorted(known[traj]):
                (contained if contains(traj, version) else not_contained).append((traj, version))
        clean = []
        for fork in removing:
            start = base[fork.trajectory] + 1
            if not contains(fork.trajectory, start):
                clean.append((fork.trajectory, start))
        return ClientAudit(
            client=client,
            participated=participated,
            contained=contained,
            not_contained=not_contained,
            removed_by=removed_by,
            clean_versions=clean,
            withdrawal_requests=requests,
            keys_destroyed=destroyed,
        )

    def verify_against_store(self, store: Any) -> int:
        """Check every model hash in the ledger against the history store; return how many were compared.

        ``store`` is an open ``HistoryStore``. A round entry's ``model_hash`` must
        be the hash of ``store.reader(trajectory).model(round)``; an unlearning's
        ``model_hash_before`` / ``model_hash_after`` that of version ``round - 1``
        of its source / new trajectory. Raises ``LedgerStoreMismatchError`` at the
        first entry (in ledger order) that does not match or whose model the store
        cannot produce, and ``LedgerBrokenError`` if the chain itself is broken.
        Loads one model at a time.
        """
        cache: dict[tuple[int, int], str] = {}
        checked = 0

        def compare(entry: LedgerEntry, what: str, traj: int, version: int, recorded: str) -> None:
            nonlocal checked
            key = (traj, version)
            if key not in cache:
                try:
                    cache[key] = model_hash(store.reader(traj).model(version))
                except FedforgetError as exc:
                    raise LedgerStoreMismatchError(
                        entry.index,
                        entry.kind,
                        f"{what} is model version {version} of trajectory {traj}, which the history store "
                        f"cannot provide: {exc}",
                    ) from None
            if cache[key] != recorded:
                raise LedgerStoreMismatchError(
                    entry.index,
                    entry.kind,
                    f"{what} {recorded[:16]}… does not match the history store's model version {version} of "
                    f"trajectory {traj}, which hashes to {cache[key][:16]}…",
                )
            checked += 1

        for entry in self.entries():
            if entry.kind not in ("round", "unlearning"):
                continue
            try:
                _validate_body(entry.kind, entry.body)
            except ValueError as exc:
                raise LedgerError(f"ledger {self.path} entry {entry.index} ({entry.kind}) is malformed: {exc}") from None
            body = entry.body
            if entry.kind == "round":
                compare(entry, "its model_hash", body["trajectory"], body["round"], body["model_hash"])
            else:
                version = body["round"] - 1
                compare(entry, "its model_hash_before", body["source_trajectory"], version, body["model_hash_before"])
                compare(entry, "its model_hash_after", body["trajectory"], version, body["model_hash_after"])
        return checked
