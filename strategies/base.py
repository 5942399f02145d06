"""The one interface every unlearning strategy implements.

A strategy sees the federation's past only through a :class:`HistoryView`
(the history store's streaming reader satisfies it) and asks for client work
only through a :class:`Federation` handle (the Flower layer implements it).
Neither needs Flower or a network, so every algorithm is testable on toys.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from fedforget.arrays import Arrays


class UpdateRecord(Protocol):
    """Metadata of one client's recorded update in one round."""

    round: int
    client_id: str
    num_examples: int
    weight: float
    retained: bool


class RoundRecord(Protocol):
    """One completed round of the history, loaded lazily."""

    round: int
    participants: list[UpdateRecord]

    def model_before(self) -> Arrays: ...

    def model_after(self) -> Arrays: ...

    def update(self, client_id: str) -> Arrays: ...

    def updates(self) -> Iterator[tuple[UpdateRecord, Arrays]]: ...


class HistoryView(Protocol):
    """Read access to one trajectory of the history, one round at a time.

    Rounds without participants exist: an approximate unlearning records its
    result as a round of its own, whose model no client update explains.
    """

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[RoundRecord]: ...

    def clients(self) -> list[str]: ...

    def first_participation(self, client_id: str) -> int | None: ...

    def model(self, version: int) -> Arrays: ...


@dataclass(frozen=True)
class ClientUpdate:
    """One client's local training result: returned weights minus the model it was sent."""

    client_id: str
    update: Arrays
    num_examples: int
    epochs: float


@dataclass(frozen=True)
class AscentSettings:
    """Projected gradient ascent a withdrawing client runs on its own data (Halimi et al. 2022)."""

    radius: float
    """L2 radius of the ball around the reference model the iterate is projected onto."""
    lr: float = 0.01
    epochs: float = 5.0
    batch_size: int = 32
    accuracy_floor: float = 0.1
    """Early stopping: stop once accuracy on the client's own data falls to this value."""
    momentum: float = 0.9
    """SGD momentum of the ascent, as in the reference implementation (IBM/federated-unlearning):
    without it, ascent from a model that fits the client's data confidently barely moves."""
    clip_norm: float | None = 5.0
    """Gradient-norm clipping of the ascent, as in the reference implementation."""


@dataclass(frozen=True)
class RoundResult:
    """What one federated round run on a strategy's behalf produced."""

    model_after: Arrays
    participants: tuple[str, ...]
    client_epochs: float


class Federation(ABC):
    """The client work a strategy may ask for, and where its new history goes.

    The Flower layer implements this against a live Grid; tests implement it
    with in-process clients.
    """

    @abstractmethod
    def remaining_clients(self) -> list[str]:
        """Ids of clients that may still take part (withdrawn ones excluded)."""

    @abstractmethod
    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        """Begin the unlearned history: it shares models 0..``base_version`` with the current one.

        Rounds the strategy runs afterwards are recorded in this new trajectory,
        so a later unlearning never reads the withdrawn client's updates again.
        """

    @abstractmethod
    def train_round(self, server_round: int, model: Arrays) -> RoundResult:
        """Run one FedAvg round from ``model`` with the remaining clients and record it."""

    @abstractmethod
    def local_training(self, server_round: int, model: Arrays, *, local_epochs: float) -> list[ClientUpdate]:
        """Have every remaining client train from ``model`` for ``local_epochs``; record nothing.

        Calibration training (FedEraser) and recovery rounds use it; the
        strategy decides what, if anything, to record.
        """

    @abstractmethod
    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        """Record a round of the new trajectory the strategy computed itself.

        Aggregation weights are the FedAvg weights of ``updates`` (n_k / sum n).
        ``updates`` may be empty: the round then only records ``model_after``,
        e.g. the result of an approximate unlearning, or a round the
        reconstruction skipped (FedEraser between retained rounds).
        """

    @abstractmethod
    def gradient_ascent(
        self, client_id: str, model: Arrays, reference: Arrays, settings: AscentSettings
    ) -> tuple[Arrays, float]:
        """Have the (still online) withdrawing client run projected gradient ascent on its own data.

        Returns the client's resulting model and the epochs it spent. Raises
        :class:`ClientOfflineError` if the client cannot be reached.
        """


