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
    """Read access to one trajectory of the history, one round at a time."""

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[RoundRecord]: ...

    def clients(self) -> list[str]: ...

    def first_participation(self, client_id: str) -> int | None: ...

    def model(self, version: int) -> Arrays: ...


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


@dataclass(frozen=True)
class UnlearningRequest:
    """Which clients to forget, and how far the federation has come."""

    clients: frozenset[str]
    completed_rounds: int
    seed: int = 0


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


def earliest_participation(history: HistoryView, clients: Sequence[str]) -> int | None:
    """First round in which any of ``clients`` contributed, or ``None`` if none did."""
    rounds = [r for r in (history.first_participation(c) for c in clients) if r is not None]
    return min(rounds) if rounds else None
