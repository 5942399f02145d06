"""The server's own round loop: train, record, and act on withdrawals between rounds.

Flower's ``Strategy.start`` runs rounds back to back; the built-in ServerApp
(simulation and deployment alike) needs to act between them, on withdrawals
read from the consent registry, and to resume an interrupted run from the
history store. This loop trains one round at a time on a
:class:`~fedforget.server.rounds.recording.RecordingFedAvg`, and leaves every
unlearning to the :class:`~fedforget.server.unlearning.coordinator.UnlearningCoordinator`
that the Python API and ``fedforget unlearn`` use as well.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flwr.serverapp import Grid

from fedforget import wire
from fedforget.arrays import Arrays
from fedforget.server.ledger.accountability import Accountability
from fedforget.server.rounds.grids import ShardGrid
from fedforget.server.rounds.one_round import RunError, train_recorded_round
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.unlearning.coordinator import EvaluateFn, UnlearningCoordinator
from fedforget.server.unlearning.events import interrupted_clients, withdrawn_clients
from fedforget.server.withdrawal.consent import ConsentSource, ScheduledWithdrawals, Withdrawal, WithdrawalNotice
from fedforget.strategies.base import RoundResult, UnlearningOutcome, Unlearner
from fedforget.strategies.empty_shard import EmptyShard

__all__ = [
    "EvaluateFn",
    "FederatedRun",
    "RunError",
    "RunObserver",
    "RunOutcome",
    "RunSettings",
    "SilentObserver",
    "Withdrawal",
]

TIMELINE_META = "timeline"


@dataclass(frozen=True)
class RunSettings:
    """How many rounds to run and what every client is told to do in them."""

    num_rounds: int
    train_config: dict[str, int | float | str] = field(default_factory=dict)
    seed: int = 0
    round_timeout: float = 600.0
    expected_clients: int = 0
    """Wait for this many connected nodes before round 1 (0: start with whoever is there)."""
    node_wait_timeout: float = 300.0


class RunObserver(Protocol):
    """Receives progress as the run goes; the CLI shows it, tests may record it."""

    def run_started(self, first_round: int, num_rounds: int) -> None: ...

    def round_starting(self, server_round: int) -> None: ...

    def round_finished(self, entry: dict[str, object]) -> None: ...

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None: ...

    def unlearning_step(self, step: str) -> None: ...

    def unlearning_finished(self, event: dict[str, object]) -> None: ...


class SilentObserver:
    """An observer that ignores everything."""

    def run_started(self, first_round: int, num_rounds: int) -> None:
        pass

    def round_starting(self, server_round: int) -> None:
        pass

    def round_finished(self, entry: dict[str, object]) -> None:
        pass

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None:
        pass

    def unlearning_step(self, step: str) -> None:
        pass

    def unlearning_finished(self, event: dict[str, object]) -> None:
        pass


@dataclass(frozen=True)
class RunOutcome:
    """The final global model and what happened on the way."""

    model: Arrays
    timeline: list[dict[str, object]]
    unlearning: list[dict[str, object]]
    resumed_from: int
    served: bool = True
    """False for a shard every client of which withdrew: it holds a model that learnt nothing and is left out
    of the served ensemble."""


class FederatedRun:
    """Run rounds ``k+1..num_rounds`` after the ``k`` the store already holds."""

    def __init__(
        self,
        grid: Grid,
        store: HistoryStore,
        strategy: RecordingFedAvg,
        unlearner: Unlearner,
        settings: RunSettings,
        *,
        withdrawals: Sequence[Withdrawal] = (),
        consent: ConsentSource | None = None,
        accountability: Accountability | None = None,
        evaluate_fn: EvaluateFn | None = None,
        observer: RunObserver | None = None,
        reference_retrain: bool = False,
    ) -> None:
        if strategy.store is not store:
            raise ValueError("the strategy must record into the run's history store")
        if consent is not None and withdrawals:
            raise ValueError("give withdrawals either as a schedule or through a consent source, not both")
        self.grid = grid
        self.store = store
        self.strategy = strategy
        self.unlearner = unlearner
        self.settings = settings
        self.consent: ConsentSource = consent or ScheduledWithdrawals(withdrawals)
        self.evaluate_fn = evaluate_fn
        self.observer: RunObserver = observer or SilentObserver()
        self.unlearning = UnlearningCoordinator(
            strategy,
            accountability=accountability,
            consent=self.consent,
            train_config=settings.train_config,
            seed=settings.seed,
            round_timeout=settings.round_timeout,
            evaluate_fn=evaluate_fn,
            observer=self.observer,
            reference_retrain=reference_retrain,
        )
        # What the loop reads of the store between rounds, cached so that it never reads
        # the store while the recording thread may be writing it; refreshed after each flush.
        self._trajectory = 0
        self._events: list[dict[str, object]] = []
        self._interrupted: set[str] = set()
        # The run's progress between start() and finish().
        self._model: Arrays = {}
        self._timeline: list[dict[str, object]] = []
        self._resumed_from = 0

    # -- the loop --------------------------------------------------------------

    def execute(self, initial_model: Arrays) -> RunOutcome:
        """Train to ``num_rounds``, acting on withdrawals at their round boundaries.

        Whatever ends the loop, rounds already recorded are committed before
        this returns or raises, so the store is ready to resume from.
        """
        try:
            return self._execute(initial_model)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error matters more
                self.strategy.flush()
            raise

    def _execute(self, initial_model: Arrays) -> RunOutcome:
        completed = self.start(initial_model)
        for server_round in range(completed + 1, self.settings.num_rounds + 1):
            self.run_round(server_round)
        return self.finish()

    # -- the loop one round at a time (several shards advance together: ShardedRun) --------

    def start(self, initial_model: Arrays) -> int:
        """Settle the store, wait for the nodes, and return the rounds it already holds.

        Then call :meth:`run_round` for each following round and :meth:`finish`;
        :meth:`execute` does all three.
        """
        self.unlearning.prepare()
        self._refresh_from_store()
        completed = self.store.last_completed_round()
        if completed == 0 and not self.store.has_model(0):
            self.store.write_initial_model(initial_model)
        self._model = self.store.read_model(completed)
        self._resumed_from = completed
        self._wait_for_nodes()
        self.observer.run_started(completed + 1, self.settings.num_rounds)
        self._timeline = self._complete_timeline(self._model, completed)
        return completed

    def run_round(self, server_round: int) -> None:
        """Act on the withdrawals due before ``server_round``, then train and record it."""
        self.observer.round_starting(server_round)
        due = self._due(server_round)
        if due:
            leaving = {notice.client_id for notice in due}
            unlearner = EmptyShard() if self._shard_empty(leaving) else self.unlearner
            self._model = self.unlearning.unlearn(self.grid, due, unlearner).model
            self._refresh_from_store()
        if self._shard_empty():
            self.observer.round_finished(
                {"round": server_round, "trajectory": self._trajectory, "participants": [], "seconds": 0.0,
                 "shard_empty": True}
            )
            return  # nobody left to train: the shard keeps its emptied model and serves no more
        started = time.perf_counter()
        result = self.train_round(server_round, self._model)
        self._model = result.model_after
        entry = self._timeline_entry(server_round, self._model, time.perf_counter() - started)
        self._timeline.append(entry)
        snapshot = list(self._timeline)
        self.strategy.submit_write(lambda: self.store.set_meta(TIMELINE_META, snapshot))
        self.observer.round_finished(entry)

    def finish(self) -> RunOutcome:
        """Wait until every round is committed; the final model and what happened on the way."""
        self.strategy.flush()
        return RunOutcome(
            model=self._model, timeline=self._timeline, unlearning=self.unlearning_events(),
            resumed_from=self._resumed_from, served=not self._shard_empty(),
        )

    def train_round(self, server_round: int, model: Arrays) -> RoundResult:
        """One FedAvg round over the consenting clients, recorded in the current trajectory."""
        config = {**self.settings.train_config, wire.SEED: self.settings.seed}
        return train_recorded_round(
            self.grid, self.strategy, server_round, model, train_config=config, timeout=self.settings.round_timeout
        )

    def run_unlearner(
        self, unlearner: Unlearner, clients: Sequence[str], completed_rounds: int, source: int
    ) -> tuple[UnlearningOutcome, float, int]:
        """Unlearn ``clients`` from trajectory ``source`` into a new one, with no event or ledger (benchmarks)."""
        return self.unlearning.run_unlearner(self.grid, unlearner, clients, completed_rounds, source)

    # -- withdrawals -------------------------------------------------------------

    def unlearning_events(self) -> list[dict[str, object]]:
        """Completed unlearnings, oldest first, as recorded with their trajectories."""
        return [dict(event) for event in self._events]

    def withdrawn_clients(self) -> set[str]:
        """Clients whose unlearning has completed (or was cut short): they never take part again."""
        return withdrawn_clients(self._events) | self._interrupted

    def _refresh_from_store(self) -> None:
        """Re-read what the loop caches; only call with the strategy flushed."""
        self._trajectory = self.store.current_trajectory()
        self._events = self.unlearning.events()
        self._interrupted = interrupted_clients(self.store)

    def _due(self, server_round: int) -> list[WithdrawalNotice]:
        """Withdrawals to act on before ``server_round``, and any unlearning a failure left undone.

        A request for a client already unlearned (a crash fell between the
        unlearning and the registry's update) is reported done, with the
        certificate that unlearning wrote.
        """
        gone = withdrawn_clients(self._events)
        certificates = {
            str(client): Path(str(path))
            for event in self._events
            for client, path in dict(event.get("certificates", {})).items()  # type: ignore[call-overload]
        }
        due = []
        for notice in self.consent.due(server_round, gone):
            if notice.client_id in gone:
                self.consent.finished(notice, certificates.get(notice.client_id))
            else:
                due.append(notice)
        undone = sorted(self._interrupted - {notice.client_id for notice in due})
        redo = "the unlearning an earlier run began did not finish; it is done again"
        return due + [WithdrawalNotice.by_operator(client, redo) for client in undone]

    def _shard_empty(self, leaving: Collection[str] = ()) -> bool:
        """Whether this is a shard with no client left once ``leaving`` go (an unsharded run's clients are open-ended)."""
        return isinstance(self.grid, ShardGrid) and not set(self.grid.clients) - self.withdrawn_clients() - set(leaving)

    # -- bookkeeping -------------------------------------------------------------

    def _wait_for_nodes(self) -> None:
        # An organisation that has withdrawn may have shut its node down for good.
        wanted = self.settings.expected_clients - len(self.withdrawn_clients())
        deadline = time.monotonic() + self.settings.node_wait_timeout
        while len(list(self.grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RunError(
                    f"only {len(list(self.grid.get_node_ids()))} of {wanted} expected nodes connected "
                    f"within {self.settings.node_wait_timeout:.0f} s"
                )
            time.sleep(0.2)

    def _evaluate(self, model: Arrays) -> dict[str, float]:
        return {} if self.evaluate_fn is None else self.evaluate_fn(model)

    def _timeline_entry(self, server_round: int, model: Arrays, seconds: float) -> dict[str, object]:
        recorded = self.strategy.last_recorded
        return {
            "round": server_round,
            "trajectory": self._trajectory,
            "participants": list(recorded.participants) if recorded else [],
            "seconds": seconds,
            **self._evaluate(model),
        }

    def _complete_timeline(self, model: Arrays, completed: int) -> list[dict[str, object]]:
        """The timeline so far; a round committed just before a crash gets its entry now."""
        timeline = [e for e in self.store.get_meta(TIMELINE_META, []) if int(e["round"]) <= completed]
        if completed > 0 and (not timeline or int(timeline[-1]["round"]) < completed):
            timeline.append(
                {"round": completed, "trajectory": self.store.current_trajectory(), **self._evaluate(model)}
            )
            self.store.set_meta(TIMELINE_META, timeline)
        return timeline
