"""Every path by which a withdrawn client could still train, or stay in the model returned, raises.

Each test takes one such path: a strategy driven without a prior exclusion,
strategies that keep, replay or hand back the withdrawn client's
contribution, training resumed from the model before the unlearning (see also
``test_dropin``), a later run on the same store, an unlearning that fails,
and one a crash cuts short.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import ClassVar

import numpy as np
import plain_client
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from local_grid import LocalGrid

from fedforget.server import HistoryStore, ModelSpec, RecordingError, RecordingFedAvg, Unlearning
from fedforget.server.unlearning.coordinator import UnlearningError
from fedforget.server.unlearning.events import IN_PROGRESS_META
from fedforget.server.unlearning.federation import FlowerFederation, WithdrawnClientError
from fedforget.strategies.settings import StrategySettings
from fedforget.strategies.base import (
    ClientUpdate,
    Federation,
    HistoryView,
    UnlearningOutcome,
    UnlearningRequest,
    Unlearner,
)
from fedforget.strategies.retrain import Retrain

LR = ConfigRecord({"lr": 0.5})


@pytest.fixture
def trained(tmp_path):
    """Three plain Flower clients, three recorded rounds."""
    grid = LocalGrid(plain_client.app, 3)
    model = plain_client.Net()
    spec = ModelSpec.from_arrays(model.state_dict())
    store = HistoryStore.create(tmp_path / "store", federation_id="f", model_spec=spec)
    strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_available_nodes=1)
    unlearning = Unlearning(strategy)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), train_config=LR, num_rounds=3)
    yield grid, store, strategy, unlearning
    store.close()


def _trained_nodes(grid: LocalGrid, since: int = 0) -> set[int]:
    return {m.metadata.dst_node_id for m in grid.sent[since:] if m.metadata.message_type == "train"}


@dataclass(frozen=True)
class _NoSettings(StrategySettings):
    strategy: ClassVar[str] = "custom"


class _Custom(Unlearner):
    name: ClassVar[str] = "custom"
    Settings: ClassVar[type[StrategySettings]] = _NoSettings

    @property
    def needs_client_work(self) -> bool:
        return False


class KeepsTheHistory(_Custom):
    """Starts no trajectory: the withdrawn client's history would stay current."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        return UnlearningOutcome(history.model(request.completed_rounds), 0, request.completed_rounds)


class KeepsTheLastModel(_Custom):
    """Forks at the last version and records nothing: the original model comes back."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        federation.start_trajectory(request.completed_rounds, {"clients": sorted(request.clients)})
        return UnlearningOutcome(history.model(request.completed_rounds), 0, request.completed_rounds)


class RecordsTheOriginalAgain(_Custom):
    """Records the original model as a round of its own: nothing was removed."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        completed = request.completed_rounds
        federation.start_trajectory(completed - 1, {"clients": sorted(request.clients)})
        federation.record_round(completed, history.model(completed), [])
        return UnlearningOutcome(history.model(completed), 0, completed - 1)


class ReplaysTheStoredUpdates(_Custom):
    """Replays the last round from the stored updates, the withdrawn client's included."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        completed = request.completed_rounds
        (last,) = list(history.rounds(completed, completed))
        updates = [ClientUpdate(info.client_id, update, info.num_examples, 1.0) for info, update in last.updates()]
        federation.start_trajectory(completed - 1, {"clients": sorted(request.clients)})
        federation.record_round(completed, last.model_after(), updates)
        return UnlearningOutcome(last.model_after(), 1, completed - 1)


class HandsBackAnotherModel(_Custom):
    """Records one model and returns another (the original)."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        completed = request.completed_rounds
        federation.start_trajectory(completed - 1, {"clients": sorted(request.clients)})
        federation.record_round(completed, history.model(completed - 1), [])
        return UnlearningOutcome(history.model(completed), 0, completed - 1)


class UnlearnsSomeoneElse(_Custom):
    """Removes another client than the one withdrawn."""

    def unlearn(self, request: UnlearningRequest, history: HistoryView, federation: Federation) -> UnlearningOutcome:
        federation.start_trajectory(0, {"clients": ["0"]})
        return UnlearningOutcome(history.model(0), 0, 0)


