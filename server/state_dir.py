"""Where a federation's server keeps what must outlast a run, in simulation and in deployment alike.

One layout, so that every command pointed at a state directory (``flwr run``
with ``state-dir``, ``fedforget simulate --out``, ``fedforget unlearn
--state``, the audit) finds the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    """The history store, consent registry, ledger and certificates under one directory."""

    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def registry(self) -> Path:
        return self.root / "state" / "consent.sqlite"

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "ledger.jsonl"

    @property
    def certificates(self) -> Path:
        return self.root / "certificates"

    @property
    def report(self) -> Path:
        return self.root / "report.json"
