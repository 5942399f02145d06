"""Where a recording strategy stands in its store's history, and what it may record next.

The history must explain the model: round ``t`` is the update of every
participant against version ``t-1``, and training continues from the last
version. These are the rules that keep it so, kept apart from the strategy
that averages:

- a round is the history's next one; inside Flower's ``Strategy.start`` the
  history's count goes on by itself, whatever Flower numbers the round;
- a round starts from the history's last model (after an unlearning, the
  unlearned one, never the model from before it);
- nothing is trained while an unlearning a crash cut short is undone;
- a history an earlier run recorded is only continued if its client ids mean
  the same now (:func:`~fedforget.server.rounds.client_identity.check_continuity`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fedforget.arrays import Arrays, same_model
from fedforget.errors import FedforgetError
from fedforget.server.rounds.client_identity import IDENTITY_META, ClientIdResolver, check_continuity
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.events import in_progress, interrupted_clients


class RecordingError(FedforgetError):
    """A round cannot be recorded consistently with the store's history."""


class HistoryPosition:
    """The next round of the store's current trajectory and the model it must start from.

    ``settle`` makes the store current (the strategy's flush); the position
    reads the store only right after it.
    """

    def __init__(self, store: HistoryStore, identities: ClientIdResolver, settle: Callable[[], None]) -> None:
        self.store = store
        self.identities = identities
        self._settle = settle
        self._next_round: int | None = None
        self._last_model: Arrays | None = None
        self._trajectory: int | None = None
        self._flower_rounds: dict[int, int] | None = None
        """While Flower's ``Strategy.start`` runs: its round number -> the history's."""
        self._inherited_identities: dict[str, str] | None = None
        """Identity kinds of the clients an earlier run recorded (None: not read yet)."""

    def forget(self) -> None:
        """The store may have changed (flushed, forked, switched): read it again when next needed."""
        self._next_round = None
        self._last_model = None
        self._trajectory = None

    def follow_flower(self, on: bool) -> None:
        """Inside ``Strategy.start``: number Flower's rounds as the history's next ones."""
        self._flower_rounds = {} if on else None

    def round_to_configure(self, server_round: int) -> int:
        """The history's number for a round about to be configured (checked against the store)."""
        if self._flower_rounds is None:
            return self.require_next(server_round)
        self._flower_rounds[server_round] = self._next()
        return self._flower_rounds[server_round]

    def configured_round(self, server_round: int) -> int:
        """The history's number of a round already configured."""
        if self._flower_rounds is None:
            return server_round
        return self._flower_rounds.get(server_round, server_round)

    def trajectory(self) -> int:
        """The trajectory rounds are recorded into (read once the store is settled)."""
        self._next()
        assert self._trajectory is not None
        return self._trajectory

    def require_next(self, server_round: int) -> int:
        expected = self._next()
        if server_round != expected:
            raise RecordingError(
                f"cannot record round {server_round}: the history store at {self.store.path} "
                f"has {expected - 1} completed rounds in its current trajectory, so the next "
                f"round must be {expected} (resume the run instead of restarting it)"
            )
        return server_round

    def recorded(self, server_round: int, model_after: Arrays) -> None:
        """Round ``server_round`` was recorded with ``model_after``: the next starts from it."""
        self._next_round = server_round + 1
        self._last_model = model_after

    def check_start(self, history_round: int, model: Arrays) -> None:
        """A round must start from the history's model before it, or its updates explain nothing."""
        if history_round == 1 and not self.store.has_model(0):
            self.store.write_initial_model(model)
            self._last_model = model
            return
        expected = self._last_model if self._last_model is not None else self.store.read_model(history_round - 1)
        if not same_model(expected, model):
            raise RecordingError(
                f"round {history_round} would start from a model that is not the history's model after round "
                f"{history_round - 1} (trajectory {self.store.current_trajectory()} of {self.store.path}); its "
                "updates would explain nothing, and after an unlearning the withdrawn clients would be back in "
                "the model. Start from the history's model: initial_arrays=report.arrays after an unlearning, or "
                "initial_arrays=strategy.current_arrays() to continue a stored run."
            )
        self._last_model = model

    def check_identities(self, clients: list[str]) -> None:
        """Clients about to be recorded must be identified as the history's earlier clients were."""
        if self._inherited_identities is None:
            self._next()
        if self._inherited_identities and clients:
            kinds = self.identities.kinds()
            check_continuity(self._inherited_identities, {c: kinds[c] for c in clients if c in kinds}, self.store.path)

    def _next(self) -> int:
        if self._next_round is None:
            self._settle()
            self._refuse_unfinished_unlearning()
            self._next_round = self.store.last_completed_round() + 1
            self._trajectory = self.store.current_trajectory()
            if self._inherited_identities is None:
                earlier = any(self.store.reader(t.id).last_round() > 0 for t in self.store.trajectories())
                stored = self.store.get_meta(IDENTITY_META, {}) if earlier else {}
                self._inherited_identities = {str(k): str(v) for k, v in dict(stored or {}).items()}
        return self._next_round

    def _refuse_unfinished_unlearning(self) -> None:
        """Training on a history whose unlearning a crash cut short would keep its clients in the model."""
        under_way = in_progress(self.store)
        if under_way is not None and under_way.get("pid") != os.getpid():
            clients = ", ".join(map(str, under_way.get("clients", [])))
            raise RecordingError(
                f"an unlearning of client(s) {clients} in {self.store.path} was cut short; create "
                "fedforget.server.Unlearning(strategy), or resume the run, to roll it back before training"
            )
        interrupted = interrupted_clients(self.store)
        if interrupted:
            raise RecordingError(
                f"client(s) {', '.join(sorted(interrupted))} were being unlearned when an earlier run stopped, and "
                f"the history in {self.store.path} still holds them: unlearn them again (Unlearning.unlearn, "
                "resuming the run, or `fedforget unlearn --store`) before training on"
            )
