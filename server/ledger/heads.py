"""Signed tree heads of the ledger: signing them, keeping them, and checkpoints to hand out.

The server signs a head (:class:`fedforget.tree_head.SignedTreeHead`) after
every round and every unlearning and appends it to the *heads file* beside the
ledger (``ledger.jsonl`` -> ``ledger-heads.jsonl``, one canonical JSON object
per line). Before signing, it checks the ledger against the last head it
signed: a ledger edited between two heads is never signed over, so a new
head can only vouch for a ledger that extends every earlier one.

A *checkpoint* is one signed head saved to a file of its own (``fedforget
audit checkpoint``), to be kept by someone other than the operator: it is
what later shows that the ledger was not rewritten or truncated.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedforget import merkle
from fedforget.files import fsync_dir, read_at_most, write_and_sync, write_bytes_atomic
from fedforget.identity import fingerprint, load_private_key, sign_document
from fedforget.server.ledger.entries import LedgerError
from fedforget.server.ledger.log import Ledger, LogSnapshot
from fedforget.tree_head import SignedTreeHead, TreeHead, TreeHeadError, ledger_json

__all__ = ["HeadRecord", "HeadsFile", "heads_path", "read_checkpoint", "read_heads", "sign_head", "sign_latest", "sign_ledger", "write_checkpoint"]

_MAX_CHECKPOINT_BYTES = 64 * 1024
_TAIL_BYTES = 64 * 1024


def heads_path(ledger_path: Path) -> Path:
    """Where the signed heads of ``ledger_path`` are kept: ``ledger.jsonl`` -> ``ledger-heads.jsonl``."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(f"{ledger_path.stem}-heads{ledger_path.suffix or '.jsonl'}")


def sign_head(private_key: ec.EllipticCurvePrivateKey, federation_id: str, snapshot: LogSnapshot) -> SignedTreeHead:
    """Sign the head of ``snapshot`` (every entry in it) with the federation's key."""
    head = TreeHead(
        federation_id=federation_id,
        tree_size=snapshot.size,
        root_hash=snapshot.root().hex(),
        last_entry_hash=snapshot.last_entry_hash(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        signer=fingerprint(private_key),
    )
    return SignedTreeHead(head=head, signature=sign_document(private_key, head.to_dict()))


def check_extends(snapshot: LogSnapshot, head: TreeHead, what: str) -> None:
    """Raise :class:`LedgerError` unless the ledger's first ``head.tree_size`` entries are exactly what ``head`` signed."""
    if head.tree_size > snapshot.size:
        raise LedgerError(
            f"{what} covers {head.tree_size} entries but the ledger {snapshot.path} has {snapshot.size}: "
            f"entries {snapshot.size}..{head.tree_size - 1} were removed from its end"
        )
    if snapshot.root(head.tree_size) != head.root or snapshot.last_entry_hash(head.tree_size) != head.last_entry_hash:
        raise LedgerError(
            f"the first {head.tree_size} entries of the ledger {snapshot.path} no longer hash to the root {what} "
            "signed: an entry among them was changed, deleted or inserted (the chain may have been re-linked)"
        )
    proof = snapshot.consistency_proof(head.tree_size)
    if not merkle.verify_consistency(head.tree_size, snapshot.size, head.root, snapshot.root(), proof):
        raise LedgerError(f"the ledger {snapshot.path} is not an extension of {what}")


@dataclass(frozen=True)
class HeadRecord:
    """One line of the heads file: its number (from 1) and the head, or why it cannot be read."""

    line: int
    head: SignedTreeHead | None
    problem: str | None


def read_heads(path: Path) -> list[HeadRecord]:
    """Every line of a heads file, parsed (not verified); a missing file has none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LedgerError(f"cannot read the heads file {path}: {exc.strerror or exc}") from exc
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        try:
            head = SignedTreeHead.from_dict(json.loads(line))
            if ledger_json(head.to_dict()).encode("ascii") != line:
                raise TreeHeadError("the line is not in canonical JSON form (edited by hand)")
            records.append(HeadRecord(number, head, None))
        except (ValueError, TreeHeadError) as exc:
            records.append(HeadRecord(number, None, str(exc)))
    if data and not data.endswith(b"\n"):
        records[-1] = HeadRecord(records[-1].line, None, "incomplete last line (an append was interrupted?)")
    return records


class HeadsFile:
    """The append-only file of signed heads beside a ledger."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = heads_path(ledger_path)

    def latest(self) -> SignedTreeHead | None:
        """The last well-formed head in the file (not verified), or None. Reads only the file's end."""
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - _TAIL_BYTES))
                tail = handle.read()
        except FileNotFoundError:
            return None
        lines = tail.split(b"\n")[:-1]  # complete lines only
        if size > _TAIL_BYTES:
            lines = lines[1:]  # the first may start mid-line
        for line in reversed(lines):
            try:
                return SignedTreeHead.from_dict(json.loads(line))
            except (ValueError, TreeHeadError):
                continue
        return None if size <= _TAIL_BYTES else next((r.head for r in reversed(read_heads(self.path)) if r.head), None)

    def append(self, signed: SignedTreeHead) -> None:
        """Append one head durably (under an exclusive lock, like ledger appends).

        A line a crash left incomplete is dropped first: it is a signature that
        was never finished, and the head it would have held is signed again.
        """
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
                cut = tail.rfind(b"\n")
                os.ftruncate(fd, max(0, size - len(tail)) + cut + 1 if cut >= 0 else max(0, size - len(tail)))
            write_and_sync(fd, (ledger_json(signed.to_dict()) + "\n").encode("ascii"))
        finally:
            os.close(fd)
        if not existed:
            fsync_dir(self.path.parent)


