"""A small finished federation with one withdrawal, for audit tests: store, ledger, heads, certificate, checkpoint.

Three digits clients, three rounds on the in-process grid; client "1" withdraws
before round 3 and is unlearned by retraining. Everything a federation keeps
is under ``state`` (the state-dir layout), and what others keep (the client's
certificate, an auditor's checkpoint, the public key) under ``held``, so a
test can tamper with a copy of ``state`` and audit it against ``held``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flower_fixtures import initial_model, local_federation

from fedforget.server.ledger.accountability import Accountability
from fedforget.server.ledger.audit import audit
from fedforget.server.ledger.heads import write_checkpoint
from fedforget.server.rounds.loop import SilentObserver
from fedforget.server.state_dir import StateDir
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.simulations.withdrawing_clients import FederationPaths, prepare_federation
from fedforget.identity import load_public_key

FEDERATION = "audit-federation"


@dataclass(frozen=True)
class FinishedRun:
    """``state``: the federation's state directory; ``held``: files kept by others."""

    state: Path
    held: Path

    @property
    def files(self) -> StateDir:
        return StateDir(self.state)

    @property
    def before_withdrawal(self) -> Path:
        """A copy of the index taken just before the unlearning (an old backup an insider could replay from)."""
        return self.held.parent / "before-withdrawal" / "index.sqlite"

    @property
    def public_key(self) -> Path:
        return self.held / "federation.pub"

    @property
    def certificate(self) -> Path:
        return self.held / "certificate.json"

    @property
    def checkpoint(self) -> Path:
        return self.held / "checkpoint.json"

    def copy(self, to: Path) -> FinishedRun:
        """A fresh copy of the state directory (the held files are shared: they are never edited)."""
        shutil.copytree(self.state, to / "state")
        return FinishedRun(to / "state", self.held)

    def audit_args(self) -> list[str]:
        return [
            "verify", "--ledger", str(self.files.ledger), "--server-key", str(self.public_key),
            "--store", str(self.files.store), "--certificate", str(self.certificate), "--checkpoint", str(self.checkpoint),
        ]  # fmt: skip


class _CopyIndexBeforeUnlearning(SilentObserver):
    def __init__(self, store: Path, to: Path) -> None:
        self.store, self.to = store, to

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None:
        self.to.mkdir()
        for name in ("index.sqlite", "index.sqlite-wal"):
            if (self.store / name).exists():
                shutil.copyfile(self.store / name, self.to / name)


def make_finished_run(root: Path) -> FinishedRun:
    state, held = root / "state", root / "held"
    held.mkdir(parents=True)
    paths = FederationPaths(state)
    prepare_federation(paths, [])
    files = StateDir(state)
    fed = local_federation(
        files.store, clients=3, rounds=3, withdrawals=[Withdrawal("1", 3)],
        observer=_CopyIndexBeforeUnlearning(files.store, root / "before-withdrawal"),
        accountability=Accountability(
            ledger_path=files.ledger, server_key=paths.server_key, certificates_dir=files.certificates,
            federation_id=FEDERATION,
        ),
    )
    outcome = fed.run.execute(initial_model())
    fed.store.close()
    shutil.copyfile(paths.server_public_key, held / "federation.pub")
    shutil.copyfile(outcome.unlearning[0]["certificates"]["1"], held / "certificate.json")
    report = audit(files.ledger, load_public_key(held / "federation.pub"))
    assert report.ok and report.head is not None, report.findings.items
    write_checkpoint(held / "checkpoint.json", report.head)
    # The federation's private key is not part of what an insider edits here: move it out of the state.
    shutil.move(str(paths.keys), str(root / "keys"))
    return FinishedRun(state, held)
