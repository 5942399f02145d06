"""Every strategy on the same recorded federation, in process: does the canary go, does the model stay useful?

One digits federation is trained once at the configuration of
`fedforget bench unlearning --quick` (10 clients, 15 rounds, E = 2, lr 0.1,
batch 16, client 3 backdoored); each strategy then unlearns client 3 from
the same history into a trajectory of its own and is judged against the
exact retrain of it.

Flower samples the nodes of a round in random order and FedAvg sums their
updates in that order, so the low bits of every model (and, through
training, several points of accuracy for some strategies) vary from run to
run even with fixed seeds. The fixture seeds Python's ``random`` so that
this module is reproducible; the tolerances cover what was measured in 23
runs (seeds 0-4 with two node orders each, seed 0 with ten more, and three
unseeded runs; fedrecovery and gradient-ascent in 13 and 10 of them). The
test set has 360 images, so one image is 0.28 points:

===============  ===================================  ===========================  ===========
strategy         accuracy gap to retrain              backdoor ASR                 round trips
===============  ===================================  ===========================  ===========
retrain          (accuracy 0.969-0.978)               0.000 (original 0.975-1.0)   15
subtract         -0.8 .. +4.2 points (median +0.3;    0.000-0.003                  3
                 3 of 23 runs above 2; this run 2.2)
fedrecovery      -0.8 .. +0.8 points                  0.75-0.93                    0
calibrated       0.0 .. +3.1 points                   0.000                        14
gradient-ascent  -0.3 .. +1.9 points                  0.03-0.63                    3
===============  ===================================  ===========================  ===========

A smaller federation is not a cheaper stand-in: at 6 clients x 10 rounds
subtract lost up to 7 points in 15 runs. replay's defaults diverge to
chance level in some runs at either size, so replay's accuracy is not
asserted here.
"""

from __future__ import annotations

import random

import pytest
from local_grid import LocalGrid

from fedforget.client.app import load_weights, make_client_app, model_arrays
from fedforget.evidence.backdoor import attack_success_rate
from fedforget.evidence.distance import accuracy
from fedforget.server.rounds.loop import FederatedRun, RunSettings, Withdrawal
from fedforget.server.rounds.recording import RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.simulations.config import SimulationConfig
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.models import build_model
from fedforget.simulations.runner import data_settings
from fedforget.simulations.task import SimulationTask
from fedforget.strategies.calibrated import CalibratedSettings
from fedforget.strategies.registry import StrategyChoice, strategy_names

CLIENT = "3"
CONFIG = SimulationConfig(clients=10, rounds=15, backdoors=(CLIENT,))  # E = 2, lr 0.1, batch 16: the bench's
REBUILDERS = ("retrain", "replay", "calibrated")
"""Strategies that rebuild the whole trajectory since the client joined; the others edit the last model."""


def _federation(tmp_path, config: SimulationConfig, withdrawals=(), strategy="retrain"):
    initial = model_arrays(build_model(config.dataset, seed=config.seed))
    grid = LocalGrid(make_client_app(SimulationTask(data_settings(config), model_seed=config.seed)), config.clients)
    store = HistoryStore.create(
        tmp_path / "store", federation_id="f", model_spec=ModelSpec.from_arrays(initial),
        retention_interval=config.retention_interval,
    )
    recorder = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    run = FederatedRun(
        grid, store, recorder, StrategyChoice(strategy).build(config.unlearning_context()),
        RunSettings(
            num_rounds=config.rounds,
            train_config={"local-epochs": config.local_epochs, "lr": config.lr, "batch-size": config.batch_size},
            seed=config.seed,
            expected_clients=config.clients,
        ),
        withdrawals=withdrawals,
    )
    return initial, store, recorder, run


def _figures(arrays):
    """(test accuracy, backdoor attack success rate) of a global model."""
    data = load_dataset("digits")
    model = build_model("digits")
    load_weights(model, arrays)
    return accuracy(model, data.x_test, data.y_test), attack_success_rate(
        model, data.x_test, data.y_test, CONFIG.trigger()
    )


