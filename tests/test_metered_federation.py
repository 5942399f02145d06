"""Unlearner.run charges every strategy the same way (strategies/base.py: MeteredFederation).

Time is read from a fake clock that only the test advances, so the server's
own seconds are checked exactly, whatever the machine's load.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

from fedforget.arrays import Arrays
from fedforget.strategies import base
from fedforget.strategies.base import (
    AscentSettings,
    ClientMethod,
    ClientUpdate,
    Federation,
    HistoryView,
    MeteredFederation,
    RoundResult,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.retrain import RetrainSettings

MODEL: Arrays = {"w": np.zeros(2, np.float32)}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class SlowClients(Federation):
    """Every client request takes ``client_seconds`` on the clock; recording is free."""

    def __init__(self, clock: Clock, client_seconds: float) -> None:
        self.clock = clock
        self.client_seconds = client_seconds
        self.recorded: list[int] = []

    def remaining_clients(self) -> list[str]:
        return ["a", "b", "c"]

    def start_trajectory(self, base_version: int, info: dict[str, object]) -> None:
        pass

    def train_round(self, server_round: int, model: Arrays, *, clients: Sequence[str] | None = None) -> RoundResult:
        self.clock.now += self.client_seconds
        return RoundResult(model, ("a", "b", "c"), client_epochs=3.0)

    def local_training(
        self, server_round: int, model: Arrays, *, local_epochs: float, clients: Sequence[str] | None = None
    ) -> list[ClientUpdate]:
        self.clock.now += self.client_seconds
        return [ClientUpdate(c, model, 10, local_epochs) for c in (clients or self.remaining_clients())]

    def record_round(self, server_round: int, model_after: Arrays, updates: list[ClientUpdate]) -> None:
        self.recorded.append(server_round)

    def client_unlearning(self, client_id: str, model: Arrays, method: ClientMethod) -> tuple[Arrays, float]:
        self.clock.now += self.client_seconds
        return model, 2.5


class Busy(Unlearner):
    """Asks for one of each kind of client work, and computes 1 s on its own between each."""

    name: ClassVar[str] = "busy"
    Settings = RetrainSettings

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        self.clock.now += 1.0
        federation.train_round(1, MODEL)
        self.clock.now += 1.0
        federation.local_training(2, MODEL, local_epochs=0.5, clients=["b", "c"])
        self.clock.now += 1.0
        federation.client_unlearning("u", MODEL, AscentSettings(radius=1.0))
        federation.start_trajectory(0, {})
        federation.record_round(3, MODEL, [])
        self.clock.now += 1.0
        return UnlearningOutcome(MODEL, 2, 0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def test_each_request_is_one_round_trip_and_epochs_are_summed_over_answers(clock: Clock) -> None:
    meter = MeteredFederation(SlowClients(clock, client_seconds=10.0))
    meter.train_round(1, MODEL)
    assert (meter.round_trips, meter.client_epochs) == (1, 3.0)
    meter.local_training(2, MODEL, local_epochs=0.5)
    assert (meter.round_trips, meter.client_epochs) == (2, 3.0 + 3 * 0.5)
    meter.local_training(2, MODEL, local_epochs=2.0, clients=["c"])  # one client asked: still one round trip
    assert (meter.round_trips, meter.client_epochs) == (3, 4.5 + 2.0)
    meter.client_unlearning("u", MODEL, AscentSettings(radius=1.0))
    assert (meter.round_trips, meter.client_epochs) == (4, 6.5 + 2.5)
    meter.start_trajectory(0, {})
    meter.record_round(3, MODEL, [])
    assert meter.round_trips == 4  # recording asks no client
    assert meter.client_seconds == pytest.approx(40.0)
    assert meter.remaining_clients() == ["a", "b", "c"]


def test_run_fills_the_cost_and_server_time_excludes_the_clients(clock: Clock) -> None:
    federation = SlowClients(clock, client_seconds=10.0)
    outcome = Busy(clock).run(UnlearningRequest(frozenset({"u"}), 3), None, federation)  # type: ignore[arg-type]
    assert outcome.round_trips == 3
    assert outcome.client_epochs == pytest.approx(3.0 + 2 * 0.5 + 2.5)
    assert outcome.server_seconds == pytest.approx(4.0)  # 34 s of wall time, 30 of them waiting for clients
    assert federation.recorded == [3]  # the meter passes everything through
