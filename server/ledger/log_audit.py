"""Auditing the ledger itself: its chain, the heads the federation signed, and heads held by others.

What each check catches:

* the hash chain: an edited, reordered or truncated *line* (names the entry);
* every signed head in the heads file, verified under the federation's public
  key and against the Merkle root of the entries it covers: an entry deleted
  (or inserted) and the rest re-chained, anywhere before the last head;
* the last head must cover the whole ledger: entries appended by someone
  without the federation's key are not covered by any head;
* heads held elsewhere (checkpoints, certificates): the ledger must be an
  extension of each of them (an RFC 9162 consistency proof), which catches a
  ledger truncated, or rewritten and re-signed, after they were issued.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedforget import merkle
from fedforget.errors import FedforgetError
from fedforget.server.ledger.entries import LedgerError
from fedforget.server.ledger.findings import Findings
from fedforget.server.ledger.heads import heads_path, read_heads
from fedforget.server.ledger.log import Ledger, LogSnapshot
from fedforget.tree_head import SignedTreeHead, TreeHeadError

__all__ = ["ExternalHead", "audit_log"]


@dataclass(frozen=True)
class ExternalHead:
    """A signed head kept outside the ledger's directory, and where it came from (for messages)."""

    source: str
    head: SignedTreeHead


def audit_log(
    ledger_path: Path,
    public_key: ec.EllipticCurvePublicKey,
    findings: Findings,
    *,
    external: list[ExternalHead] = (),  # type: ignore[assignment]
    anchor: tuple[int, str] | None = None,
) -> LogSnapshot | None:
    """Check the ledger at ``ledger_path``; add what is wrong to ``findings``; return its entries if the chain holds."""
    where = str(ledger_path)
    try:
        with Ledger.open(ledger_path, readonly=True) as ledger:
            snapshot = ledger.snapshot()
    except (FedforgetError, OSError, ValueError) as exc:
        findings.error(where, str(exc))
        return None
    if anchor is not None:
        count, last_hash = anchor
        if count > snapshot.size:
            findings.error(where, f"missing entries: the anchor says the ledger had at least {count}, it has {snapshot.size}")
        elif snapshot.last_entry_hash(count) != last_hash:
            findings.error(where, f"anchor mismatch: entry {count - 1} no longer hashes to {last_hash[:16]}…")
    roots = snapshot.prefix_roots()
    covered = _check_heads(snapshot, roots, public_key, findings)
    if snapshot.size > covered:
        kinds = Counter(e.kind for e in snapshot.entries[covered:])
        findings.error(
            where,
            f"entries {covered}..{snapshot.size - 1} ({', '.join(f'{n} {k}' for k, n in kinds.items())}) are not "
            f"covered by any tree head signed with the federation's key: they were appended without it, or the "
            f"server stopped before signing (it signs at its next round; `fedforget audit repair --signing-key` "
            f"signs after a repair)",
        )
    for held in external:
        _check_external(snapshot, roots, held, public_key, findings)
    return snapshot


def _check_heads(snapshot: LogSnapshot, roots: list[bytes], key: ec.EllipticCurvePublicKey, findings: Findings) -> int:
    """Verify the heads file; return how many entries the heads that hold cover."""
    path = heads_path(snapshot.path)
    records = read_heads(path)
    if not records:
        if snapshot.size:
            findings.error(str(path), f"no signed tree head for the ledger's {snapshot.size} entries (file missing or empty)")
        return 0
    covered, last_good_size = 0, 0
    previous_size = 0
    federation: str | None = None
    for record in records:
        where = f"{path} line {record.line}"
        if record.head is None:
            if record is records[-1] and record.problem and record.problem.startswith("incomplete last line"):
                findings.warning(where, f"{record.problem}: a head whose signing a crash cut short (signed again at the next round)")
            else:
                findings.error(where, f"not a signed tree head: {record.problem}")
            continue
        head = record.head.head
        try:
            record.head.verify(key)
        except TreeHeadError as exc:
            findings.error(where, str(exc))
            continue
        federation = federation or head.federation_id
        if head.federation_id != federation:
            findings.error(where, f"the head is of federation {head.federation_id!r}, the heads before it of {federation!r}")
            continue
        if head.tree_size < previous_size:
            findings.error(where, f"the head covers {head.tree_size} entries, fewer than the head before it ({previous_size})")
        previous_size = head.tree_size
        problem = _mismatch(snapshot, roots, head.tree_size, head.root, head.last_entry_hash)
        if problem is not None:
            since = f" (the first {last_good_size} still match a head)" if last_good_size else ""
            findings.error(where, f"head signed at {head.timestamp}: {problem}{since}")
            continue
        last_good_size = head.tree_size
        covered = max(covered, head.tree_size)
    return covered


def _mismatch(snapshot: LogSnapshot, roots: list[bytes], size: int, root: bytes, last_hash: str) -> str | None:
    if size > snapshot.size:
        return (
            f"it covers {size} entries but the ledger has {snapshot.size}: entries {snapshot.size}..{size - 1} "
            "were removed from its end"
        )
    if roots[size] != root:
        return (
            f"the ledger's first {size} entries no longer hash to the signed Merkle root: an entry among them was "
            "changed, deleted or inserted (and the chain re-linked)"
        )
    if snapshot.last_entry_hash(size) != last_hash:
        return f"entry {size - 1} no longer has the chain hash the head signed"
    return None


def _check_external(
    snapshot: LogSnapshot, roots: list[bytes], held: ExternalHead, key: ec.EllipticCurvePublicKey, findings: Findings
) -> None:
    head = held.head.head
    try:
        held.head.verify(key)
    except TreeHeadError as exc:
        findings.error(held.source, str(exc))
        return
    if head.tree_size > snapshot.size:
        findings.error(
            held.source,
            f"its head (signed {head.timestamp}) covers {head.tree_size} entries but the ledger has only "
            f"{snapshot.size}: the ledger was truncated after it was issued",
        )
        return
    proof = snapshot.consistency_proof(head.tree_size)
    if not merkle.verify_consistency(head.tree_size, snapshot.size, head.root, roots[snapshot.size], proof):
        findings.error(
            held.source,
            f"the ledger is not an extension of its head (signed {head.timestamp}, {head.tree_size} entries): "
            f"the consistency proof fails, so entries among the first {head.tree_size} were changed, deleted or "
            "inserted since it was issued",
        )


def load_external(checkpoints: list[Path], certificates: list[Path], key: ec.EllipticCurvePublicKey, findings: Findings) -> list[ExternalHead]:
    """The heads in checkpoint files and certificates (a certificate is fully checked first, offline)."""
    from fedforget.client.certificate_check import CertificateCheckError, verify_certificate
    from fedforget.identity import public_key_openssh
    from fedforget.server.ledger.heads import read_checkpoint

    held: list[ExternalHead] = []
    for path in checkpoints:
        try:
            held.append(ExternalHead(f"checkpoint {path}", read_checkpoint(path)))
        except LedgerError as exc:
            findings.error(str(path), str(exc))
    for path in certificates:
        try:
            report = verify_certificate(path, public_key_openssh(key))
        except CertificateCheckError as exc:
            findings.error(str(path), str(exc))
            continue
        if not report.valid:
            findings.error(f"certificate {path}", f"invalid: {report.reason}")
            continue
        head = report.summary.get("ledger_head")
        if head is None:
            findings.warning(f"certificate {path}", "carries no signed tree head (issued before ledgers were signed)")
            continue
        held.append(ExternalHead(f"certificate {path}", SignedTreeHead.from_dict(head)))
    return held