@pytest.fixture(scope="module")
def unlearned_every_way(tmp_path_factory):
    state = random.getstate()
    random.seed(CONFIG.seed)  # Flower's node order: see the module docstring
    initial, store, recorder, run = _federation(tmp_path_factory.mktemp("bench"), CONFIG)
    run.execute(initial)
    source = store.current_trajectory()
    original = _figures(store.read_model(CONFIG.rounds))
    recorder.exclude([CLIENT])
    context = CONFIG.unlearning_context()
    results = {}
    for name in strategy_names():
        outcome, _, trajectory = run.run_unlearner(StrategyChoice(name).build(context), [CLIENT], CONFIG.rounds, source)
        results[name] = (outcome, trajectory, _figures(outcome.model))
    random.setstate(state)
    yield original, results, store
    store.close()


def test_the_canary_is_planted_and_retraining_removes_it(unlearned_every_way):
    (original_accuracy, original_asr), results, _ = unlearned_every_way
    outcome, _, (retrain_accuracy, retrain_asr) = results["retrain"]
    assert original_asr >= 0.9  # measured 0.97-1.0
    assert retrain_asr <= 0.02
    assert retrain_accuracy >= 0.95
    assert outcome.round_trips == CONFIG.rounds  # the client took part from round 1


def test_subtract_removes_the_backdoor_within_five_points_of_retrain_in_three_round_trips(unlearned_every_way):
    _, results, _ = unlearned_every_way
    retrain, _, (retrain_accuracy, retrain_asr) = results["retrain"]
    outcome, _, (test_accuracy, asr) = results["subtract"]
    assert asr <= retrain_asr + 0.05, f"subtract left the canary working: ASR {asr:.3f}"
    # Measured -0.8 .. +4.2 points in 23 runs (median +0.3); 5 points allowed.
    assert abs(test_accuracy - retrain_accuracy) <= 0.05, (test_accuracy, retrain_accuracy)
    assert outcome.round_trips == 3
    assert outcome.client_epochs == pytest.approx(3 * (CONFIG.clients - 1) * CONFIG.local_epochs)
    assert outcome.client_epochs <= 0.2 * retrain.client_epochs


def test_fedrecovery_keeps_the_backdoor(unlearned_every_way):
    """FedRecovery subtracts a weighted *average* of the per-round residuals (weights sum to 1): about one
    round's worth of the client's influence. The canary keeps working; this is the method's limit, measured."""
    (original_accuracy, original_asr), results, _ = unlearned_every_way
    _, _, (retrain_accuracy, retrain_asr) = results["retrain"]
    outcome, _, (test_accuracy, asr) = results["fedrecovery"]
    assert asr >= 0.5 and asr >= retrain_asr + 0.4, f"ASR {asr:.3f}"  # measured 0.75-0.93
    assert abs(test_accuracy - original_accuracy) <= 0.02  # it barely moves the model
    assert outcome.round_trips == 0 and outcome.client_epochs == 0.0


def test_calibrated_defaults_remove_the_backdoor_within_four_points_of_retrain(unlearned_every_way):
    _, results, _ = unlearned_every_way
    _, _, (retrain_accuracy, retrain_asr) = results["retrain"]
    outcome, _, (test_accuracy, asr) = results["calibrated"]
    assert asr <= retrain_asr + 0.05, f"calibrated left the canary working: ASR {asr:.3f}"
    # Measured 0.0-3.1 points below retrain in 23 runs with r = 0.5, and -0.1 ± 0.3 over the bench's 3 seeds
    # with the default r = 1; 4 points allowed.
    assert test_accuracy >= retrain_accuracy - 0.04, (test_accuracy, retrain_accuracy)
    assert outcome.round_trips == CONFIG.rounds - 1  # round 1 reuses the stored updates
    ratio = CalibratedSettings().calibration_ratio
    assert outcome.client_epochs == pytest.approx((CONFIG.rounds - 1) * (CONFIG.clients - 1) * ratio * CONFIG.local_epochs)


def test_gradient_ascent_runs_on_the_client_and_keeps_the_model_useful(unlearned_every_way):
    """Whether the ascent removes the canary is not asserted: it hinges on where the accuracy floor
    stops the ascent, and across seeds the bench measured ASR from 0 to 0.9."""
    (original_accuracy, _), results, _ = unlearned_every_way
    outcome, _, (test_accuracy, _) = results["gradient-ascent"]
    assert outcome.details["ascent_epochs"] > 0
    recovery = 2 * (CONFIG.clients - 1) * CONFIG.local_epochs  # two FedAvg rounds of the remaining clients
    assert outcome.client_epochs == pytest.approx(outcome.details["ascent_epochs"] + recovery)
    assert outcome.round_trips == 3  # the ascent and two recovery rounds
    assert test_accuracy >= original_accuracy - 0.05  # measured at most 2.2 points below