class ClientOfflineError(RuntimeError):
    """A strategy needed work from a client that is not connected."""


@dataclass(frozen=True)
class UnlearningRequest:
    """Which clients to forget, and how far the federation has come."""

    clients: frozenset[str]
    completed_rounds: int
    seed: int = 0
    residual_clients: frozenset[str] = frozenset()
    """Clients an earlier *approximate* unlearning removed: the models of this trajectory
    may still hold traces of them, so an exact strategy must start before they joined too."""


@dataclass
class UnlearningOutcome:
    """The unlearned global model and what it cost."""

    model: Arrays
    client_epochs: float
    rounds_replayed: int
    base_version: int
    details: dict[str, object] = field(default_factory=dict)


class Unlearner(ABC):
    """An algorithm that removes clients' contributions from the global model."""

    name: ClassVar[str]
    needs_client_work: ClassVar[bool]

    @abstractmethod
    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        """Return a global model without ``request.clients``' contributions.

        ``history`` is the trajectory that holds the contributions; it stays
        readable while the strategy writes the new trajectory via ``federation``.
        """

    def hyperparameters(self) -> dict[str, object]:
        """Settings that determine the result, recorded with every unlearning."""
        return {}


def fedavg_step(updates: Sequence[ClientUpdate]) -> Arrays:
    """Σ_k (n_k / Σ n) · U_k: the FedAvg aggregate of client updates, computed in float64."""
    if not updates:
        raise ValueError("cannot aggregate an empty set of client updates")
    total = float(sum(u.num_examples for u in updates))
    step = {name: np.zeros(value.shape, dtype=np.float64) for name, value in updates[0].update.items()}
    for client in updates:
        weight = client.num_examples / total
        for name, value in client.update.items():
            step[name] += weight * value
    return {name: value.astype(updates[0].update[name].dtype) for name, value in step.items()}


def add(model: Arrays, step: Arrays, scale: float = 1.0) -> Arrays:
    """``model + scale * step`` for every array, keeping ``model``'s dtypes."""
    return {name: (value + scale * step[name]).astype(value.dtype) for name, value in model.items()}


def nothing_to_unlearn(
    history: HistoryView, federation: Federation, completed: int, info: dict[str, object], **details: object
) -> UnlearningOutcome:
    """The outcome when the clients never contributed: the new trajectory continues from the current model."""
    federation.start_trajectory(completed, info)
    return UnlearningOutcome(
        model=history.model(completed),
        client_epochs=0.0,
        rounds_replayed=0,
        base_version=completed,
        details={**details, "reason": "the withdrawn clients never took part"},
    )


def recover_and_record(
    federation: Federation,
    model: Arrays,
    completed: int,
    info: dict[str, object],
    *,
    rounds: int,
    epochs: float,
    withdrawn: frozenset[str],
) -> tuple[Arrays, float]:
    """FedAvg recovery rounds with the remaining clients, then the result as version ``completed``.

    Approximate strategies end this way: the recovered model is recorded as a
    round with no participants in a trajectory forked at ``completed - 1``.
    Returns the model and the client epochs the recovery cost.
    """
    client_epochs = 0.0
    for _ in range(rounds):
        updates = [
            u for u in federation.local_training(completed, model, local_epochs=epochs) if u.client_id not in withdrawn
        ]
        client_epochs += float(sum(u.epochs for u in updates))
        if sum(u.num_examples for u in updates) > 0:
            model = add(model, fedavg_step(updates))
    federation.start_trajectory(completed - 1, info)
    federation.record_round(completed, model, [])
    return model, client_epochs


def earliest_participation(history: HistoryView, clients: Sequence[str]) -> int | None:
    """First round in which any of ``clients`` contributed, or ``None`` if none did."""
    rounds = [r for r in (history.first_participation(c) for c in clients) if r is not None]
    return min(rounds) if rounds else None