@pytest.mark.parametrize(
    ("unlearner", "error", "message"),
    [
        (KeepsTheHistory(), UnlearningError, "without starting a new trajectory"),
        (KeepsTheLastModel(), UnlearningError, "the model it returns is the original one"),
        (RecordsTheOriginalAgain(), UnlearningError, "unchanged"),
        (ReplaysTheStoredUpdates(), WithdrawnClientError, "withdrawn client.*1"),
        (HandsBackAnotherModel(), UnlearningError, "other than the one it recorded"),
        (UnlearnsSomeoneElse(), WithdrawnClientError, "the others would go on training"),
    ],
)
def test_a_strategy_that_would_leave_the_client_in_the_model_is_refused(trained, unlearner, error, message):
    grid, store, strategy, unlearning = trained
    source = store.current_trajectory()
    with pytest.raises(error, match=message):
        unlearning.unlearn(grid, "1", unlearner)
    # The history is where it was, and nothing trains on until client 1 is unlearned.
    assert store.current_trajectory() == source and store.last_completed_round() == 3
    with pytest.raises(RecordingError, match="still holds them"):
        strategy.start(grid=grid, initial_arrays=strategy.current_arrays(), train_config=LR, num_rounds=1)
    report = unlearning.unlearn(grid, "1", "retrain")
    strategy.start(grid=grid, initial_arrays=report.arrays, train_config=LR, num_rounds=1)
    assert "1" not in store.reader().clients()


def test_retrain_through_the_federation_handle_without_a_prior_exclusion_never_trains_the_client(trained):
    grid, store, strategy, _ = trained
    assert strategy.excluded == frozenset()
    sent = len(grid.sent)
    request = UnlearningRequest(clients=frozenset({"1"}), completed_rounds=3)
    federation = FlowerFederation(grid, strategy, withdrawn={"1"}, train_config={"lr": 0.5})
    outcome = Retrain().unlearn(request, store.reader(), federation)
    assert grid.node_of(1) not in _trained_nodes(grid, sent)
    assert "1" not in store.reader().clients()
    assert not np.allclose(outcome.model["fc.weight"], store.reader(1).model(3)["fc.weight"])
    with pytest.raises(ValueError, match="name the clients being unlearned"):
        FlowerFederation(grid, strategy, withdrawn=[])


def test_an_unlearning_cut_short_in_another_process_blocks_training_until_redone(trained, tmp_path):
    grid, store, strategy, unlearning = trained

    class Crash(Exception):
        pass

    class DiesMidway(Retrain):
        def unlearn(self, request, history, federation):  # type: ignore[no-untyped-def]
            federation.start_trajectory(0, {"clients": sorted(request.clients)})
            federation.train_round(1, history.model(0))
            raise Crash()

    with pytest.raises(Crash):
        unlearning.unlearn(grid, "2", DiesMidway())
    # As a crash leaves it: the half-done trajectory current, the unlearning named as under way elsewhere.
    record = dict(store.get_meta("unlearning_interrupted"))
    store.set_meta("unlearning_interrupted", None)
    store.switch_trajectory(max(t.id for t in store.trajectories()))
    store.set_meta(IN_PROGRESS_META, {**record, "strategy": "retrain", "source_trajectory": 1,
                                       "first_new_trajectory": 2, "pid": -1})
    store.close()

    with HistoryStore.open(tmp_path / "store") as reopened:
        later = RecordingFedAvg(reopened, fraction_evaluate=0.0, min_available_nodes=1)
        with pytest.raises(RecordingError, match="was cut short"):
            later.start(grid=grid, initial_arrays=ArrayRecord(plain_client.Net().state_dict()), num_rounds=1)
        redo = Unlearning(later)  # rolls it back
        assert reopened.current_trajectory() == 1
        assert {t.status for t in reopened.trajectories() if t.id > 1} == {"abandoned"}
        sent = len(grid.sent)
        with pytest.raises(RecordingError, match="still holds them"):
            later.start(grid=grid, initial_arrays=later.current_arrays(), train_config=LR, num_rounds=1)
        assert grid.node_of(2) not in _trained_nodes(grid, sent)
        report = redo.unlearn(grid, "2")
        later.start(grid=grid, initial_arrays=report.arrays, train_config=LR, num_rounds=1)
        assert "2" not in reopened.reader().clients() and reopened.last_completed_round() == 4
