"""Sampled participation (``fraction_train`` < 1): a seeded draw, recorded, and unlearned from what was recorded.

With a sample per round, a withdrawn client trained in some rounds only and
the staying clients skipped some. Exact retraining must replay each round
with *that round's* participants minus the withdrawn client (never a fresh
draw); calibrated and replay must use the stored updates of whoever took part,
and never ask for one that does not exist.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from flower_fixtures import TRAIN_CONFIG, initial_model, local_federation
from flwr.app import ConfigRecord
from flwr.clientapp import ClientApp
from local_grid import LocalGrid
from toy_federation import ToyFederation, record_history

from fedforget import wire
from fedforget.run_config import DeploymentConfig, RunConfigError
from fedforget.server.rounds.grids import ShardGrid
from fedforget.server.rounds.one_round import train_recorded_round
from fedforget.server.rounds.recording import MissingParticipantError, RecordingFedAvg
from fedforget.server.store.history_store import HistoryStore, ModelSpec
from fedforget.server.unlearning.federation import FlowerFederation
from fedforget.server.withdrawal.consent import WithdrawalNotice
from fedforget.simulations.config import ConfigError, SimulationConfig
from fedforget.strategies.base import UnlearningRequest
from fedforget.strategies.calibrated import Calibrated, CalibratedSettings
from fedforget.strategies.replay import Replay, ReplaySettings
from fedforget.strategies.retrain import Retrain
from fedforget.strategies.settings import UnlearningContext

CLIENTS = 6
MODEL = {"w": np.zeros(3, np.float32)}
FRACTION = 0.5  # three of six clients per round


def participants_by_round(store: HistoryStore, trajectory: int | None = None) -> dict[int, list[str]]:
    return {view.round: [p.client_id for p in view.participants] for view in store.reader(trajectory).rounds()}


def test_retrain_under_sampling_replays_each_rounds_recorded_participants_bit_for_bit(tmp_path: Path) -> None:
    fed = local_federation(tmp_path / "run", clients=CLIENTS, rounds=3, fraction_train=FRACTION)
    fed.run.execute(initial_model())
    source = fed.store.current_trajectory()
    drawn = participants_by_round(fed.store)
    assert all(len(clients) == 3 for clients in drawn.values())
    # The withdrawn client trained in some rounds, not all (the seeded draw makes the choice stable).
    counts = {c: sum(c in clients for clients in drawn.values()) for c in map(str, range(CLIENTS))}
    withdrawn = next(c for c, n in sorted(counts.items()) if 0 < n < 3)

    fed.run.unlearning.unlearn(fed.grid, [WithdrawalNotice.by_operator(withdrawn, "test")], Retrain())
    retrained = fed.store.reader()
    assert retrained.trajectory != source
    first = min(r for r, clients in drawn.items() if withdrawn in clients)
    assert fed.store.trajectories()[-1].base_version == first - 1
    expected = {r: [c for c in clients if c != withdrawn] for r, clients in drawn.items()}
    assert participants_by_round(fed.store) == expected  # replayed, not drawn again

    # Independently: a fresh store, each round trained by Flower's own FedAvg (no sampling) on a grid
    # that lists only that round's recorded participants minus the withdrawn client.
    store = HistoryStore.create(
        tmp_path / "independent", federation_id="independent", model_spec=ModelSpec.from_arrays(initial_model())
    )
    store.write_initial_model(initial_model())
    plain = RecordingFedAvg(store, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    model = initial_model()
    for server_round, clients in expected.items():
        grid = ShardGrid(fed.grid, plain.identities, clients)
        model = train_recorded_round(
            grid, plain, server_round, model, train_config={**TRAIN_CONFIG, wire.SEED: 0}, timeout=60
        ).model_after
    plain.flush()
    assert participants_by_round(store) == expected
    for name, value in model.items():
        np.testing.assert_array_equal(retrained.model(3)[name], value, err_msg=name)


def test_the_draw_is_seeded_per_round_in_client_order_and_leaves_pythons_random_alone(tmp_path: Path) -> None:
    def draw(name: str, seed: int, grid: LocalGrid, server_round: int = 1) -> list[str]:
        store = HistoryStore.create(tmp_path / name, federation_id="f", model_spec=ModelSpec.from_arrays(MODEL))
        store.write_initial_model(MODEL)
        strategy = RecordingFedAvg(
            store, fraction_train=0.3, min_train_nodes=1, min_available_nodes=1, sampling_seed=seed
        )
        messages = strategy.configure_train(server_round, wire.record_from_arrays(MODEL), ConfigRecord(), grid)
        known = strategy.identities.known()
        return sorted(known[m.metadata.dst_node_id] for m in messages)

    app = ClientApp()
    grid = LocalGrid(app, 20)
    renumbered = LocalGrid(app, 20)
    # Other Flower node ids for the same partitions, listed by Flower in another order.
    other = {old: 1000 + (7 * i) % 20 for i, old in enumerate(renumbered.node_ids)}
    renumbered.node_ids = [other[n] for n in renumbered.node_ids]
    for table in ("registered_at", "keys", "contexts"):
        setattr(renumbered, table, {other[n]: value for n, value in getattr(renumbered, table).items()})
    random.seed(123)
    before = random.random()
    random.seed(123)
    first = draw("a", 7, grid)
    assert random.random() == before  # Flower's module-level random is restored after the draw
    assert len(first) == 6
    assert draw("b", 7, renumbered) == first  # the same clients, whatever Flower's node ids are
    assert draw("c", 8, grid) != first


def test_a_replay_refuses_to_leave_out_a_recorded_participant_that_is_offline(tmp_path: Path) -> None:
    fed = local_federation(tmp_path / "s", clients=3, rounds=1)
    fed.run.execute(initial_model())
    fed.grid.offline.add(fed.grid.node_of(2))
    fed.store.fork(base_version=0, info={})
    fed.strategy.flush()
    with pytest.raises(MissingParticipantError, match="2 is not connected"):
        train_recorded_round(
            fed.grid, fed.strategy, 1, initial_model(), train_config=TRAIN_CONFIG, timeout=60, clients=["1", "2"],
        )


# --------------------------------------------------------------------------- the strategies on a sampled history

EXAMPLES = {"a": 10, "b": 20, "c": 30, "d": 40, "u": 25}
SCHEDULE = [["a", "u", "c"], ["b", "d"], ["u", "b", "d"], ["u"], ["a", "c", "d"]]
"""Who was sampled in rounds 1-5: u trained in rounds 1, 3 and 4 only, alone in round 4; every other client skipped rounds."""
TARGETS = {c: np.full(3, i + 1.0, np.float32) for i, c in enumerate(sorted(EXAMPLES))}


def hand_update(server_round: int, client: str, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"w": (0.3 * (TARGETS[client] - model["w"])).astype(np.float32)}


def trainer(client: str, model: dict[str, np.ndarray], epochs: float, server_round: int) -> dict[str, np.ndarray]:
    return hand_update(server_round, client, model)


def sampled_history(path: Path) -> HistoryStore:
    return record_history(path, {"w": np.zeros(3, np.float32)}, SCHEDULE, EXAMPLES, hand_update).store


def unlearn_u(path: Path, strategy: Retrain | Calibrated | Replay) -> ToyFederation:
    """Unlearn u from the sampled history on a real store: a read of an update nobody sent would raise."""
    store = sampled_history(path)
    source = store.reader()
    federation = ToyFederation(store, EXAMPLES, trainer, withdrawn=["u"])
    strategy.run(UnlearningRequest(clients=frozenset({"u"}), completed_rounds=len(SCHEDULE)), source, federation)
    return federation


def staying(server_round: int) -> tuple[str, ...]:
    return tuple(sorted(c for c in SCHEDULE[server_round - 1] if c != "u"))


def test_retrain_on_a_sampled_history_replays_recorded_participants_and_skips_a_round_only_u_trained(tmp_path):
    federation = unlearn_u(tmp_path / "s", Retrain())
    assert federation.round_clients == [staying(r) for r in (1, 2, 3, 5)]  # never a fresh draw
    assert federation.recorded == [(r, list(staying(r))) for r in (1, 2, 3, 4, 5)]  # round 4: nobody trained


def test_calibrated_on_a_sampled_history_asks_each_rounds_participants_only(tmp_path):
    context = UnlearningContext(local_epochs=1.0, retention_interval=1)
    federation = unlearn_u(tmp_path / "s", Calibrated(CalibratedSettings(calibration_interval=1), context))
    # Round 1 reuses the stored updates; rounds 2, 3 and 5 calibrate with their own participants; round 4 had none left.
    assert [(call.round, call.clients) for call in federation.local_calls] == [(r, staying(r)) for r in (2, 3, 5)]
    assert federation.recorded == [(r, list(staying(r))) for r in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("estimate", ["stored", "lbfgs"])
def test_replay_on_a_sampled_history_estimates_and_trains_each_rounds_participants_only(tmp_path, estimate):
    settings = ReplaySettings(estimate=estimate, warmup_rounds=2, correction_interval=0, final_rounds=1)
    federation = unlearn_u(tmp_path / "s", Replay(settings, UnlearningContext(local_epochs=1.0)))
    # Exact rounds 1, 2 (warm-up) and 5 (final) ask the round's own participants; 3 is estimated from its
    # stored updates (b, d); round 4 had only u.
    assert [(call.round, call.clients) for call in federation.local_calls] == [(r, staying(r)) for r in (1, 2, 5)]
    assert federation.recorded == [(r, list(staying(r))) for r in (1, 2, 3, 4, 5)]


def test_unrecorded_client_work_without_named_clients_asks_a_sample_as_a_live_round(tmp_path: Path) -> None:
    fed = local_federation(tmp_path / "s", clients=CLIENTS, rounds=1, fraction_train=FRACTION)
    federation = FlowerFederation(fed.grid, fed.strategy, withdrawn=["0"], train_config=TRAIN_CONFIG)
    sent_before = len(fed.grid.sent)
    updates = federation.local_training(1, initial_model(), local_epochs=0.1)
    assert len(updates) == 2 and "0" not in {u.client_id for u in updates}  # ⌊5 · 0.5⌋ of the 5 remaining
    assert len(fed.grid.sent) - sent_before == 2
    assert [u.client_id for u in updates] == fed.strategy.sample_clients(1, fed.grid)  # Flower's seeded draw


# --------------------------------------------------------------------------- settings


def test_the_fraction_is_a_simulate_option_and_a_run_config_key_and_both_refuse_nonsense():
    assert SimulationConfig(fraction_train=0.1).fraction_train == 0.1
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="--fraction-train"):
            SimulationConfig(fraction_train=bad).validate()
    required = {"state-dir": "/srv/f", "federation-id": "fed", "signing-key": "/srv/keys/federation.key"}
    assert DeploymentConfig.from_run_config({**required, "fraction-train": 0.25}).fraction_train == 0.25
    assert DeploymentConfig.from_run_config(required).fraction_train == 1.0
    with pytest.raises(RunConfigError, match=r"fraction-train must be in \(0, 1\]"):
        DeploymentConfig.from_run_config({**required, "fraction-train": 0})
