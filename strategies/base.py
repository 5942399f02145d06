"""The one interface every unlearning strategy implements.

A strategy sees the federation's past only through a :class:`HistoryView`
(the history store's streaming reader satisfies it) and asks for client work
only through a :class:`Federation` handle (the Flower layer implements it).
Neither needs Flower or a network, so every algorithm is testable on toys.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol


from fedforget.arrays import Arrays
from fedforget.errors import FedforgetError
# AscentSettings is re-exported: strategies and tests have always imported it from here.
from fedforget.strategies.client_methods import AscentSettings as AscentSettings, ClientMethod
from fedforget.strategies.settings import StrategySettings, UnlearningContext


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

    def noise(self) -> Arrays | None:
        """The central DP noise ``model_after`` carries (None if the server added none)."""
        ...

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
    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        """Run one FedAvg round from ``model`` and record it.

        ``clients=None``: the federation picks who trains as a live round does
        (the remaining clients, or a sample of them when the federation samples).
        ``clients`` given: exactly those clients train (all must be remaining
        and reachable): an exact retrain replays each recorded round with the
        clients that took part in it, so that sampled participation is
        reproduced instead of drawn again.
        """

    @abstractmethod
    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        """Have the remaining clients train from ``model`` for ``local_epochs``; record nothing.

        ``clients`` limits the request to some of them (FedRecover asks only
        the clients whose estimated update looks abnormal); withdrawn clients
        are never asked. Without ``clients``, a federation that samples its
        rounds (sampled participation) asks a sample, as a live round would. ``server_round`` seeds each client's batch order, so
        training "in round t" sees the batches the original round t saw.
        Calibration training (FedEraser), exact replay rounds and recovery
        rounds use it; the strategy decides what, if anything, to record.
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
    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        """Have the (still online) withdrawing client run one unlearning method on its own data from ``model``.

        ``method`` is the method's settings (gradient ascent, relabelling,
        misdirection: :mod:`fedforget.strategies.client_methods`). Returns the
        client's resulting model and the epochs it spent. Raises
        :class:`ClientOfflineError` if the client cannot be reached.
        """


class StrategyRefusedError(FedforgetError):
    """The strategy will not unlearn this request (it would not pay, or not work); nothing was changed.

    Raised before any client works or anything is recorded, so the caller
    can unlearn the same clients with another strategy (the message names it).
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
    """The unlearned global model and what it cost.

    ``client_epochs`` and ``round_trips`` are measured by :meth:`Unlearner.run`
    on the federation handle, not reported by the strategy, so every strategy
    is charged the same way.
    """

    model: Arrays
    rounds_replayed: int
    base_version: int
    details: dict[str, object] = field(default_factory=dict)
    client_epochs: float = 0.0
    """Local epochs the clients trained for the unlearning, summed over clients."""
    round_trips: int = 0
    """Times the server had to wait for clients: what a deployed user waits for (~10 s each)."""
    server_seconds: float = 0.0
    """The unlearning's wall time outside client round trips: the server's own computation and I/O."""


class Unlearner(ABC):
    """An algorithm that removes clients' contributions from the global model.

    Parameters
    ----------
    settings:
        The strategy's own settings (its :attr:`Settings` dataclass); its defaults when omitted.
    context:
        What the federation knows (local epochs, retention, a model factory).
    """

    name: ClassVar[str]
    Settings: ClassVar[type[StrategySettings]]
    exact: ClassVar[bool] = False
    """Whether the result is what training without the clients gives: then no trace of them can remain."""
    one_client_per_request: ClassVar[bool] = False
    """Whether a request may name only one client (client-side methods run on that client's own data)."""

    def __init__(self, settings: StrategySettings | None = None, context: UnlearningContext | None = None) -> None:
        chosen = self.Settings() if settings is None else settings
        if type(chosen) is not self.Settings:
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(chosen).__name__}")
        self.settings = chosen
        self.context = context or UnlearningContext()

    @property
    def needs_client_work(self) -> bool:
        """Whether unlearning asks clients to train (then it cannot run between runs, offline)."""
        return True

    @abstractmethod
    def unlearn(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation
    ) -> UnlearningOutcome:
        """Return a global model without ``request.clients``' contributions.

        ``history`` is the trajectory that holds the contributions; it stays
        readable while the strategy writes the new trajectory via ``federation``.
        Call :meth:`run`, which also measures the cost.
        """

    def run(
        self, request: UnlearningRequest, history: HistoryView, federation: Federation,
        *, progress: Callable[[str], None] | None = None,
    ) -> UnlearningOutcome:
        """:meth:`unlearn`, with its client work measured on the federation handle.

        ``progress`` is told of each round trip to the clients as it ends: an
        unlearning of a large federation can replay rounds for many minutes.
        """
        meter = MeteredFederation(federation, progress=progress)
        started = time.perf_counter()
        outcome = self.unlearn(request, history, meter)
        outcome.client_epochs = meter.client_epochs
        outcome.round_trips = meter.round_trips
        outcome.server_seconds = time.perf_counter() - started - meter.client_seconds
        return outcome

    def hyperparameters(self) -> dict[str, object]:
        """Settings that determine the result, recorded with every unlearning."""
        return self.settings.to_json()

    def trajectory_info(self, request: UnlearningRequest) -> dict[str, object]:
        """What the new trajectory records about the unlearning that made it."""
        return {"strategy": self.name, "clients": sorted(request.clients), **self.hyperparameters()}


class MeteredFederation(Federation):
    """A federation handle that counts what the clients were asked to do.

    One call that needs clients (a round, a local training, a client-side unlearning) is one
    round trip, however many clients answer; client epochs are summed over
    the clients that answered.
    """

    def __init__(self, inner: Federation, *, progress: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self._progress = progress
        self.round_trips = 0
        self.client_epochs = 0.0
        self.client_seconds = 0.0
        """Wall time spent waiting for clients; the rest of an unlearning is the server's own work."""

    def remaining_clients(self) -> list[str]:
        return self.inner.remaining_clients()

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        self.inner.start_trajectory(base_version, info)

    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        started = time.perf_counter()
        result = self.inner.train_round(server_round, model, clients=clients)
        self._count(started, result.client_epochs, f"round {server_round} trained, {len(result.participants)} clients")
        return result

    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        started = time.perf_counter()
        updates = self.inner.local_training(server_round, model, local_epochs=local_epochs, clients=clients)
        self._count(
            started, float(sum(u.epochs for u in updates)),
            f"local training for round {server_round}, {len(updates)} clients",
        )
        return updates

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self.inner.record_round(server_round, model_after, updates)

    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        started = time.perf_counter()
        result, epochs = self.inner.client_unlearning(client_id, model, method)
        self._count(started, float(epochs), f"client {client_id}'s own unlearning ({method.method})")
        return result, epochs

    def _count(self, started: float, client_epochs: float, what: str) -> None:
        """Add one round trip that began at ``started`` (perf_counter) and report it."""
        seconds = time.perf_counter() - started
        self.client_seconds += seconds
        self.round_trips += 1
        self.client_epochs += client_epochs
        if self._progress is not None:
            self._progress(f"round trip {self.round_trips}: {what}, {seconds:.1f} s")
