"""Everything one unlearning does, in one place: the round loop, the Python API and ``fedforget unlearn`` share it.

An unlearning of some clients, between rounds:

1. excludes them: they get no instruction from then on, and late replies are dropped;
2. runs the :class:`~fedforget.strategies.base.Unlearner` on the recorded
   history, through a :class:`~fedforget.server.unlearning.federation.FlowerFederation`;
3. checks the result holds no trace the strategy was meant to remove
   (:meth:`UnlearningCoordinator.run_unlearner` names every check);
4. optionally retrains exactly into a side trajectory, the yardstick of an approximate strategy;
5. with a signing key, destroys the clients' data keys, writes the ledger
   entries and a certificate per notice (:class:`~fedforget.server.ledger.accountability.Accountability`,
   called from here only);
6. records the event with the new trajectory, which training continues from.

The store remembers an unlearning under way, so that the next process rolls
back one a crash cut short (:meth:`UnlearningCoordinator.prepare`) instead of
training on half of it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Protocol

from flwr.serverapp import Grid

from fedforget.arrays import Arrays, same_model
from fedforget.errors import FedforgetError
from fedforget.server.ledger.accountability import Accountability, RoundParticipant
from fedforget.server.rounds.recording import CommittedRound, RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.events import (
    IN_PROGRESS_META,
    INTERRUPTED_META,
    UNLEARNING_KIND,
    completed_unlearnings,
    in_progress,
    interrupted_clients,
    residual_clients,
    withdrawn_clients,
)
from fedforget.server.unlearning.federation import FlowerFederation, TrainConfig
from fedforget.server.withdrawal.consent import ConsentSource, WithdrawalNotice
from fedforget.strategies.base import UnlearningOutcome, UnlearningRequest, Unlearner
from fedforget.strategies.toolkit import earliest_participation
from fedforget.strategies.retrain import Retrain

_log = getLogger(__name__)

EvaluateFn = Callable[[Arrays], dict[str, float]]


class UnlearningError(FedforgetError):
    """An unlearning did not remove what it had to; nothing it produced is used."""


def check_unlearnable(store: HistoryStore, clients: Sequence[str], *, must_be_recorded: bool) -> None:
    """Refuse, before anything is written, an unlearning with nothing to act on.

    There must be a recorded round and the clients must not be unlearned
    already; an erasure the operator names (``must_be_recorded``) must name
    clients the history holds, so that a mistyped id is not "erased".
    """
    if not clients:
        raise ValueError("name at least one client to unlearn")
    if store.last_completed_round() == 0:
        raise UnlearningError(f"the history store {store.path} holds no completed round to unlearn from")
    gone = sorted(set(clients) & withdrawn_clients(completed_unlearnings(store)))
    if gone:
        raise UnlearningError(f"client(s) {', '.join(gone)} were unlearned from {store.path} already")
    if not must_be_recorded:
        return
    under_way = in_progress(store) or {}
    known = set(store.reader().clients()) | {str(c) for c in under_way.get("clients", [])}
    unknown = sorted(set(clients) - known)
    if unknown:
        raise UnlearningError(
            f"client(s) {', '.join(unknown)} have no update in the history at {store.path}; its clients are "
            f"{', '.join(sorted(known)) or 'none'}"
        )


class UnlearningObserver(Protocol):
    """Told when an unlearning starts and ends, and of each step between (the run's observer, a progress display)."""

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None: ...

    def unlearning_step(self, step: str) -> None: ...

    def unlearning_finished(self, event: dict[str, object]) -> None: ...


@dataclass(frozen=True)
class Unlearned:
    """The model training continues from, and the unlearning event as recorded with its trajectory."""

    model: Arrays
    event: dict[str, object]


class UnlearningCoordinator:
    """Unlearn clients from the history a :class:`RecordingFedAvg` records, and account for it.

    Parameters
    ----------
    strategy:
        The run's recording strategy; its store holds the history.
    accountability:
        Ledger, key destruction and certificates; ``None`` unlearns and
        records the trajectory only (no signing key configured).
    consent:
        Told when a notice's unlearning starts, ends or fails (the consent
        registry); ``None`` for notices that come from no registry.
    train_config:
        What clients are told in replayed rounds (the run's train config).
    seed:
        Recorded with every unlearning; strategies draw their randomness from it.
    round_timeout:
        Seconds to wait for a round's replies.
    evaluate_fn:
        Central evaluation, for the accuracy before and after in the event.
    observer:
        Told when an unlearning starts and ends.
    reference_retrain:
        After an approximate unlearning, also retrain exactly into a side
        trajectory, the yardstick of its evidence.
    """

    def __init__(
        self,
        strategy: RecordingFedAvg,
        *,
        accountability: Accountability | None = None,
        consent: ConsentSource | None = None,
        train_config: TrainConfig | None = None,
        seed: int = 0,
        round_timeout: float = 600.0,
        evaluate_fn: EvaluateFn | None = None,
        observer: UnlearningObserver | None = None,
        reference_retrain: bool = False,
    ) -> None:
        self.strategy = strategy
        self.store = strategy.store
        self.accountability = accountability
        self.consent = consent
        self.train_config = dict(train_config or {})
        self.seed = seed
        self.round_timeout = round_timeout
        self.evaluate_fn = evaluate_fn
        self.observer = observer
        self.reference_retrain = reference_retrain
        if accountability is not None:
            strategy.add_commit_listener(self._ledger_round)

    # -- state kept in the store ------------------------------------------------------

    def prepare(self) -> None:
        """Settle the store: roll back an unlearning a crash cut short, bring the ledger up to the store.

        Call it once before training on a store an earlier process may have
        left; the clients of a rolled-back unlearning train no more until
        they are unlearned again.
        """
        self.strategy.flush()
        self._roll_back_interrupted()
        self.strategy.flush()
        if self.accountability is not None:
            self._catch_up_ledger(self.accountability)

    def events(self) -> list[dict[str, object]]:
        """Completed unlearnings, oldest first, as recorded with their trajectories."""
        return completed_unlearnings(self.store)

    def withdrawn_clients(self) -> set[str]:
        """Clients whose unlearning has completed, or was cut short: they never take part again."""
        return withdrawn_clients(self.events()) | interrupted_clients(self.store)

    def _roll_back_interrupted(self) -> None:
        """Undo an unlearning a crash cut short: it is redone from its start."""
        record = in_progress(self.store)
        if record is not None:
            self._roll_back(record)
            _log.warning(
                "the unlearning of client(s) %s before round %s was cut short; the history is back where it "
                "started. Those clients train no more, and are unlearned again before training goes on",
                ", ".join(map(str, record["clients"])), record["round"],
            )

    def _roll_back(self, record: dict[str, object]) -> None:
        """Abandon the trajectories an unlearning made and return to its source.

        Its clients stay named as interrupted, so that nothing trains on a
        model that still holds them until they are unlearned again.
        """
        first_new = int(record["first_new_trajectory"])  # type: ignore[call-overload]
        for trajectory in self.store.trajectories():
            if trajectory.id >= first_new and trajectory.status in {"open", "reference"}:
                self.store.set_trajectory_status(trajectory.id, "abandoned")
        self.store.switch_trajectory(int(record["source_trajectory"]))  # type: ignore[call-overload]
        self.store.set_meta(INTERRUPTED_META, {"clients": record["clients"], "round": record["round"]})
        self.store.set_meta(IN_PROGRESS_META, None)

    # -- the unlearning ---------------------------------------------------------------

    def unlearn(self, grid: Grid | None, notices: Sequence[WithdrawalNotice], unlearner: Unlearner) -> Unlearned:
        """Unlearn the clients of ``notices`` from the current history, before its next round.

        On failure the history returns to where it was, the notices are
        reported failed to the consent source and the error is raised; the
        clients then train no more and nothing trains on until they are
        unlearned (:func:`~fedforget.server.unlearning.events.interrupted_clients`).
        """
        if not notices:
            raise ValueError("nothing to unlearn: no withdrawal notice given")
        clients = sorted({notice.client_id for notice in notices})
        self.strategy.exclude(clients)
        if self.consent is not None:
            self.consent.started(notices)
        try:
            return self._unlearn(grid, notices, clients, unlearner)
        except Exception as exc:
            # The original error matters more; a marker this leaves is rolled back by the next prepare().
            with contextlib.suppress(Exception):
                with contextlib.suppress(Exception):
                    self.strategy.flush()
                record = in_progress(self.store)
                if record is not None:
                    self._roll_back(record)
            if self.consent is not None:
                for notice in notices:
                    self.consent.failed(notice, f"unlearning with {unlearner.name} failed: {exc}")
            raise

    def _unlearn(
        self, grid: Grid | None, notices: Sequence[WithdrawalNotice], clients: list[str], unlearner: Unlearner
    ) -> Unlearned:
        self.strategy.flush()
        completed = self.store.last_completed_round()
        before_round = completed + 1
        model = self.store.read_model(completed)
        if self.observer is not None:
            self.observer.unlearning_started(clients, before_round, unlearner.name)
        accuracy_before = self._evaluate(model)
        source = self.store.current_trajectory()
        self.store.set_meta(
            IN_PROGRESS_META,
            {
                "clients": clients, "round": before_round, "strategy": unlearner.name, "source_trajectory": source,
                "first_new_trajectory": max(t.id for t in self.store.trajectories()) + 1, "pid": os.getpid(),
            },
        )
        self.store.set_meta(INTERRUPTED_META, None)
        outcome, seconds, trajectory = self.run_unlearner(grid, unlearner, clients, completed, source)
        exact = unlearner.exact
        residual = set() if exact else residual_clients(self.events()) | set(clients)
        event: dict[str, object] = {
            "kind": UNLEARNING_KIND,
            "clients": clients,
            "round": before_round,
            "strategy": unlearner.name,
            "exact": exact,
            "hyperparameters": unlearner.hyperparameters(),
            "seed": self.seed,
            "seconds": seconds,
            "client_epochs": outcome.client_epochs,
            "round_trips": outcome.round_trips,
            "server_seconds": outcome.server_seconds,
            "rounds_replayed": outcome.rounds_replayed,
            "base_version": outcome.base_version,
            "source_trajectory": source,
            "trajectory": trajectory,
            "residual_clients": sorted(residual),
            "test_accuracy_before": accuracy_before.get("test_accuracy"),
            "test_accuracy_after": self._evaluate(outcome.model).get("test_accuracy"),
            "details": outcome.details,
            "initiated_by": {notice.client_id: notice.initiated_by for notice in notices},
        }
        reasons = {notice.client_id: notice.reason for notice in notices if notice.reason}
        if reasons:
            event["reasons"] = reasons
        if self.reference_retrain and not exact:
            event.update(self._reference_retrain(grid, clients, completed, source, trajectory))
        certificates = self._account(notices, event, model, outcome.model)
        self.store.set_trajectory_status(trajectory, "complete", info=event)
        self.store.set_meta(IN_PROGRESS_META, None)
        self.strategy.flush()
        if self.consent is not None:
            for notice in notices:
                self.consent.finished(notice, certificates.get(notice.client_id))
        if self.observer is not None:
            self.observer.unlearning_finished(event)
        return Unlearned(model=outcome.model, event=event)

    def _reference_retrain(
        self, grid: Grid | None, clients: list[str], completed: int, source: int, trajectory: int
    ) -> dict[str, object]:
        """The yardstick: the same federation replayed without the clients, in a trajectory of its own."""
        retrained, seconds, reference = self.run_unlearner(
            grid, Retrain(), clients, completed, source, step_prefix="reference retrain: "
        )
        self.store.set_trajectory_status(reference, "reference", info={"kind": "reference-retrain", "clients": clients})
        self.store.switch_trajectory(trajectory)
        return {
            "reference_trajectory": reference,
            "retrain_seconds": seconds,
            "retrain_client_epochs": retrained.client_epochs,
            "retrain_round_trips": retrained.round_trips,
            "retrain_test_accuracy": self._evaluate(retrained.model).get("test_accuracy"),
        }

    def run_unlearner(
        self, grid: Grid | None, unlearner: Unlearner, clients: Sequence[str], completed_rounds: int, source: int,
        *, step_prefix: str = "",
    ) -> tuple[UnlearningOutcome, float, int]:
        """Unlearn ``clients`` from trajectory ``source`` with ``unlearner``, and check the result.

        Returns the outcome, its wall time and the new trajectory, which is
        current afterwards and holds versions up to ``completed_rounds``.
        Raises :class:`UnlearningError` if the strategy left the clients in
        the history it continues with, or returned a model other than the
        one it recorded (see :meth:`_check_removed`).
        """
        self.strategy.flush()
        if self.store.current_trajectory() != source:
            self.store.switch_trajectory(source)
        request = UnlearningRequest(
            clients=frozenset(clients),
            completed_rounds=completed_rounds,
            seed=self.seed,
            residual_clients=frozenset(residual_clients(self.events())),
        )
        federation = FlowerFederation(
            grid, self.strategy, withdrawn=clients, train_config={**self.train_config, "seed": self.seed},
            round_timeout=self.round_timeout,
        )
        started = time.perf_counter()
        observer = self.observer
        progress = None if observer is None else (lambda step: observer.unlearning_step(step_prefix + step))
        outcome = unlearner.run(request, self.store.reader(source), federation, progress=progress)
        self.strategy.flush()
        seconds = time.perf_counter() - started
        trajectory = self.store.current_trajectory()
        self._check_removed(unlearner.name, set(clients), completed_rounds, source, trajectory, outcome.model)
        return outcome, seconds, trajectory

    def _check_removed(
        self, name: str, clients: set[str], completed: int, source: int, trajectory: int, model: Arrays
    ) -> None:
        """Refuse every way a strategy's result could still hold the clients it was to remove."""
        if trajectory == source:
            raise UnlearningError(
                f"strategy {name!r} returned without starting a new trajectory; "
                "the withdrawn clients' history would stay current"
            )
        if self.store.last_completed_round() != completed:
            raise UnlearningError(
                f"strategy {name!r} left its trajectory at round {self.store.last_completed_round()}; "
                f"it must record rounds up to {completed} so the run can continue"
            )
        base = self.store.trajectory_info(trajectory).base_version
        new = self.store.reader(trajectory)
        for view in new.rounds(base + 1, completed):
            held = sorted(clients & {p.client_id for p in view.participants})
            if held:
                raise UnlearningError(
                    f"strategy {name!r} recorded round {view.round} with withdrawn client(s) {', '.join(held)}"
                )
        if not same_model(model, new.model(completed)):
            raise UnlearningError(
                f"strategy {name!r} returned a model other than the one it recorded as version {completed}"
            )
        original = self.store.reader(source)
        first = earliest_participation(original, sorted(clients))
        if first is None or first > completed:
            return
        if base >= completed:
            raise UnlearningError(
                f"strategy {name!r} kept version {completed} of the history, which holds client(s) "
                f"{', '.join(sorted(clients))} since round {first}, and recorded no round of its own: the model "
                "it returns is the original one"
            )
        if same_model(model, original.model(completed)):
            raise UnlearningError(
                f"strategy {name!r} returned the model it was to unlearn from, unchanged: client(s) "
                f"{', '.join(sorted(clients))} (in the history since round {first}) are still in it"
            )

    # -- accountability: the one place the ledger, shredding and certificates are called ---

    def _account(
        self, notices: Sequence[WithdrawalNotice], event: dict[str, object], before: Arrays, after: Arrays
    ) -> dict[str, Path]:
        """Destroy the clients' data keys; with a signing key, also the ledger entries and certificates."""
        clients = [str(c) for c in event["clients"]]  # type: ignore[attr-defined]
        certificates: dict[str, Path] = {}
        if self.accountability is not None:
            certificates = self.accountability.unlearned(self.store, notices, event, before, after)
        else:
            for client in clients:
                self.store.destroy_client_key(client)
            self.store.rotate_federation_key()
        event["keys_destroyed"] = clients
        event["certificates"] = {client: str(path) for client, path in certificates.items()}
        return certificates

    def _ledger_round(self, committed: CommittedRound) -> None:
        """Ledger entry for every round the store commits: trained, replayed or computed by a strategy."""
        assert self.accountability is not None
        recorded = committed.recorded
        self.accountability.round_committed(
            self.store,
            committed.trajectory,
            committed.round,
            committed.model_after,
            [RoundParticipant(c, recorded.examples[c]) for c in recorded.participants],
        )

    def _catch_up_ledger(self, accountability: Accountability) -> None:
        """Give every committed round of the current trajectory its ledger entry.

        A trajectory none of whose rounds is in the ledger was recorded before
        the ledger was kept (a signing key configured later): its entries are
        added now. Missing entries after recorded ones mean a crash fell
        between the store's commit and the ledger's.
        """
        added = accountability.reconcile(self.store)
        in_ledger_before = {
            trajectory: {r for t, r in added if t == trajectory}
            for trajectory in {t for t, _ in added}
        }
        for info in self.store.trajectories():
            rebuilt = sorted(in_ledger_before.get(info.id, set()))
            if not rebuilt:
                continue
            shared = info.base_version if info.parent is not None else 0
            span = f"{rebuilt[0]}-{rebuilt[-1]}" if len(rebuilt) > 1 else str(rebuilt[0])
            committed = [v.round for v in self.store.reader(info.id).rounds(shared + 1)]
            if rebuilt == committed:
                _log.info("rounds %s of trajectory %s entered in the ledger from the history store", span, info.id)
            else:
                _log.warning(
                    "ledger entries for rounds %s of trajectory %s were lost in a crash between the history store "
                    "and the ledger; rebuilt them from the store", span, info.id,
                )

    def _evaluate(self, model: Arrays) -> Mapping[str, float]:
        return {} if self.evaluate_fn is None else self.evaluate_fn(model)
