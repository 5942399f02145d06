"""The reference retrain `fedforget simulate` runs beside every approximate strategy (server/rounds/loop.py).

After an approximate unlearning the run also retrains exactly, into a side
trajectory marked "reference", as the yardstick its evidence is measured
against; the federation then goes on from the strategy's own trajectory.
"""

from __future__ import annotations

import numpy as np
from flower_fixtures import initial_model, local_federation

from fedforget.server.rounds.loop import Withdrawal
from fedforget.strategies.registry import make_unlearner


def test_the_reference_is_an_exact_retrain_beside_the_strategys_trajectory(tmp_path):
    fed = local_federation(
        tmp_path / "store", clients=4, rounds=4, withdrawals=[Withdrawal("1", 3)],
        unlearner=make_unlearner("fedrecovery"), reference_retrain=True,
    )
    outcome = fed.run.execute(initial_model())
    (event,) = outcome.unlearning
    trajectories = {t.id: t for t in fed.store.trajectories()}
    reference = trajectories[event["reference_trajectory"]]
    own = trajectories[event["trajectory"]]
    assert reference.status == "reference"
    assert (reference.info["kind"], reference.info["strategy"], reference.info["clients"]) == (
        "reference-retrain", "retrain", ["1"])
    assert reference.base_version == 0  # client 1 took part from round 1
    assert own.status == "complete" and own.base_version == 1  # fedrecovery edits the last model only

    # The same history retrained independently, with the same seeds: client 1 never takes part.
    independent = local_federation(tmp_path / "independent", clients=4, rounds=2)
    independent.strategy.exclude(["1"])
    independent.run.execute(initial_model())
    retrained = fed.store.reader(reference.id)
    assert retrained.last_round() == 2 and "1" not in retrained.clients()
    # Equal up to float32 rounding (measured 3e-8): Flower samples the nodes in random order, and FedAvg
    # sums their updates in that order.
    for name, value in independent.store.read_model(2).items():
        np.testing.assert_allclose(retrained.model(2)[name], value, rtol=0, atol=1e-6, err_msg=name)

    # The run went on from the strategy's model, not from the reference.
    assert fed.store.current_trajectory() == own.id and fed.store.last_completed_round() == 4
    continued = fed.store.reader(own.id)
    assert not np.allclose(continued.model(2)["classifier.2.weight"], retrained.model(2)["classifier.2.weight"])
    (round_three,) = continued.rounds(3, 3)
    np.testing.assert_array_equal(round_three.model_before()["classifier.2.weight"], continued.model(2)["classifier.2.weight"])
    assert [p.client_id for p in round_three.participants] == ["0", "2", "3"]
    assert not list(fed.store.reader(reference.id).rounds(3, 3))  # the reference stops where it was made

    # The event says what exact unlearning would have cost.
    assert event["strategy"] == "fedrecovery" and event["round_trips"] == 0 and event["client_epochs"] == 0.0
    assert event["retrain_round_trips"] == 2
    assert event["retrain_client_epochs"] == 2 * 3 * 1.0  # rounds 1-2, clients 0, 2, 3, one local epoch each
    assert event["retrain_seconds"] > 0
