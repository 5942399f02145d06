"""Every strategy on the same recorded federation, in process: does the canary go, does the run go on?

One digits federation with a backdoored client is trained once; each strategy
then unlearns that client from the same history into a trajectory of its own
(as `fedforget bench unlearning` does), and is judged against the exact retrain.
"""

from __future__ import annotations


import pytest
from local_grid import LocalGrid

from fedforget.client.app import load_weights, make_client_app, model_arrays
from fedforget.evidence.backdoor import attack_success_rate
from fedforget.evidence.distance import accuracy
from fedforget.server.rounds.loop import FederatedRun, RunSettings, Withdrawal
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import data_settings
from fedforget.simulations.task import SimulationTask
from fedforget.strategies.registry import STRATEGY_NAMES, make_unlearner

CONFIG = SimulationConfig(clients=6, rounds=12, backdoors=("1",), retention_interval=1)
TRAIN = {"local-epochs": CONFIG.local_epochs, "lr": CONFIG.lr, "batch-size": CONFIG.batch_size}


def _federation(tmp_path, config: SimulationConfig, withdrawals=(), unlearner="retrain"):
    initial = model_arrays(build_model(config.dataset, seed=config.seed))
    grid = LocalGrid(make_client_app(SimulationTask(data_settings(config))), config.clients)
    store = HistoryStore.create(
        tmp_path / "store", federation_id="f", model_spec=ModelSpec.from_arrays(initial),
        retention_interval=config.retention_interval,
    )
    strategy = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    options = config.unlearning_options()
    run = FederatedRun(
        grid, store, strategy, make_unlearner(unlearner, options),
        RunSettings(num_rounds=config.rounds, train_config=dict(TRAIN), expected_clients=config.clients),
        withdrawals=withdrawals,
    )
    return initial, store, strategy, run, options


def _figures(arrays):
    data = load_dataset("digits")
    model = build_model("digits")
    load_weights(model, arrays)
    return accuracy(model, data.x_test, data.y_test), attack_success_rate(
        model, data.x_test, data.y_test, CONFIG.trigger()
    )


@pytest.fixture(scope="module")
def unlearned_every_way(tmp_path_factory):
    initial, store, strategy, run, options = _federation(tmp_path_factory.mktemp("bench"), CONFIG)
    run.execute(initial)
    source = store.current_trajectory()
    original = _figures(store.read_model(CONFIG.rounds))
    strategy.exclude(["1"])
    results = {}
    for name in STRATEGY_NAMES:
        outcome, _, trajectory = run.run_unlearner(make_unlearner(name, options), ["1"], CONFIG.rounds, source)
        results[name] = (outcome, trajectory, _figures(outcome.model))
    return original, results, store


def test_the_canary_is_planted(unlearned_every_way):
    (_, original_asr), _, _ = unlearned_every_way
    assert original_asr >= 0.8


@pytest.mark.parametrize("name", ["retrain", "calibrated"])
def test_strategy_removes_the_backdoor_and_keeps_the_model_useful(unlearned_every_way, name):
    (original_accuracy, _), results, _ = unlearned_every_way
    _, _, (retrain_accuracy, retrain_asr) = results["retrain"]
    _, _, (test_accuracy, asr) = results[name]
    assert retrain_asr <= 0.05
    assert asr <= retrain_asr + 0.2, f"{name} left the canary working: ASR {asr:.2f}"
    assert test_accuracy >= retrain_accuracy - 0.15, f"{name} broke the model: accuracy {test_accuracy:.2f}"


def test_gradient_ascent_runs_on_the_client_and_keeps_the_model_useful(unlearned_every_way):
    """Whether the ascent removes the canary is not asserted: it hinges on where the accuracy floor
    stops the ascent, and across seeds the measured ASR varies from 0 to 0.9 (see the bench)."""
    (original_accuracy, _), results, store = unlearned_every_way
    outcome, trajectory, (test_accuracy, _) = results["gradient-ascent"]
    assert outcome.details["ascent_epochs"] > 0
    assert outcome.client_epochs > outcome.details["ascent_epochs"]  # recovery rounds counted too
    assert test_accuracy >= original_accuracy - 0.15
    (last,) = list(store.reader(trajectory).rounds(CONFIG.rounds, CONFIG.rounds))
    assert last.participants == []


def test_subtract_moves_the_model_but_its_correction_is_small(unlearned_every_way):
    """FedRecovery subtracts a *weighted average* of per-round residuals (weights sum to 1),
    so on this federation it barely dents the canary: measured, reported, not hidden."""
    _, results, store = unlearned_every_way
    outcome, trajectory, (test_accuracy, _) = results["subtract"]
    assert outcome.client_epochs == 0.0  # no client work at all
    assert test_accuracy >= 0.8
    reader = store.reader(trajectory)
    (last,) = list(reader.rounds(CONFIG.rounds, CONFIG.rounds))
    assert last.participants == []  # the unlearned model is recorded as a round of its own


def test_every_strategy_leaves_a_trajectory_without_the_client_to_continue_from(unlearned_every_way):
    _, results, store = unlearned_every_way
    for name, (_, trajectory, _) in results.items():
        reader = store.reader(trajectory)
        assert reader.model(CONFIG.rounds) is not None
        if name in ("retrain", "calibrated"):
            assert "1" not in reader.clients(), name


@pytest.mark.parametrize("unlearner", ["retrain", "calibrated"])
def test_sequential_withdrawals_never_bring_back_an_earlier_client(tmp_path, unlearner):
    config = SimulationConfig(clients=6, rounds=10, backdoors=("1", "2"), retention_interval=1)
    initial, store, _, run, _ = _federation(
        tmp_path, config, withdrawals=[Withdrawal("1", 5), Withdrawal("2", 8)], unlearner=unlearner
    )
    outcome = run.execute(initial)
    first, second = outcome.unlearning
    assert (first["clients"], second["clients"]) == (["1"], ["2"])
    reader = store.reader()
    assert not {"1", "2"} & set(reader.clients())
    if unlearner == "retrain":
        # The second retrain starts before the first client ever joined: round 1.
        assert second["base_version"] == 0
    for view in reader.rounds():
        assert not {"1", "2"} & {p.client_id for p in view.participants}


def test_simultaneous_withdrawals_are_unlearned_together(tmp_path):
    config = SimulationConfig(clients=5, rounds=6, backdoors=(), retention_interval=1)
    initial, store, _, run, _ = _federation(tmp_path, config, withdrawals=[Withdrawal("1", 4), Withdrawal("3", 4)])
    outcome = run.execute(initial)
    (event,) = outcome.unlearning
    assert event["clients"] == ["1", "3"]
    assert not {"1", "3"} & set(store.reader().clients())


def test_retrain_after_an_approximate_unlearning_starts_before_the_residual_client(tmp_path):
    """subtract leaves client 1's traces in shared models; a later exact retrain must undo them too."""
    config = SimulationConfig(clients=5, rounds=8, retention_interval=1)
    initial, store, strategy, run, options = _federation(tmp_path, config, withdrawals=[Withdrawal("1", 4)],
                                                         unlearner="subtract")
    run.settings = RunSettings(num_rounds=5, train_config=dict(TRAIN), expected_clients=5)
    outcome = run.execute(initial)
    assert outcome.unlearning[0]["residual_clients"] == ["1"]
    strategy.exclude(["2"])
    retrained, _, trajectory = run.run_unlearner(make_unlearner("retrain", options), ["2"], 5, store.current_trajectory())
    assert retrained.base_version == 0  # client 1 joined in round 1
    assert not {"1", "2"} & set(store.reader(trajectory).clients())
