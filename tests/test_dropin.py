"""fedforget added to a Flower app a user already has: the ClientApp unchanged, a few lines in the ServerApp.

The ClientApp is :mod:`plain_client` (Flower's quickstart shape, no fedforget
import); the ServerApp side is what the README's walkthrough writes: a
``RecordingFedAvg`` in place of ``FedAvg``, an ``Unlearning`` next to it, one
``unlearn`` call between two ``strategy.start`` calls.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import plain_client
from flwr.app import ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from local_grid import LocalGrid

from fedforget import wire
from fedforget.server import HistoryStore, ModelSpec, RecordingError, RecordingFedAvg, Unlearning
from fedforget.server.rounds.client_identity import ClientIdentityError
from fedforget.server.store.errors import StoreExistsError
from fedforget.server.unlearning.coordinator import UnlearningError

LR = ConfigRecord({"lr": 0.5})


def _start(path: Path, grid: LocalGrid, **kwargs: object) -> tuple[HistoryStore, RecordingFedAvg, ArrayRecord]:
    torch_model = plain_client.Net()
    spec = ModelSpec.from_arrays(torch_model.state_dict())
    store = HistoryStore.create(path, federation_id="my-federation", model_spec=spec)
    strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_available_nodes=1, **kwargs)  # type: ignore[arg-type]
    return store, strategy, ArrayRecord(torch_model.state_dict())


def _trained_nodes(grid: LocalGrid, since: int = 0) -> list[int]:
    return [m.metadata.dst_node_id for m in grid.sent[since:] if m.metadata.message_type == "train"]


def test_the_client_app_does_not_import_fedforget():
    tree = ast.parse(Path(plain_client.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("fedforget") for name in imported)


def test_an_unchanged_client_app_is_recorded_in_simulation_by_partition(tmp_path):
    grid = LocalGrid(plain_client.app, 3)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=2)
    assert {m.metadata.message_type for m in grid.sent} == {"train"}  # no query of any kind
    for view in store.reader().rounds():
        # Partition i holds 20 + 10 i rows: client "i" is the node holding partition i.
        assert {p.client_id: p.num_examples for p in view.participants} == {"0": 20, "1": 30, "2": 40}
    assert store.last_completed_round() == 2


def test_an_unchanged_client_app_is_recorded_in_deployment_by_registered_name(tmp_path):
    grid = LocalGrid(plain_client.app, 2, names={0: "org-a", 1: "org-b"})
    store, strategy, arrays = _start(tmp_path / "store", grid)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=1)
    (view,) = store.reader().rounds()
    assert {p.client_id: p.num_examples for p in view.participants} == {"org-a": 20, "org-b": 30}


def test_unlearning_from_your_own_server_app_then_flowers_loop_goes_on(tmp_path):
    grid = LocalGrid(plain_client.app, 3)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    unlearning = Unlearning(strategy)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=3)
    sent_before = len(grid.sent)
    report = unlearning.unlearn(grid, "1", "retrain")
    result = strategy.start(grid=grid, initial_arrays=report.arrays, train_config=LR, num_rounds=2)

    assert grid.node_of(1) not in _trained_nodes(grid, sent_before)  # no instruction after withdrawing
    assert (report.clients, report.strategy, report.before_round, report.rounds_replayed) == (("1",), "retrain", 4, 3)
    assert report.client_epochs == 6.0  # 3 rounds replayed x 2 clients, one epoch each (nothing said otherwise)
    reader = store.reader()
    assert store.current_trajectory() == report.trajectory
    assert [v.round for v in reader.rounds()] == [1, 2, 3, 4, 5]  # rounds keep counting after the unlearning
    assert "1" not in reader.clients()
    np.testing.assert_allclose(
        wire.arrays_from_record(result.arrays)["fc.weight"], store.read_model(5)["fc.weight"], rtol=1e-6
    )
    # Exact: the same as a federation client 1 never joined.
    never = LocalGrid(plain_client.app, 3)
    _, without, _ = _start(tmp_path / "never", never)
    without.exclude(["1"])
    reference = without.start(grid=never, initial_arrays=arrays, train_config=LR, num_rounds=3)
    for name, value in wire.arrays_from_record(reference.arrays).items():
        np.testing.assert_allclose(wire.arrays_from_record(report.arrays)[name], value, rtol=1e-6, atol=1e-7)


def test_training_cannot_go_on_from_the_model_before_the_unlearning(tmp_path):
    grid = LocalGrid(plain_client.app, 3)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    unlearning = Unlearning(strategy)
    trained = strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=2)
    unlearning.unlearn(grid, ["2"], "retrain")
    for stale in (arrays, trained.arrays):
        with pytest.raises(RecordingError, match="initial_arrays=report.arrays"):
            strategy.start(grid=grid, initial_arrays=stale, train_config=LR, num_rounds=1)
    assert store.last_completed_round() == 2


def test_a_later_run_on_the_store_never_trains_a_withdrawn_client(tmp_path):
    grid = LocalGrid(plain_client.app, 3)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    unlearning = Unlearning(strategy)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=2)
    unlearning.unlearn(grid, "0", "retrain")
    store.close()

    again = LocalGrid(plain_client.app, 3)
    with HistoryStore.open(tmp_path / "store") as reopened:
        later = RecordingFedAvg(reopened, fraction_evaluate=0.0, min_available_nodes=1)
        later.start(grid=again, initial_arrays=later.current_arrays(), train_config=LR, num_rounds=1)
        assert again.node_of(0) not in _trained_nodes(again)
        assert reopened.last_completed_round() == 3


def test_no_strategy_counts_zero_work_for_a_client_that_reports_no_epochs(tmp_path, caplog):
    grid = LocalGrid(plain_client.app, 3)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    unlearning = Unlearning(strategy)
    config = ConfigRecord({"lr": 0.5, "local-epochs": 2})  # what the server asked for
    strategy.start(grid=grid, initial_arrays=arrays, train_config=config, num_rounds=2)
    retrain = unlearning.unlearn(grid, "1", "retrain")
    assert retrain.client_epochs == 2 * 2 * 2.0  # 2 rounds, 2 clients, the 2 epochs asked for
    calibrated = unlearning.unlearn(grid, "2", "calibrated")
    assert calibrated.client_epochs > 0

    plain_grid = LocalGrid(plain_client.app, 2)
    _, unsaid, unsaid_arrays = _start(tmp_path / "unsaid", plain_grid)
    with caplog.at_level(logging.WARNING):
        unsaid.start(grid=plain_grid, initial_arrays=unsaid_arrays, train_config=LR, num_rounds=1)
    assert unsaid.last_recorded is not None and unsaid.last_recorded.client_epochs == 2.0
    assert "counted as one epoch per round" in caplog.text
    told = LocalGrid(plain_client.app, 2)
    _, explicit, explicit_arrays = _start(tmp_path / "told", told, local_epochs=3.0)
    explicit.start(grid=told, initial_arrays=explicit_arrays, train_config=LR, num_rounds=1)
    assert explicit.last_recorded is not None and explicit.last_recorded.client_epochs == 6.0


def test_unlearning_a_client_the_history_does_not_hold_is_refused(tmp_path):
    grid = LocalGrid(plain_client.app, 2)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    unlearning = Unlearning(strategy)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=1)
    with pytest.raises(UnlearningError, match="client-1 have no update.*its clients are 0, 1"):
        unlearning.unlearn(grid, "client-1")
    unlearning.unlearn(grid, "1", "subtract")
    with pytest.raises(UnlearningError, match="unlearned from .* already"):
        unlearning.unlearn(grid, "1")


# -- identities across runs --------------------------------------------------------


def _record_one_round(path: Path, grid: LocalGrid) -> None:
    store, strategy, arrays = _start(path, grid)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=1)
    store.close()


def _continue(path: Path, grid: LocalGrid) -> HistoryStore:
    store = HistoryStore.open(path)
    strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_available_nodes=1)
    try:
        strategy.start(grid=grid, initial_arrays=strategy.current_arrays(), train_config=LR, num_rounds=1)
    finally:
        store.close()
    return store


def test_a_simulated_history_continues_under_the_same_partition_ids(tmp_path):
    _record_one_round(tmp_path / "store", LocalGrid(plain_client.app, 2))
    _continue(tmp_path / "store", LocalGrid(plain_client.app, 2))
    with HistoryStore.open(tmp_path / "store") as store:
        assert [sorted(p.client_id for p in v.participants) for v in store.reader().rounds()] == [["0", "1"]] * 2


def test_a_history_keyed_by_node_keys_is_never_continued(tmp_path):
    _record_one_round(tmp_path / "store", LocalGrid(plain_client.app, 2, deployed=True))
    with pytest.raises(ClientIdentityError, match="new key at every start.*--name NAME"):
        _continue(tmp_path / "store", LocalGrid(plain_client.app, 2, deployed=True))
    with HistoryStore.open(tmp_path / "store") as store:
        assert store.last_completed_round() == 1


def test_a_history_is_not_continued_under_another_kind_of_client_id(tmp_path):
    _record_one_round(tmp_path / "store", LocalGrid(plain_client.app, 2))
    with pytest.raises(ClientIdentityError, match="partition in Flower's simulation.*registered name"):
        _continue(tmp_path / "store", LocalGrid(plain_client.app, 2, names={0: "org-a", 1: "org-b"}))


def test_a_run_that_recorded_no_round_leaves_no_store_in_the_way(tmp_path):
    broken = ClientApp()

    @broken.train()
    def train(msg, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("the client's data is not there")

    grid = LocalGrid(broken, 2)
    store, strategy, arrays = _start(tmp_path / "store", grid)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=LR, num_rounds=1)  # every reply is an error
    assert store.last_completed_round() == 0
    store.close()
    # The same ServerApp, run again once the clients are fixed: create() is not refused.
    store, strategy, arrays = _start(tmp_path / "store", LocalGrid(plain_client.app, 2))
    store.close()
    # A store with a recorded round is history, and never replaced.
    _record_one_round(tmp_path / "kept", LocalGrid(plain_client.app, 2))
    with pytest.raises(StoreExistsError, match="already holds a history store"):
        _start(tmp_path / "kept", LocalGrid(plain_client.app, 2))
