"""The audit ledger: an append-only record of what the federation did, hash-chained and Merkle-hashed.

Why it exists: regulators and clients ask "which model versions contain our
data?" and "prove you removed it". The history store answers the first for the
server itself, but it is mutable (forks, crypto-shredding) and opaque; the
ledger is the account that can be handed to an auditor. Every round (model
hash, contributing clients, sample counts, weights, update hashes, blobs),
every withdrawal request (its hash), every unlearning (strategy,
hyperparameters, seed, model hash before and after, evidence), every key
destruction and every shredding of old models is one entry (format:
:mod:`~fedforget.server.ledger.entries`).

Two structures cover the same lines. The hash chain (each entry holds the hash
of the one before) names the first entry that was edited, reordered or cut
short. The Merkle tree of RFC 9162 over the lines (:mod:`fedforget.merkle`) is
what the federation signs (:mod:`~fedforget.server.ledger.heads`): a chain can
be deleted from and re-chained by anyone, a signed tree head cannot be made
without the federation's key, and a consistency proof shows whether today's
ledger still contains exactly the entries an earlier head covered.

Writers: appends take ``fcntl.flock(LOCK_EX)`` on the file, re-read its last
entry under the lock, and write + fsync the new line before releasing it, so
appends from several processes (or several ``Ledger`` handles) never
interleave and each links to the one actually before it. Readers snapshot the
file size under a shared lock (taken and released at once), so they never see
half an append in progress; a line left incomplete by a crash is reported,
never skipped (see :meth:`Ledger.repair`). A ``Ledger`` handle is not thread-safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fedforget import merkle
from fedforget.files import fsync_dir, write_and_sync
from fedforget.merkle import leaf_hash
from fedforget.server.ledger.entries import (
    GENESIS_HASH,
    HEX64,
    Defect,
    LedgerBrokenError,
    LedgerEntry,
    LedgerError,
    check_kind,
    decode_line,
    is_int,
    json_value,
    make_entry,
    validate_body,
)

__all__ = ["Ledger", "LogSnapshot"]

_TAIL_BLOCK = 64 * 1024


@dataclass(frozen=True)
class LogSnapshot:
    """The verified entries of a ledger at one moment, with their Merkle leaves (RFC 9162)."""

    path: Path
    entries: list[LedgerEntry]
    leaves: list[bytes]

    @property
    def size(self) -> int:
        return len(self.entries)

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of the first ``size`` entries (default: all)."""
        return merkle.root(self.leaves[: self.size if size is None else size])

    def last_entry_hash(self, size: int | None = None) -> str:
        """The chain hash of entry ``size - 1`` (the genesis hash for 0 entries)."""
        size = self.size if size is None else size
        return GENESIS_HASH if size == 0 else self.entries[size - 1].entry_hash

    def prefix_roots(self) -> list[bytes]:
        """``[root(0), root(1), ..., root(size)]``, computed in one pass."""
        roots, tree = [merkle.EMPTY_ROOT], merkle.PrefixRoots()
        for leaf in self.leaves:
            roots.append(tree.append(leaf))
        return roots

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return merkle.inclusion_proof(self.leaves, index, self.size if size is None else size)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        return merkle.consistency_proof(self.leaves, first, self.size if second is None else second)


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

    @contextlib.contextmanager
    def _quiet(self, fd: int) -> Iterator[None]:
        """Wait out an append in progress (appends hold LOCK_EX until synced); an audit takes no lock at all.

        A read-only audit must not change or hold anything of what it audits, so
        it reads the file as it is: audit a copy, or a ledger no run is writing.
        """
        if self.readonly:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _snapshot_size(self) -> int:
        """File size at a moment no append is in progress."""
        fd = self._fileno()
        with self._quiet(fd):
            return os.fstat(fd).st_size

    def _scan(self, limit: int) -> Iterator[tuple[LedgerEntry, bytes]]:
        """Entries (and their lines) in the first ``limit`` bytes, each checked against the one before; raises at the first break."""
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
                    entry = decode_line(line)
                except Defect as defect:
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
                yield entry, line
                previous = entry.entry_hash
                position += 1

    def entries(self) -> Iterator[LedgerEntry]:
        """Every entry in order, streamed and checked as it goes (raises ``LedgerBrokenError`` at the first break).

        Covers the entries present when ``entries()`` is called; later appends are not included.
        """
        return (entry for entry, _ in self._scan(self._snapshot_size()))

    def snapshot(self) -> LogSnapshot:
        """Every entry and its Merkle leaf hash, after a full check of the chain (``LedgerBrokenError`` otherwise)."""
        entries, leaves = [], []
        for entry, line in self._scan(self._snapshot_size()):
            entries.append(entry)
            leaves.append(leaf_hash(line[:-1]))
        return LogSnapshot(self.path, entries, leaves)

    def _chain(self, anchor: tuple[int, str] | None = None) -> tuple[int, str]:
        count, last = 0, GENESIS_HASH
        anchor_hash = None
        if anchor is not None:
            count_at, hash_at = anchor
            if not is_int(count_at) or count_at < 1 or not isinstance(hash_at, str) or not HEX64.fullmatch(hash_at):
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
        with self._quiet(fd):
            size = os.fstat(fd).st_size
            if size == 0:
                return
            lines, torn = _tail(fd, size, 2)
        try:
            if torn or not lines:
                raise Defect("", "")
            entries = [decode_line(line) for line in lines]
            last = entries[-1]
            if len(entries) == 2:
                if last.index != entries[0].index + 1 or last.previous_hash != entries[0].entry_hash:
                    raise Defect("", "")
            elif last.index != 0 or last.previous_hash != GENESIS_HASH:
                raise Defect("", "")
        except Defect:
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
        check_kind(kind)
        if not isinstance(body, Mapping):
            raise ValueError(f"entry body must be a dict, got {type(body).__name__}")
        clean = json_value(body, "body")
        validate_body(kind, clean)
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
                        raise Defect("", "")
                    last = decode_line(lines[-1])
                except Defect:
                    raise self._first_break(size) from None
                index, previous = last.index + 1, last.entry_hash
            entry = make_entry(index, kind, clean, previous)
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

    def record_round(
        self, *, trajectory: int, round: int, model_hash: str, participants: list[dict], model_blob: str | None = None
    ) -> LedgerEntry:
        """A committed round: global model version ``round`` of ``trajectory`` and who contributed to it.

        ``participants``: ``[{"client": id, "num_examples": n, "update_hash": sha256 hex or None,
        "weight": w, "blob": blob id or None}]`` (``update_hash`` None when unknown); ``model_blob``
        is the blob holding the model in the history store. An audit checks the store against all of it.
        """
        rows = []
        for i, p in enumerate(participants):
            if not isinstance(p, Mapping):
                raise ValueError(f"participants[{i}] must be a dict, got {type(p).__name__}")
            rows.append({**p, "update_hash": p.get("update_hash")})
        body: dict[str, Any] = {"trajectory": trajectory, "round": round, "model_hash": model_hash, "participants": rows}
        if model_blob is not None:
            body["model_blob"] = model_blob
        return self.append("round", body)

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
        shard: Mapping[str, object] | None = None,
        privacy: Mapping[str, Any] | None = None,
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
        federation's operator, with the reason in ``reasons``). ``shard``
        (index, count, clients) names the shard of a sharded federation this
        ledger is, so the entry, and every certificate quoting it, says that
        only that shard's model changed. ``privacy``: the DP the history was
        trained under and the ε each withdrawn client spent
        (:func:`fedforget.server.rounds.privacy_accounting.withdrawn_privacy`).
        """
        origin: dict[str, Any] = {}
        if privacy is not None:
            origin["privacy"] = dict(privacy)
        if initiated_by is not None:
            origin["initiated_by"] = dict(initiated_by)
        if reasons:
            origin["reasons"] = dict(reasons)
        if shard is not None:
            origin["shard"] = dict(shard)
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
        """A client's data key was destroyed (its stored updates crypto-shredded); ``details`` are kept as given.

        ``key_ids`` (the store's ids of the keys destroyed) lets an audit match the
        entry with the store's record of destroyed keys, both ways.
        """
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