def test_every_strategy_leaves_a_trajectory_to_continue_from(unlearned_every_way):
    _, results, store = unlearned_every_way
    assert set(results) == set(strategy_names())
    for name, (outcome, trajectory, _) in results.items():
        reader = store.reader(trajectory)
        assert reader.last_round() == CONFIG.rounds, name
        if name in REBUILDERS:  # every round since the client joined was rebuilt without it
            assert CLIENT not in reader.clients(), name
            assert outcome.base_version == 0, name
        else:  # the unlearned model is recorded as a round of its own
            (last,) = list(reader.rounds(CONFIG.rounds, CONFIG.rounds))
            assert last.participants == [], name
            assert outcome.base_version == CONFIG.rounds - 1, name


@pytest.mark.parametrize("strategy", ["retrain", "calibrated"])
def test_sequential_withdrawals_never_bring_back_an_earlier_client(tmp_path, strategy):
    config = SimulationConfig(clients=4, rounds=5, backdoors=())
    initial, store, _, run = _federation(
        tmp_path, config, withdrawals=[Withdrawal("1", 3), Withdrawal("2", 5)], strategy=strategy
    )
    outcome = run.execute(initial)
    first, second = outcome.unlearning
    assert (first["clients"], second["clients"]) == (["1"], ["2"])
    reader = store.reader()
    assert not {"1", "2"} & set(reader.clients())
    if strategy == "retrain":
        # The second retrain starts before the first client ever joined: round 1.
        assert second["base_version"] == 0
    for view in reader.rounds():
        assert not {"1", "2"} & {p.client_id for p in view.participants}


def test_simultaneous_withdrawals_are_unlearned_together(tmp_path):
    config = SimulationConfig(clients=4, rounds=3, backdoors=())
    initial, store, _, run = _federation(tmp_path, config, withdrawals=[Withdrawal("1", 3), Withdrawal("3", 3)])
    outcome = run.execute(initial)
    (event,) = outcome.unlearning
    assert event["clients"] == ["1", "3"]
    assert not {"1", "3"} & set(store.reader().clients())


def test_retrain_after_an_approximate_unlearning_starts_before_the_residual_client(tmp_path):
    """subtract leaves client 1's traces in shared models; a later exact retrain must undo them too."""
    config = SimulationConfig(clients=4, rounds=4, backdoors=())
    initial, store, recorder, run = _federation(tmp_path, config, withdrawals=[Withdrawal("1", 3)],
                                                strategy="subtract")
    outcome = run.execute(initial)
    assert outcome.unlearning[0]["residual_clients"] == ["1"]
    recorder.exclude(["2"])
    retrained, _, trajectory = run.run_unlearner(
        StrategyChoice("retrain").build(config.unlearning_context()), ["2"], 4, store.current_trajectory()
    )
    assert retrained.base_version == 0  # client 1 joined in round 1
    assert not {"1", "2"} & set(store.reader(trajectory).clients())


@pytest.mark.parametrize("name", ["relabel", "misdirect"])
def test_client_side_methods_run_on_the_withdrawing_client_then_recover(unlearned_every_way, name):
    """The train.unlearn message reaches the real ClientApp, which runs the method on its data.

    Forgetting is not asserted: on the quick bench's federation the backdoor ASR after recovery was
    0.10-0.15 for relabel and 0.42-0.48 for misdirect (seeds 0 and 1); the accuracy gap -0.3..+1.9 points.
    """
    _, results, _ = unlearned_every_way
    _, _, (retrain_accuracy, _) = results["retrain"]
    outcome, _, (test_accuracy, _) = results[name]
    client = outcome.details["client_epochs_unlearning"]
    assert 0 < client <= 2.0  # it stepped, within its budget of 2 epochs
    recovery = 2 * (CONFIG.clients - 1) * CONFIG.local_epochs
    assert outcome.client_epochs == pytest.approx(client + recovery)
    assert outcome.round_trips == 3  # the client's own step and two recovery rounds
    assert test_accuracy >= retrain_accuracy - 0.04, (test_accuracy, retrain_accuracy)
