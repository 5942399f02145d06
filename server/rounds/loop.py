"""The server's own round loop: train, record, and act between rounds.

Flower's ``Strategy.start`` runs rounds back to back; fedforget needs to act
between them (stop a withdrawn client's participation, run an unlearning
strategy, continue from the unlearned model) and to resume an interrupted run
from the history store. This loop drives the same ``configure_train`` /
``aggregate_train`` calls as ``Strategy.start`` does, on a
:class:`~fedforget.server.rounds.recording.RecordingFedAvg`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import getLogger
from typing import Protocol

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedforget import wire
from fedforget.arrays import Arrays, subtract
from fedforget.server.ledger.accountability import Accountability, RoundParticipant
from fedforget.server.withdrawal.consent import ConsentSource, ScheduledWithdrawals, Withdrawal, WithdrawalNotice
from fedforget.server.store.errors import FedforgetError
from fedforget.server.store.history_store import HistoryStore
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.strategies.base import (
    AscentSettings,
    ClientOfflineError,
    ClientUpdate,
    Federation,
    RoundResult,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.retrain import Retrain

_log = getLogger(__name__)

TIMELINE_META = "timeline"
UNLEARNING_KIND = "unlearning"


class RunError(FedforgetError):
    """The federated run cannot continue."""


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


EvaluateFn = Callable[[Arrays], dict[str, float]]


class RunObserver(Protocol):
    """Receives progress as the run goes; the CLI shows it, tests may record it."""

    def run_started(self, first_round: int, num_rounds: int) -> None: ...

    def round_starting(self, server_round: int) -> None: ...

    def round_finished(self, entry: dict[str, object]) -> None: ...

    def unlearning_started(self, clients: Sequence[str], before_round: int, strategy: str) -> None: ...

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

    def unlearning_finished(self, event: dict[str, object]) -> None:
        pass


@dataclass(frozen=True)
class RunOutcome:
    """The final global model and what happened on the way."""

    model: Arrays
    timeline: list[dict[str, object]]
    unlearning: list[dict[str, object]]
    resumed_from: int


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
        self.grid = grid
        self.store = store
        self.strategy = strategy
        self.unlearner = unlearner
        self.settings = settings
        if consent is not None and withdrawals:
            raise ValueError("give withdrawals either as a schedule or through a consent source, not both")
        self.consent: ConsentSource = consent or ScheduledWithdrawals(withdrawals)
        self.accountability = accountability
        self.evaluate_fn = evaluate_fn
        self.observer: RunObserver = observer or SilentObserver()
        self.reference_retrain = reference_retrain
        """Also retrain exactly after an approximate unlearning, as the yardstick for its evidence."""
        # Cached so that the loop never reads the store while the strategy's
        # recording thread may be writing it; refreshed after each flush.
        self._trajectory = 0
        self._events: list[dict[str, object]] = []

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

    def prepare(self) -> None:
        """Settle the store after a crash and restore who has withdrawn (called by ``execute``)."""
        self.strategy.flush()
        self._abandon_interrupted_unlearning()
        self._refresh_from_store()
        self.strategy.exclude(self.withdrawn_clients())
        if self.accountability is not None:
            added = self.accountability.reconcile(self.store)
            if added:
                _log.warning("ledger entries for rounds %s were lost in a crash and rebuilt from the store", added)

    def unlearn_now(self, notices: list[WithdrawalNotice], before_round: int, model: Arrays) -> Arrays:
        """Act on withdrawals outside the round loop (``fedforget unlearn``); returns the unlearned model."""
        return self._unlearn(notices, before_round, model)

    def _execute(self, initial_model: Arrays) -> RunOutcome:
        self.prepare()
        completed = self.store.last_completed_round()
        if completed == 0 and not self.store.has_model(0):
            self.store.write_initial_model(initial_model)
        model = self.store.read_model(completed)
        self._wait_for_nodes()
        self.observer.run_started(completed + 1, self.settings.num_rounds)
        timeline = self._complete_timeline(model, completed)
        for server_round in range(completed + 1, self.settings.num_rounds + 1):
            self.observer.round_starting(server_round)
            due = self.consent.due(server_round, self.withdrawn_clients())
            if due:
                model = self._unlearn(due, server_round, model)
            started = time.perf_counter()
            result = self.train_round(server_round, model)
            model = result.model_after
            entry = self._timeline_entry(server_round, model, time.perf_counter() - started)
            timeline.append(entry)
            snapshot = list(timeline)
            self.strategy.submit_write(lambda: self.store.set_meta(TIMELINE_META, snapshot))
            self.observer.round_finished(entry)
        self.strategy.flush()
        return RunOutcome(
            model=model, timeline=timeline, unlearning=self.unlearning_events(), resumed_from=completed
        )

    def train_round(self, server_round: int, model: Arrays) -> RoundResult:
        """One FedAvg round over the consenting clients, recorded in the current trajectory."""
        config = ConfigRecord(dict(self.settings.train_config))
        config[wire.SEED] = self.settings.seed
        messages = list(
            self.strategy.configure_train(server_round, wire.record_from_arrays(model), config, self.grid)
        )
        if not messages:
            raise RunError(f"round {server_round}: no client is available to train")
        replies = list(self.grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            reasons = sorted({msg.error.reason for msg in replies if msg.has_error()})
            raise RunError(
                f"round {server_round}: none of the {len(messages)} clients returned a usable update "
                f"({len(replies)} replies; errors: {reasons or 'none, they timed out'})"
            )
        recorded = self.strategy.last_recorded
        assert recorded is not None and recorded.round == server_round
        self._account_for_round(server_round, wire.arrays_from_record(arrays))
        return RoundResult(
            model_after=wire.arrays_from_record(arrays),
            participants=recorded.participants,
            client_epochs=recorded.client_epochs,
        )

    # -- withdrawals and unlearning -------------------------------------------------

    def unlearning_events(self) -> list[dict[str, object]]:
        """Completed unlearnings, oldest first, as recorded with their trajectories."""
        return [dict(event) for event in self._events]

    def _refresh_from_store(self) -> None:
        """Re-read what the loop caches; only call with the strategy flushed."""
        self._trajectory = self.store.current_trajectory()
        self._events = [
            dict(t.info)
            for t in sorted(self.store.trajectories(), key=lambda t: t.id)
            if t.status == "complete" and t.info.get("kind") == UNLEARNING_KIND
        ]

    def withdrawn_clients(self) -> set[str]:
        """Clients whose unlearning has completed: they never take part again."""
        return {str(c) for event in self.unlearning_events() for c in event["clients"]}  # type: ignore[union-attr]

    def _account_for_round(self, server_round: int, model: Arrays) -> None:
        """Ledger entry for the round, written after the store has committed it."""
        if self.accountability is None:
            return
        recorded = self.strategy.last_recorded
        assert recorded is not None
        participants = [RoundParticipant(client, recorded.examples[client]) for client in recorded.participants]
        trajectory, accountability, store = self._trajectory, self.accountability, self.store
        self.strategy.submit_write(
            lambda: accountability.round_committed(store, trajectory, server_round, model, participants)
        )

    def _unlearn(self, due: list[WithdrawalNotice], server_round: int, model: Arrays) -> Arrays:
        clients = sorted({notice.client_id for notice in due})
        self.strategy.exclude(clients)
        self.consent.started(due)
        try:
            unlearned = self._unlearn_clients(due, clients, server_round, model)
        except Exception as exc:
            for notice in due:
                self.consent.failed(notice, f"unlearning with {self.unlearner.name} failed: {exc}")
            raise
        return unlearned

    def _unlearn_clients(
        self, due: list[WithdrawalNotice], clients: list[str], server_round: int, model: Arrays
    ) -> Arrays:
        self.observer.unlearning_started(clients, server_round, self.unlearner.name)
        before = self._evaluate(model)
        self.strategy.flush()
        source = self.store.current_trajectory()
        outcome, seconds, trajectory = self.run_unlearner(self.unlearner, clients, server_round - 1, source)
        exact = self.unlearner.name == Retrain.name
        residual = set() if exact else self._residual_clients() | set(clients)
        event: dict[str, object] = {
            "kind": UNLEARNING_KIND,
            "clients": clients,
            "round": server_round,
            "strategy": self.unlearner.name,
            "hyperparameters": self.unlearner.hyperparameters(),
            "seconds": seconds,
            "client_epochs": outcome.client_epochs,
            "rounds_replayed": outcome.rounds_replayed,
            "base_version": outcome.base_version,
            "source_trajectory": source,
            "trajectory": trajectory,
            "residual_clients": sorted(residual),
            "test_accuracy_before": before.get("test_accuracy"),
            "test_accuracy_after": self._evaluate(outcome.model).get("test_accuracy"),
            "details": outcome.details,
        }
        if self.reference_retrain and not exact:
            # The yardstick: the same federation replayed without the clients, in a
            # trajectory of its own that the run does not continue from.
            retrained, retrain_seconds, reference = self.run_unlearner(Retrain(), clients, server_round - 1, source)
            self.store.set_trajectory_status(
                reference, "reference", info={"kind": "reference-retrain", "clients": clients}
            )
            self.store.switch_trajectory(trajectory)
            event.update(
                reference_trajectory=reference,
                retrain_seconds=retrain_seconds,
                retrain_client_epochs=retrained.client_epochs,
                retrain_test_accuracy=self._evaluate(retrained.model).get("test_accuracy"),
            )
        certificates: dict[str, Path] = {}
        if self.accountability is not None:
            event["seed"] = self.settings.seed
            certificates = self.accountability.unlearned(self.store, due, event, model, outcome.model)
            event["keys_destroyed"] = clients
            event["certificates"] = {client: str(path) for client, path in certificates.items()}
        self.store.set_trajectory_status(trajectory, "complete", info=event)
        self._refresh_from_store()
        for notice in due:
            self.consent.finished(notice, certificates.get(notice.client_id))
        self.observer.unlearning_finished(event)
        return outcome.model

    def run_unlearner(
        self, unlearner: Unlearner, clients: Sequence[str], completed_rounds: int, source: int
    ) -> tuple[UnlearningOutcome, float, int]:
        """Unlearn ``clients`` from trajectory ``source`` with ``unlearner``.

        Returns the outcome, its wall time and the new trajectory, which is
        current afterwards and holds versions up to ``completed_rounds``.
        """
        self.strategy.flush()
        if self.store.current_trajectory() != source:
            self.store.switch_trajectory(source)
        request = UnlearningRequest(
            clients=frozenset(clients),
            completed_rounds=completed_rounds,
            seed=self.settings.seed,
            residual_clients=frozenset(self._residual_clients()),
        )
        started = time.perf_counter()
        outcome = unlearner.unlearn(request, self.store.reader(source), _GridFederation(self))
        self.strategy.flush()
        seconds = time.perf_counter() - started
        trajectory = self.store.current_trajectory()
        if trajectory == source:
            raise RunError(
                f"strategy {unlearner.name!r} returned without starting a new trajectory; "
                "the withdrawn clients' history would stay current"
            )
        if self.store.last_completed_round() != completed_rounds:
            raise RunError(
                f"strategy {unlearner.name!r} left its trajectory at round {self.store.last_completed_round()}; "
                f"it must record rounds up to {completed_rounds} so the run can continue"
            )
        return outcome, seconds, trajectory

    def _residual_clients(self) -> set[str]:
        """Clients removed only approximately: their contributions may persist in shared models."""
        return set(self._events[-1].get("residual_clients", [])) if self._events else set()  # type: ignore[arg-type]

    def _abandon_interrupted_unlearning(self) -> None:
        """Drop an unlearning a crash cut short; it is redone from its start.

        Its trajectories (the strategy's and a reference retrain's) are still
        "open": they are marked abandoned and the run returns to the history
        the unlearning started from.
        """
        trajectories = {t.id: t for t in self.store.trajectories()}
        current = trajectories[self.store.current_trajectory()]
        interrupted = [t for t in trajectories.values() if t.status == "open" and t.parent is not None]
        for trajectory in interrupted:
            self.store.set_trajectory_status(trajectory.id, "abandoned")
        while current.status in {"open", "reference"} and current.parent is not None:
            current = trajectories[current.parent]
        if interrupted:
            _log.warning("an interrupted unlearning will be run again from trajectory %s", current.id)
            self.store.switch_trajectory(current.id)

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


class _GridFederation(Federation):
    """The federation handle strategies use during an unlearning inside a run."""

    def __init__(self, run: FederatedRun) -> None:
        self._run = run

    def _nodes(self) -> dict[int, str]:
        """Connected nodes of clients that may still take part, by node id."""
        grid, strategy = self._run.grid, self._run.strategy
        clients = strategy.identities.resolve(grid, list(grid.get_node_ids()))
        return {node: client for node, client in clients.items() if client not in strategy.excluded}

    def remaining_clients(self) -> list[str]:
        return sorted(self._nodes().values())

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        self._run.strategy.flush()
        self._run._trajectory = self._run.store.fork(base_version=base_version, info={"kind": UNLEARNING_KIND, **info})

    def train_round(self, server_round: int, model: Arrays) -> RoundResult:
        result = self._run.train_round(server_round, model)
        # A strategy may read history between its rounds: keep the store settled.
        self._run.strategy.flush()
        return result

    def local_training(self, server_round: int, model: Arrays, *, local_epochs: float) -> list[ClientUpdate]:
        nodes = self._nodes()
        config = ConfigRecord(dict(self._run.settings.train_config))
        config[wire.LOCAL_EPOCHS] = float(local_epochs)
        config[wire.SEED] = self._run.settings.seed
        config[wire.SERVER_ROUND] = server_round
        record = wire.record_from_arrays(model)
        messages = [
            Message(
                content=RecordDict({wire.ARRAYS_KEY: record, wire.CONFIG_KEY: config}),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in nodes
        ]
        updates = []
        for reply in self._run.grid.send_and_receive(messages, timeout=self._run.settings.round_timeout):
            client_id = nodes.get(reply.metadata.src_node_id)
            if client_id is None:
                continue
            if reply.has_error():
                _log.warning("client %s failed its local training: %s", client_id, reply.error.reason)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            returned = wire.arrays_from_record(next(iter(reply.content.array_records.values())))
            updates.append(
                ClientUpdate(
                    client_id=client_id,
                    update=subtract(returned, model),
                    num_examples=int(metrics[wire.NUM_EXAMPLES]),
                    epochs=float(metrics.get(wire.LOCAL_EPOCHS, local_epochs)),
                )
            )
        if not updates:
            raise RunError(f"round {server_round}: no remaining client completed its local training")
        return sorted(updates, key=lambda u: u.client_id)

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self._run.strategy.flush()
        store = self._run.store
        total = float(sum(u.num_examples for u in updates))
        for u in updates:
            store.record_update(
                server_round, u.client_id, u.update, num_examples=u.num_examples, weight=u.num_examples / total
            )
        store.commit_round(server_round, model_after)
        if self._run.accountability is not None:
            self._run.accountability.round_committed(
                store,
                store.current_trajectory(),
                server_round,
                model_after,
                [RoundParticipant(u.client_id, u.num_examples) for u in updates],
            )

    def gradient_ascent(
        self, client_id: str, model: Arrays, reference: Arrays, settings: AscentSettings
    ) -> tuple[Arrays, float]:
        grid, strategy = self._run.grid, self._run.strategy
        clients = strategy.identities.resolve(grid, list(grid.get_node_ids()))
        node = next((n for n, c in clients.items() if c == client_id), None)
        if node is None:
            raise ClientOfflineError(
                f"client {client_id} is not connected: gradient-ascent unlearning needs the withdrawing "
                "client online; use a strategy that needs no work from it (retrain, calibrated, subtract)"
            )
        config = ConfigRecord(
            {
                wire.ASCENT_RADIUS: settings.radius,
                wire.LEARNING_RATE: settings.lr,
                wire.LOCAL_EPOCHS: settings.epochs,
                wire.BATCH_SIZE: settings.batch_size,
                wire.ASCENT_ACCURACY_FLOOR: settings.accuracy_floor,
                wire.ASCENT_MOMENTUM: settings.momentum,
                wire.SEED: self._run.settings.seed,
            }
        )
        if settings.clip_norm is not None:
            config[wire.ASCENT_CLIP_NORM] = settings.clip_norm
        content = RecordDict(
            {
                wire.ARRAYS_KEY: wire.record_from_arrays(model),
                wire.REFERENCE_KEY: wire.record_from_arrays(reference),
                wire.CONFIG_KEY: config,
            }
        )
        message = Message(content=content, message_type=wire.ASCENT_MESSAGE, dst_node_id=node)
        replies = list(grid.send_and_receive([message], timeout=self._run.settings.round_timeout))
        if not replies:
            raise ClientOfflineError(f"client {client_id} did not answer the gradient-ascent request in time")
        (reply,) = replies
        if reply.has_error():
            raise RunError(f"client {client_id} failed its gradient ascent: {reply.error.reason}")
        metrics = next(iter(reply.content.metric_records.values()))
        return (
            wire.arrays_from_record(reply.content[wire.ARRAYS_KEY]),
            float(metrics.get(wire.LOCAL_EPOCHS, 0.0)),
        )