def sign_ledger(
    ledger: Ledger,
    private_key: ec.EllipticCurvePrivateKey,
    federation_id: str,
    heads: HeadsFile,
    last_signed: SignedTreeHead | None = None,
) -> SignedTreeHead:
    """Sign the head of the whole ledger and keep it, after checking it extends the heads signed before.

    The last head of the heads file and ``last_signed`` (the last head this
    process signed, which an edit of the heads file cannot take away) must
    verify under ``private_key`` and be extended by the ledger as it is now;
    otherwise :class:`LedgerError`, and nothing is signed: a head over an edited
    ledger would vouch for the edit. Returns the head covering every entry
    (an existing one if it already does).
    """
    snapshot = ledger.snapshot()
    public = private_key.public_key()
    for known, what in ((heads.latest(), f"the last head in {heads.path}"), (last_signed, "the last head signed by this server")):
        if known is None:
            continue
        try:
            known.verify(public)
            check_extends(snapshot, known.head, what)
        except (TreeHeadError, LedgerError) as exc:
            raise LedgerError(
                f"refusing to sign the ledger {ledger.path}: {exc}. Run `fedforget audit verify` to see what changed."
            ) from None
    for known in (last_signed, heads.latest()):
        if known is not None and known.head.tree_size == snapshot.size:
            return known
    signed = sign_head(private_key, federation_id, snapshot)
    heads.append(signed)
    return signed


def sign_latest(ledger_path: Path, signing_key: Path) -> SignedTreeHead:
    """Sign the whole ledger with the federation's key file (``audit repair --signing-key``).

    The federation id is the one of the last head in the heads file.
    """
    key = load_private_key(signing_key)
    heads = HeadsFile(ledger_path)
    latest = heads.latest()
    if latest is None:
        raise LedgerError(f"{heads.path} holds no signed head to take the federation id from")
    with Ledger.open(ledger_path) as ledger:
        return sign_ledger(ledger, key, latest.head.federation_id, heads)


def write_checkpoint(path: Path, signed: SignedTreeHead) -> None:
    """Save one signed head as a checkpoint file (indented JSON), atomically."""
    write_bytes_atomic(Path(path), (json.dumps(signed.to_dict(), indent=2) + "\n").encode("ascii"))


def read_checkpoint(path: Path) -> SignedTreeHead:
    """A checkpoint saved by :func:`write_checkpoint`; :class:`LedgerError` naming the file otherwise."""
    data = read_at_most(Path(path), _MAX_CHECKPOINT_BYTES, "checkpoint", LedgerError)
    try:
        return SignedTreeHead.from_dict(json.loads(data))
    except (ValueError, TreeHeadError) as exc:
        raise LedgerError(f"{path} is not a ledger checkpoint: {exc}") from None
