"""``fedforget audit verify`` as a function: the ledger, its signed heads, heads held elsewhere, and the store.

Read-only throughout: the ledger is opened for reading, the store through
:class:`~fedforget.server.store.inspection.StoreInspection` (a private copy of
its index, no lock), and nothing in either directory is created, changed or
deleted, so an audit can run on a read-only copy and never changes what it
audits. Every problem found is collected (not just the first) with where it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedforget.server.ledger.findings import Findings
from fedforget.server.ledger.heads import heads_path, read_heads
from fedforget.server.ledger.log_audit import audit_log, load_external
from fedforget.server.ledger.store_audit import audit_store
from fedforget.tree_head import SignedTreeHead, TreeHeadError

__all__ = ["AuditReport", "audit", "covering_head"]


@dataclass
class AuditReport:
    """What ``audit`` found, and how much it covered."""

    findings: Findings
    entries: int
    head: SignedTreeHead | None
    """The signed head covering the whole ledger, when there is one that verifies."""

    @property
    def ok(self) -> bool:
        return not self.findings.errors


def covering_head(ledger_path: Path, size: int, key: ec.EllipticCurvePublicKey) -> SignedTreeHead | None:
    """The last head in the heads file that verifies under ``key`` and covers exactly ``size`` entries."""
    for record in reversed(read_heads(heads_path(ledger_path))):
        if record.head is None or record.head.head.tree_size != size:
            continue
        try:
            record.head.verify(key)
        except TreeHeadError:
            continue
        return record.head
    return None


def audit(
    ledger_path: Path,
    public_key: ec.EllipticCurvePublicKey,
    *,
    store: Path | None = None,
    key_file: Path | None = None,
    checkpoints: list[Path] = (),  # type: ignore[assignment]
    certificates: list[Path] = (),  # type: ignore[assignment]
    anchor: tuple[int, str] | None = None,
) -> AuditReport:
    """Check everything that was given; see the module docstring and :mod:`.log_audit`, :mod:`.store_audit`."""
    findings = Findings()
    external = load_external(list(checkpoints), list(certificates), public_key, findings)
    snapshot = audit_log(ledger_path, public_key, findings, external=external, anchor=anchor)
    if snapshot is None:
        return AuditReport(findings, 0, None)
    if store is not None:
        audit_store(store, snapshot, findings, key_file=key_file)
    return AuditReport(findings, snapshot.size, covering_head(ledger_path, snapshot.size, public_key))
