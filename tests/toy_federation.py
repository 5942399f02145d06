"""Toy federations for the strategy tests: deterministic clients, a real history store, no Flower.

Every strategy test needs the same three things: a recorded history to
unlearn from, a :class:`~fedforget.strategies.base.Federation` whose clients
answer deterministically (so a test can recompute by hand what a client
would send), and a log of what the strategy asked for. They live here once;
each test module only says how its clients train.

The history is a real :class:`HistoryStore` in ``tmp_path`` (the strategies
read it through its streaming reader, as in a run). For unit tests of the
toolkit that need no store, :class:`MemoryHistory` holds rounds in memory and
lets a test make some clients' updates unreadable.

The expected values tests compute are written here independently of
``fedforget.strategies.toolkit`` (plain float64 sums), so a bug there cannot
hide in both the code and its check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedforget.arrays import Arrays
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.strategies.base import ClientMethod, ClientUpdate, Federation, RoundResult

Trainer = Callable[[str, Arrays, float, int], Arrays]
"""A client's local training: (client id, model it starts from, local epochs, server round) → its update."""

HandUpdate = Callable[[int, str, Arrays], Arrays]
"""What client ``c`` sent in round ``r`` of the recorded history, given the model it trained from."""

ClientStep = Callable[[str, Arrays, ClientMethod], tuple[Arrays, float]]
"""The withdrawing client's own unlearning: (client id, model it starts from, method) → its model, epochs."""


# --------------------------------------------------------------------------- plain float64 maths


def floats(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The floating arrays in float64."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"}


