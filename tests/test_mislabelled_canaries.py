"""Mislabelled canaries (``--canaries``): planted by the withdrawing clients, attacked on their own."""

from __future__ import annotations

import numpy as np
import pytest
from test_evidence import LookupModel

from fedforget.evidence.mislabelled import mislabel, plant_mislabelled
from fedforget.server.withdrawal.consent import Withdrawal
from fedforget.simulations.config import ConfigError, SimulationConfig
from fedforget.simulations.datasets import load_dataset
from fedforget.simulations.task import (
    DataSettings,
    clean_client_arrays,
    client_arrays,
    mislabelled_canaries,
    unseen_mislabelled,
)
from fedforget.simulations.runner import simulate
from fedforget.simulations.verification import EvidenceData, model_figures

BACKDOORED_AND_CANARIES = DataSettings(
    "digits", num_clients=10, backdoor_clients=(3,), canary_clients=(3, 4), canaries=5
)
BACKDOORED_ONLY = DataSettings("digits", num_clients=10, backdoor_clients=(3,))


def test_mislabel_never_keeps_the_true_class_and_reaches_every_other() -> None:
    y = np.repeat(np.arange(10), 200)
    wrong = mislabel(y, 10, seed=0)
    assert (wrong != y).all()
    for true_class in range(10):
        assert set(wrong[y == true_class].tolist()) == set(range(10)) - {true_class}
    assert (mislabel(y, 10, seed=0) == wrong).all()
    assert not (mislabel(y, 10, seed=1) == wrong).all()


def test_planting_changes_exactly_the_chosen_labels_and_is_seeded() -> None:
    y = np.arange(50) % 10
    original = y.copy()
    relabelled, chosen = plant_mislabelled(y, 7, 10, seed=[0, 1, 3])
    assert chosen.sum() == 7
    assert (relabelled[chosen] != y[chosen]).all()
    assert (relabelled[~chosen] == y[~chosen]).all()
    assert (y == original).all()
    again, chosen_again = plant_mislabelled(y, 7, 10, seed=[0, 1, 3])
    assert (again == relabelled).all() and (chosen_again == chosen).all()


def test_more_canaries_than_examples_is_refused_with_the_count() -> None:
    with pytest.raises(ValueError, match="holds 5 examples"):
        plant_mislabelled(np.arange(5), 6, 10, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        plant_mislabelled(np.arange(5), -1, 10, seed=0)


def test_canaries_are_planted_only_by_their_clients_and_never_on_a_backdoored_example() -> None:
    data = load_dataset("digits")
    for client in range(10):
        x, y, planted = client_arrays(BACKDOORED_AND_CANARIES, client)
        x_before, y_before, backdoored = client_arrays(BACKDOORED_ONLY, client)
        assert (x == x_before).all()
        changed = y != y_before
        if client not in (3, 4):
            assert not changed.any() and (planted == backdoored).all()
            assert len(mislabelled_canaries(BACKDOORED_AND_CANARIES, client)[1]) == 0
            continue
        assert changed.sum() == 5 and not (changed & backdoored).any()
        assert (planted == (backdoored | changed)).all()
        canary_x, canary_y = mislabelled_canaries(BACKDOORED_AND_CANARIES, client)
        assert (canary_x == x[changed]).all() and (canary_y == y[changed]).all()
        # The genuine data whose membership is measured holds neither kind of canary.
        genuine_x, genuine_y = clean_client_arrays(BACKDOORED_AND_CANARIES, client)
        assert len(genuine_y) == len(y) - planted.sum()
    unseen_x, unseen_y = unseen_mislabelled(BACKDOORED_AND_CANARIES)
    assert (unseen_x == data.x_test).all() and (unseen_y != data.y_test).all()


def _evidence(canaries: tuple[np.ndarray, np.ndarray]) -> EvidenceData:
    data = load_dataset("digits")
    genuine = clean_client_arrays(BACKDOORED_AND_CANARIES, 4)
    test = (data.x_test, data.y_test)
    return EvidenceData(
        members=genuine, nonmembers=test, remaining=genuine, test=test,
        canaries=canaries, unseen_canaries=unseen_mislabelled(BACKDOORED_AND_CANARIES),
    )


def test_a_model_that_memorised_the_canaries_is_caught_and_one_that_predicts_their_true_class_is_not() -> None:
    canaries = mislabelled_canaries(BACKDOORED_AND_CANARIES, 4)
    evidence = _evidence(canaries)
    true_labels = client_arrays(BACKDOORED_ONLY, 4)[1][client_arrays(BACKDOORED_AND_CANARIES, 4)[2]]
    shadows = [LookupModel(*clean_client_arrays(BACKDOORED_AND_CANARIES, c)) for c in (5, 6)]

    memorised, attacks = model_figures(LookupModel(*canaries), evidence, None, shadows)
    assert memorised["canary_fit"] == 1.0
    assert memorised["canary_mia_tpr_at_1pct_fpr"] == 1.0 and memorised["canary_lira_tpr_at_1pct_fpr"] == 1.0
    assert {"canary-population", "canary-lira"} <= set(attacks)

    generalised, _ = model_figures(LookupModel(canaries[0], true_labels), evidence, None, shadows)
    assert generalised["canary_fit"] == 0.0
    assert generalised["canary_mia_tpr_at_1pct_fpr"] == 0.0 and generalised["canary_lira_tpr_at_1pct_fpr"] == 0.0


def test_canaries_need_a_withdrawing_client_to_plant_them() -> None:
    with pytest.raises(ConfigError, match="--canaries are planted by the clients that withdraw"):
        SimulationConfig(canaries=2).validate()
    with pytest.raises(ConfigError, match="--canaries"):
        SimulationConfig(canaries=-1, withdrawals=(Withdrawal("1", 3),)).validate()
    SimulationConfig(canaries=2, withdrawals=(Withdrawal("1", 3),)).validate()


def test_more_canaries_than_a_withdrawing_client_holds_is_refused_before_anything_is_written(tmp_path) -> None:
    config = SimulationConfig(clients=10, rounds=2, canaries=500, withdrawals=(Withdrawal("1", 2),), shadows=0)
    with pytest.raises(ConfigError, match=r"--canaries 500: client 1 \(seed 0\): 500 mislabelled canaries asked"):
        simulate(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