def flat(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every floating array flattened into one float64 vector, in the mapping's order."""
    return np.concatenate([v.ravel() for v in floats(arrays).values()])


def weighted_step(updates: Mapping[str, Arrays], weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Σ_k weights[k] · updates[k] over the floating arrays, in float64."""
    first = next(iter(updates.values()))
    return {
        name: sum(weights[c] * np.asarray(updates[c][name], np.float64) for c in updates)  # type: ignore[misc]
        for name in floats(first)
    }


def moved(model: Arrays, step: Mapping[str, np.ndarray], scale: float = 1.0) -> Arrays:
    """``model + scale · step`` on the floating arrays ``step`` holds, cast back to the model's dtypes."""
    return {
        name: (value.astype(np.float64) + scale * step[name]).astype(value.dtype) if name in step else value.copy()
        for name, value in model.items()
    }


def assert_models_close(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, rtol: float = 1e-5, atol: float = 1e-6,
    same_dtypes: bool = False,
) -> None:
    """Same names (and with ``same_dtypes`` the same dtypes), values within tolerance."""
    assert list(a) == list(b)
    for name in a:
        if same_dtypes:
            assert np.asarray(a[name]).dtype == np.asarray(b[name]).dtype, name
        np.testing.assert_allclose(
            np.asarray(a[name], np.float64), np.asarray(b[name], np.float64), rtol=rtol, atol=atol, err_msg=name
        )


# --------------------------------------------------------------------------- a recorded history


@dataclass
class RecordedHistory:
    """A history store after ``len(schedule)`` FedAvg rounds, and what went into it."""

    store: HistoryStore
    models: list[Arrays]
    """Global models 0..T as committed."""
    updates: list[dict[str, Arrays]]
    """updates[r - 1][client]: what the client sent in round r (also when the store did not retain it)."""
    weights: list[dict[str, float]]
    """weights[r - 1][client]: its recorded aggregation weight n_k / Σ n."""


def record_history(
    path: Path,
    initial: Arrays,
    schedule: Sequence[Sequence[str]],
    examples: Mapping[str, int],
    update: HandUpdate,
    *,
    retention_interval: int = 1,
) -> RecordedHistory:
    """Run FedAvg rounds 1..len(schedule) (round r with ``schedule[r-1]``) and record them in a new store.

    The store keeps updates every ``retention_interval`` rounds, as a run's does.
    """
    store = HistoryStore.create(
        path, federation_id="toy", model_spec=ModelSpec.from_arrays(initial), retention_interval=retention_interval
    )
    store.write_initial_model(initial)
    model = initial
    history = RecordedHistory(store, [initial], [], [])
    for server_round, participants in enumerate(schedule, start=1):
        total = float(sum(examples[c] for c in participants))
        weights = {c: examples[c] / total for c in participants}
        updates = {c: update(server_round, c, model) for c in participants}
        for c in participants:
            store.record_update(server_round, c, updates[c], num_examples=examples[c], weight=weights[c])
        model = moved(model, weighted_step(updates, weights))
        store.commit_round(server_round, model)
        history.models.append(model)
        history.updates.append(updates)
        history.weights.append(weights)
    return history


# --------------------------------------------------------------------------- the federation handle


@dataclass(frozen=True)
class LocalCall:
    """One ``local_training`` request a strategy made."""

    round: int
    epochs: float
    clients: tuple[str, ...] | None
    """The clients asked for explicitly (``clients=``), or None for all remaining ones."""


class ToyFederation(Federation):
    """In-process clients that train with ``trainer``; the new trajectory is a fork of the store.

    Without a store (``None``) it only answers client requests, for helpers
    that record nothing.

    ``calls`` logs every request in order as (kind, round or client); the
    richer logs (``local_calls``, ``started``, ``recorded``, ``client_steps``)
    keep the arguments. Recorded updates are not kept here (a test reads
    them back from the store), so that holding them never hides a leak.
    """

    def __init__(
        self,
        store: HistoryStore | None,
        examples: Mapping[str, int],
        trainer: Trainer | None = None,
        *,
        withdrawn: Sequence[str] = (),
        offline: Sequence[str] = (),
        client_step: ClientStep | None = None,
        round_epochs: float = 1.0,
    ) -> None:
        self.store = store
        self.round_epochs = round_epochs
        """Local epochs of a ``train_round`` (the federation's E)."""
        self.examples = dict(examples)
        self.trainer = trainer
        self.withdrawn = set(withdrawn)
        self.offline = set(offline)
        self.client_step = client_step
        self.calls: list[tuple[str, object]] = []
        self.local_calls: list[LocalCall] = []
        self.started: list[tuple[int, dict[str, object]]] = []
        self.recorded: list[tuple[int, list[str]]] = []
        self.client_steps: list[tuple[str, Arrays, ClientMethod]] = []
        self.round_clients: list[tuple[str, ...] | None] = []
        """The ``clients=`` of every ``train_round``, in order (None: the federation's own choice)."""

    def remaining_clients(self) -> list[str]:
        return sorted(c for c in self.examples if c not in self.withdrawn | self.offline)

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        self.calls.append(("start_trajectory", base_version))
        self.started.append((base_version, dict(info)))
        self._store().fork(base_version=base_version, info=dict(info))

    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        self.calls.append(("train_round", server_round))
        self.round_clients.append(None if clients is None else tuple(clients))
        if clients is not None and not set(clients) <= set(self.remaining_clients()):
            raise AssertionError(f"round {server_round} asked for {sorted(set(clients) - set(self.remaining_clients()))}, "
                                 "who are withdrawn or offline")
        chosen = self.remaining_clients() if clients is None else sorted(clients)
        updates = self._train(server_round, model, self.round_epochs, chosen)
        total = float(sum(u.num_examples for u in updates))
        after = moved(model, weighted_step({u.client_id: u.update for u in updates},
                                           {u.client_id: u.num_examples / total for u in updates}))
        self._record(server_round, after, updates)
        return RoundResult(after, tuple(u.client_id for u in updates), float(sum(u.epochs for u in updates)))

    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        asked = None if clients is None else tuple(clients)
        self.calls.append(("local_training", server_round))
        self.local_calls.append(LocalCall(server_round, float(local_epochs), asked))
        chosen = [c for c in self.remaining_clients() if asked is None or c in asked]
        return self._train(server_round, model, local_epochs, chosen)

    def _train(self, server_round: int, model: Arrays, epochs: float, clients: list[str]) -> list[ClientUpdate]:
        if self.trainer is None:
            raise AssertionError("this test's strategy was not expected to ask clients to train")
        return [
            ClientUpdate(c, self.trainer(c, model, epochs, server_round), self.examples[c], float(epochs))
            for c in clients
        ]

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self.calls.append(("record_round", server_round))
        self._record(server_round, model_after, updates)

    def _record(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self.recorded.append((server_round, [u.client_id for u in updates]))
        store = self._store()
        total = float(sum(u.num_examples for u in updates))
        for u in updates:
            store.record_update(
                server_round, u.client_id, u.update, num_examples=u.num_examples, weight=u.num_examples / total
            )
        store.commit_round(server_round, model_after)

    def _store(self) -> HistoryStore:
        if self.store is None:
            raise AssertionError("this test's federation has no store: the strategy was not expected to record")
        return self.store

    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        self.calls.append(("client_unlearning", client_id))
        self.client_steps.append((client_id, model, method))
        if self.client_step is None:
            raise AssertionError("this test's strategy was not expected to ask a client to unlearn itself")
        return self.client_step(client_id, model, method)


# --------------------------------------------------------------------------- a history in memory


@dataclass(frozen=True)
class Participant:
    """One participant of a :class:`MemoryRound`, as the store's metadata row describes it."""

    round: int
    client_id: str
    num_examples: int
    weight: float
    retained: bool = True


@dataclass
class MemoryRound:
    """A round held in memory; reading an ``unreadable`` client's update fails the test."""

    round: int
    participants: list[Participant]
    before: Arrays
    after: Arrays
    stored: dict[str, Arrays] = field(default_factory=dict)
    unreadable: frozenset[str] = frozenset()
    reads: list[str] = field(default_factory=list)

    def model_before(self) -> Arrays:
        return self.before

    def model_after(self) -> Arrays:
        return self.after

    def noise(self) -> Arrays | None:
        return None  # the toy rounds are not noised

    def update(self, client_id: str) -> Arrays:
        if client_id in self.unreadable:
            raise AssertionError(f"the update of client {client_id} in round {self.round} must never be read")
        self.reads.append(client_id)
        return self.stored[client_id]

    def updates(self) -> Iterator[tuple[Participant, Arrays]]:
        for info in self.participants:
            if info.retained:
                yield info, self.update(info.client_id)


class MemoryHistory:
    """A :class:`~fedforget.strategies.base.HistoryView` over :class:`MemoryRound` objects."""

    def __init__(self, initial: Arrays, rounds: Sequence[MemoryRound]) -> None:
        self.initial = initial
        self._rounds = list(rounds)

    def rounds(self, start: int = 1, end: int | None = None) -> Iterator[MemoryRound]:
        return iter([r for r in self._rounds if r.round >= start and (end is None or r.round <= end)])

    def clients(self) -> list[str]:
        return sorted({p.client_id for r in self._rounds for p in r.participants})

    def first_participation(self, client_id: str) -> int | None:
        return next((r.round for r in self._rounds if any(p.client_id == client_id for p in r.participants)), None)

    def model(self, version: int) -> Arrays:
        if version == 0:
            return self.initial
        return next(r.after for r in self._rounds if r.round == version)
